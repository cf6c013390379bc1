#!/usr/bin/env python
"""DaLPSR inference cost: seconds per 128 -> 512 image and peak memory of the DaLPSR sampler on
the SD 2.1-base architecture, against a plain diffusers StableDiffusionControlNetPipeline built
from the very same modules, at 50 and 20 steps.

Random weights with the published architecture (``dalpsr/archs/configs/sd21_base_*.json``: UNet
866 M, VAE 84 M, OpenCLIP-H text encoder 340 M parameters; ControlNet from the UNet; no download).
Timings cover a whole image: text encoding of prompt + negative prompt, (ours) VAE encoding of the
upsampled LR, ``steps`` ControlNet+UNet evaluations with classifier-free guidance (guidance 5.5,
both branches in one batched call), VAE decoding and (ours) AdaIN color fix.

Variants (each in its own process, so "peak" is its own high-water mark: CUDA
``max_memory_allocated``, else the process's peak RSS):

  plain          diffusers StableDiffusionControlNetPipeline (image-condition ControlNet, DDPM, pure-noise start)
  ours_image     DaLPSRSampler, the same image-condition ControlNet (the like-for-like comparison)
  ours           DaLPSRSampler, latent-condition ControlNet (z_LR, DaLPSR's default), LR-embedded start at t=999
  ours_cl        ours + channels_last
  ours_compile   ours + channels_last + torch.compile of UNet and ControlNet (compile time excluded: warm-up)
  ours_graphs    ours + channels_last + torch.compile(mode='reduce-overhead') (CUDA graphs; GPU only)

    python benchmarks/bench_sampler.py                               # CPU: reduced (64 px out, 2 steps, width x0.25)
    python benchmarks/bench_sampler.py --device cuda                 # GPU: 512 px out, 50 and 20 steps, fp16 and bf16
    python benchmarks/bench_sampler.py --device cuda --precision bf16 --variants plain,ours,ours_compile
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from dalpsr.utils.misc import resolve_device  # noqa: E402

VARIANTS = ('plain', 'ours_image', 'ours', 'ours_cl', 'ours_compile', 'ours_graphs')
PROMPT = ('Deblur with sigma 0.5~0.75, Denoise with sigma 0~0.25, Dejpeg with sigma 0.25~0.5. A detailed photograph '
          'of an old stone bridge over a slow river in autumn light. clean, high-resolution, 8k')
NEGATIVE = 'dotted, noise, blur, lowres, smooth'


def peak_mb(device: torch.device) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(args) -> dict:
    """One variant in this process: build modules, warm up, time each step count."""
    from dalpsr.archs.controlnet_arch import get_controlnet_class
    from dalpsr.archs.sd_components import build_sd21_base_random, parse_dtype

    device = torch.device(args.device)
    dtype = parse_dtype(args.precision)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    comps = build_sd21_base_random(seed=0, channel_scale=args.channel_scale, dtype=dtype, device=device)
    mode = 'image' if args.variant in ('plain', 'ours_image') else 'latent'
    torch.manual_seed(1)
    with torch.device(device):
        cn = get_controlnet_class().from_unet(comps.unet, condition_mode=mode)
    cn.to(dtype=dtype).eval()
    build_s = time.perf_counter() - t0
    out_size = args.size
    g = torch.Generator().manual_seed(0)
    small = torch.rand(1, 3, out_size // 32, out_size // 32, generator=g)
    lq = torch.nn.functional.interpolate(small, size=(out_size // 4, out_size // 4), mode='bicubic',
                                         align_corners=False).clamp(0, 1)

    if args.variant == 'plain':
        from diffusers import DDPMScheduler, StableDiffusionControlNetPipeline
        pipe = StableDiffusionControlNetPipeline(
            vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
            controlnet=cn, scheduler=DDPMScheduler.from_config(comps.scheduler_config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        cond = torch.nn.functional.interpolate(lq, scale_factor=4, mode='bicubic', align_corners=False).clamp(0, 1)

        def run(steps):
            gen = torch.Generator(device).manual_seed(0)
            return pipe(PROMPT, image=cond, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=5.5,
                        height=out_size, width=out_size, generator=gen, output_type='pt').images
    else:
        from dalpsr.pipelines.sampler import DaLPSRSampler
        sampler = DaLPSRSampler(comps, cn, condition_mode=mode, device=device, dtype=dtype,
                                channels_last=args.variant in ('ours_cl', 'ours_compile', 'ours_graphs'),
                                compile={'ours_compile': True, 'ours_graphs': 'reduce-overhead'}.get(args.variant, False))

        def run(steps):
            return sampler(lq, PROMPT, negative_prompt=NEGATIVE, num_steps=steps, guidance_scale=5.5,
                           scheduler='ddpm', start='lr', start_step=999, seed=0, color_fix='adain')

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    res = {'variant': args.variant, 'precision': args.precision, 'build_s': build_s, 'size': out_size,
           'device': str(device), 'device_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
           'threads': torch.get_num_threads(), 'channel_scale': args.channel_scale, 'times': {}}
    steps_list = [int(s) for s in args.steps.split(',')]
    with torch.inference_mode():
        t = time.perf_counter()
        compiled = args.variant in ('ours_compile', 'ours_graphs')
        out = run(max(steps_list) if compiled else min(steps_list))  # warm-up (and compilation)
        if compiled:
            out = run(max(steps_list))
        sync()
        res['warmup_s'] = time.perf_counter() - t
        res['finite'] = bool(torch.isfinite(out).all())
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        for steps in steps_list:
            secs = []
            for _ in range(args.repeats):
                sync()
                t = time.perf_counter()
                run(steps)
                sync()
                secs.append(time.perf_counter() - t)
            res['times'][str(steps)] = min(secs)
    res['peak_mb'] = peak_mb(device)
    if args.variant != 'plain':
        res['vae_fp32_fallback'] = bool(sampler.last_stats.get('vae_fp32_fallback', False))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    p.add_argument('--size', type=int, default=None, help='output side in px; LR = size/4 (default 512 GPU, 64 CPU)')
    p.add_argument('--steps', default=None, help='comma-separated step counts (default 50,20 GPU; 2 CPU)')
    p.add_argument('--precision', default=None, help='comma-separated of fp32, fp16, bf16 (default fp16,bf16 GPU; fp32 CPU)')
    p.add_argument('--variants', default=None, help=f'comma-separated of {",".join(VARIANTS)} '
                                                    '(default: all on GPU; plain,ours_image,ours on CPU)')
    p.add_argument('--channel-scale', type=float, default=None,
                   help='narrow every width (1 = the published SD 2.1-base; default 1 GPU, 0.25 CPU)')
    p.add_argument('--repeats', type=int, default=None, help='timed runs per step count, best kept (default 3 GPU, 1 CPU)')
    p.add_argument('--threads', type=int, default=None, help='CPU threads (default: torch default)')
    p.add_argument('--json', default=None, help='also write the results to this JSON file')
    p.add_argument('--one', default=None, help=argparse.SUPPRESS)  # internal: run one variant here
    args = p.parse_args(argv)
    try:
        args.device = resolve_device(args.device)
    except ValueError as err:
        p.error(str(err))
    gpu = args.device == 'cuda'
    args.size = args.size or (512 if gpu else 64)
    args.steps = args.steps or ('50,20' if gpu else '2')
    args.repeats = args.repeats or (3 if gpu else 1)
    args.channel_scale = args.channel_scale or (1.0 if gpu else 0.25)
    if args.size % 64:
        p.error(f'--size must be a multiple of 64, got {args.size}')
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        args.variant, args.precision = args.one.split(':')
        print('RESULT ' + json.dumps(run_one(args)), flush=True)
        return 0

    precisions = [v.strip() for v in (args.precision or ('fp16,bf16' if gpu else 'fp32')).split(',')]
    variants = [v.strip() for v in (args.variants or (','.join(VARIANTS) if gpu else 'plain,ours_image,ours')).split(',')]
    if not gpu and 'ours_graphs' in variants:
        p.error('--variants ours_graphs needs CUDA (CUDA graphs)')
    for v in variants:
        if v not in VARIANTS:
            p.error(f'--variants: unknown {v!r} (use {", ".join(VARIANTS)})')
    env = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONPATH=str(REPO))
    print(f'DaLPSR sampler vs plain diffusers ControlNet pipeline; SD 2.1-base architecture (channel_scale '
          f'{args.channel_scale}), random weights; {args.device}, LR {args.size // 4} -> {args.size} px, CFG 5.5, '
          f'steps {args.steps}, best of {args.repeats}', flush=True)
    results = []
    for prec in precisions:
        for var in variants:
            cmd = [sys.executable, os.path.abspath(__file__), '--one', f'{var}:{prec}', '--device', args.device,
                   '--size', str(args.size), '--steps', args.steps, '--repeats', str(args.repeats),
                   '--channel-scale', str(args.channel_scale)]
            if args.threads:
                cmd += ['--threads', str(args.threads)]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = [ln for ln in r.stdout.splitlines() if ln.startswith('RESULT ')]
            if r.returncode or not line:
                err = (r.stderr.strip().splitlines() or ['?'])[-1]
                res = {'variant': var, 'precision': prec,
                       'error': 'OOM' if 'out of memory' in r.stderr.lower() else err[:200]}
            else:
                res = json.loads(line[-1][7:])
            results.append(res)
            if 'error' in res:
                print(f'  {var:12s} {prec:5s}: FAILED ({res["error"]})', flush=True)
            else:
                ts = '  '.join(f'{s} steps {v:8.3f} s' for s, v in res['times'].items())
                print(f'  {var:12s} {prec:5s}: {ts}  peak {res["peak_mb"]:8.0f} MiB  (built {res["build_s"]:.0f} s, '
                      f'warm-up {res["warmup_s"]:.1f} s, finite {res["finite"]}'
                      + (', VAE fell back to fp32' if res.get('vae_fp32_fallback') else '') + ')', flush=True)
    ok = [r for r in results if 'error' not in r]
    if ok:
        steps = list(ok[0]['times'])
        print('\n| variant | precision | ' + ' | '.join(f's/image @{s}' for s in steps) + ' | peak MiB | vs plain |')
        print('|---|---|' + '---|' * len(steps) + '---|---|')
        for r in ok:
            base = next((b for b in ok if b['variant'] == 'plain' and b['precision'] == r['precision']), None)
            rel = (f"{base['times'][steps[0]] / r['times'][steps[0]]:.2f}x" if base else '-')
            print(f"| {r['variant']} | {r['precision']} | " + ' | '.join(f"{r['times'][s]:.3f}" for s in steps)
                  + f" | {r['peak_mb']:.0f} | {rel} |")
        print(f"\ndevice: {ok[0]['device_name']}, threads {ok[0]['threads']}; published SeeSR: 4.30 s / 512 px image "
              'at 50 steps on an A100')
    if args.json:
        from dalpsr.utils.misc import atomic_write_json
        atomic_write_json(args.json, {'args': vars(args), 'results': results})
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
