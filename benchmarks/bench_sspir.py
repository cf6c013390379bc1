#!/usr/bin/env python
"""SSP-IR vs DaLPSR cost on one base architecture: seconds per training step and per restored image.

Both models are built in this run on the same random-weight Stable Diffusion 1.5 architecture (SSP-IR's
base; ``dalpsr/archs/configs/sd15_*.json`` + CLIP ViT-L/14 vision tower for SSP-IR), optionally
narrowed by ``--channel-scale`` (every width; depth, heads and the latent factor 8 unchanged), so
the ratio isolates what SSP-IR adds: the CLIP image prior + Refine layer, the Processor, the image
attentions in UNet and ControlNet and the structure attentions (997.80 M trainable parameters at
full size against DaLPSR's ControlNet, 361 M on SD 1.5).

- train step: exactly what ``dalpsr/train.py`` runs per optimizer step for ``SSPIRModel`` /
  ``DaLPSRModel`` (``training_step`` under ``accelerator.autocast``, backward, clip, AdamW step);
- s/img: each method's sampler on the shared denoising loop (SSP-IR: its restorer
  ``dalpsr/restorers/sspir.py``; DaLPSR: ``DaLPSRSampler``), ``--infer-steps`` DDPM steps from the
  LR-embedded start with CFG (SSP-IR 7.5 as the paper, DaLPSR 5.5), output ``--size`` px, one image
  (skipped with ``--no-infer``).

Each method runs in its own process (peak memory is that method's own: ``max_memory_allocated``
on a GPU, the process RSS high-water mark on CPU). On CPU the run also reports process CPU time
(``time.process_time``), which other jobs on a shared machine do not inflate (use ``--threads 1``).

    python benchmarks/bench_sspir.py                         # CPU: SD 1.5 x 0.25 widths, 64 px, batch 1
    python benchmarks/bench_sspir.py --device cuda           # GPU: full SD 1.5, 512 px, batch 4, fp16
    python benchmarks/bench_sspir.py --device cpu --size 128 --channel-scale 0.5

The paper (Table VI, A100, 512 px output, 50 DDPM steps): SSP-IR 8.82 s/img, SeeSR 4.30 s.
"""
from __future__ import annotations

import argparse
import json
import math
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

METHODS = ('sspir', 'dalpsr')
_NEGATIVE = 'dotted, noise, blur, lowres, smooth'   # SeeSR's defaults (both methods)
_ADDED = 'clean, high-resolution, 8k'
_CAPTION = ('a detailed photograph of an old stone bridge over a slow river in autumn light with red and yellow '
            'trees on both banks reflections on the water a small boat moored under the arch moss on the wet '
            'stones soft clouds in a pale blue sky and distant hills fading into haze')


def sd15_random(channel_scale: float, device, seed: int = 0):
    """SD 1.5 parts (random weights, widths x ``channel_scale``) as ``SDComponents`` + a CLIP
    ViT-L/14 vision tower narrowed the same way."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

    from dalpsr.archs.sd_components import SDComponents, _narrow, _scaled
    from dalpsr.archs.sspir_arch import sd15_configs
    from dalpsr.utils.clip_tokenizer import offline_clip_tokenizer
    c = sd15_configs()
    s = float(channel_scale)
    if s != 1:
        u, v, t, cv = c['unet'], c['vae'], c['text_encoder'], c['clip_vision']
        _narrow(u, s, [u['attention_head_dim']] * len(u['block_out_channels']), 'UNet')
        _narrow(v, s, None, 'VAE')
        for cfg, what in ((t, 'text encoder'), (cv, 'CLIP vision')):
            cfg['hidden_size'] = _scaled(cfg['hidden_size'], s, cfg['num_attention_heads'], what)
            cfg['intermediate_size'] = _scaled(cfg['intermediate_size'], s, 1, what + ' MLP')
            cfg['projection_dim'] = _scaled(cfg['projection_dim'], s, 1, what + ' projection')
        u['cross_attention_dim'] = t['hidden_size']
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(c['unet'])
            vae = AutoencoderKL.from_config(c['vae'])
            te = CLIPTextModel(CLIPTextConfig(**c['text_encoder']))
            vision = CLIPVisionModel(CLIPVisionConfig(**c['clip_vision']))
    finally:
        torch.random.set_rng_state(state)
    sched = DDPMScheduler.from_config(c['scheduler'])
    comps = SDComponents(vae=vae.eval(), unet=unet.eval(), text_encoder=te.eval(), tokenizer=offline_clip_tokenizer(77),
                         noise_scheduler=sched, scheduler_config=dict(sched.config),
                         source={'pretrained': f'random SD 1.5 architecture (channel_scale {s})'})
    return comps, vision.eval()


def peak_mb(device: torch.device) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(args) -> dict:
    """Train steps (and restorer calls) of one method in this process."""
    from accelerate import Accelerator
    use_cpu = args.device == 'cpu'
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=args.precision)
    device = accelerator.device
    t0 = time.perf_counter()
    comps, vision = sd15_random(args.channel_scale, device)
    s = args.channel_scale
    if args.method == 'sspir':
        from dalpsr.models.sspir_model import SSPIRModel
        opt = {'name': 'bench', 'seed': 0, '_source': 'bench_sspir.py',
               'model': {'type': 'SSPIRModel', 'gradient_checkpointing': bool(args.checkpointing),
                         'arch': {'image_dim': int(512 * s)}, 'caption_dropout': 0.0}}
        model = SSPIRModel(opt, accelerator, components=comps, clip_vision=vision)
    else:
        from dalpsr.models.dalpsr_model import DaLPSRModel
        opt = {'name': 'bench', 'seed': 0, '_source': 'bench_sspir.py',
               'model': {'type': 'DaLPSRModel', 'gradient_checkpointing': bool(args.checkpointing),
                         'prompt': {'caption_dropout': 0.0, 'restoration_dropout': 0.0, 'empty_dropout': 0.0}}}
        model = DaLPSRModel(opt, accelerator, components=comps)
    build_s = time.perf_counter() - t0
    nets = model.trainable_modules()
    params = [p for m in nets.values() for p in m.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=5e-5, weight_decay=1e-2)
    prepared = accelerator.prepare(*nets.values(), optimizer)
    model.set_prepared(dict(zip(nets, prepared[:-1])))
    optimizer = prepared[-1]

    b, sz = args.batch, args.size
    g = torch.Generator().manual_seed(0)
    batch = {'gt': torch.rand(b, 3, sz, sz, generator=g), 'lq': torch.rand(b, 3, sz // 4, sz // 4, generator=g),
             'prompt': ['Deblur with sigma 0.5~0.75, Denoise with sigma 0~0.25, Dejpeg with sigma 0.25~0.5'] * b,
             'caption': [_CAPTION] * b, 'index': torch.arange(b)}

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    def step(i):
        with accelerator.autocast():
            out = model.training_step(batch, i)
        accelerator.backward(out['loss'])
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out['loss'].detach())

    losses = [step(i) for i in range(args.warmup)]
    sync()
    t, c = time.perf_counter(), time.process_time()
    for i in range(args.steps):
        losses.append(step(args.warmup + i))
    sync()
    res = {'method': args.method, 'sec_per_step': (time.perf_counter() - t) / args.steps,
           'cpu_sec_per_step': (time.process_time() - c) / args.steps,
           'train_peak_mb': peak_mb(device), 'trainable_m': trainable / 1e6, 'build_s': build_s,
           'loss_finite': all(math.isfinite(v) for v in losses), 'device': str(device),
           'device_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
           'threads': torch.get_num_threads()}
    if args.infer:
        res.update(run_infer(args, model, device, sync))
    return res


def run_infer(args, model, device, sync) -> dict:
    """s/img of the method's restorer on the shared loop (networks of ``model``, no export)."""
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    dtype = 'fp16' if args.precision == 'fp16' else ('bf16' if args.precision == 'bf16' else 'fp32')
    settings = {'num_steps': args.infer_steps, 'scheduler': 'ddpm'}
    if args.method == 'sspir':
        from dalpsr.restorers.sspir import SSPIR
        r = SSPIR.from_model(model, device=str(device), dtype=dtype, sampler=dict(settings, guidance_scale=7.5),
                             negative_prompt=_NEGATIVE, added_prompt=_ADDED)
        run = lambda i: r.restore(lq, seeds=[i], captions=[_CAPTION])  # noqa: E731
    else:
        from dalpsr.pipelines.sampler import DaLPSRSampler
        cn = model.unwrap(model.controlnet)
        sampler = DaLPSRSampler(model.components, cn, scale=4, device=device, dtype=dtype, max_chunks=3)
        prompt = f'Deblur with sigma 0.5~0.75. {_CAPTION}. {_ADDED}'
        run = lambda i: sampler(lq, [prompt], negative_prompt=_NEGATIVE, seed=[i], guidance_scale=5.5,  # noqa: E731
                                **settings)
    lq = torch.rand(1, 3, args.size // 4, args.size // 4, generator=torch.Generator().manual_seed(1))
    for _ in range(args.infer_warmup):
        run(0)
    sync()
    t, c = time.perf_counter(), time.process_time()
    for i in range(args.infer_runs):
        out = run(i)
    sync()
    return {'sec_per_img': (time.perf_counter() - t) / args.infer_runs,
            'cpu_sec_per_img': (time.process_time() - c) / args.infer_runs, 'infer_peak_mb': peak_mb(device),
            'sr_shape': list(out.shape), 'sr_finite': bool(torch.isfinite(out).all())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    p.add_argument('--size', type=int, default=None, help='HR / output side in px (default 512 GPU, 64 CPU)')
    p.add_argument('--batch', type=int, default=None, help='training batch (default 4 GPU, 1 CPU)')
    p.add_argument('--precision', default=None, choices=('no', 'fp16', 'bf16'),
                   help='train.mixed_precision (default fp16 GPU as the paper, no on CPU)')
    p.add_argument('--checkpointing', default='on', choices=('on', 'off'))
    p.add_argument('--channel-scale', type=float, default=None,
                   help='narrow every width (default 1 = SD 1.5 on GPU, 0.25 on CPU)')
    p.add_argument('--steps', type=int, default=None, help='timed train steps (default 5 GPU, 2 CPU)')
    p.add_argument('--warmup', type=int, default=1, help='untimed train steps first')
    p.add_argument('--no-infer', dest='infer', action='store_false', help='skip the s/img measurement')
    p.add_argument('--infer-steps', type=int, default=None, help='denoising steps (default 50 GPU as the paper, 4 CPU)')
    p.add_argument('--infer-runs', type=int, default=None, help='timed restorer calls (default 3 GPU, 1 CPU)')
    p.add_argument('--infer-warmup', type=int, default=1, help='untimed restorer calls first')
    p.add_argument('--methods', default=','.join(METHODS), help='comma-separated of sspir, dalpsr')
    p.add_argument('--threads', type=int, default=None, help='CPU threads (default: torch default)')
    p.add_argument('--json', default=None, help='also write the results to this JSON file')
    p.add_argument('--one', default=None, choices=METHODS, help=argparse.SUPPRESS)  # internal
    args = p.parse_args(argv)
    try:
        args.device = resolve_device(args.device)
    except ValueError as err:
        p.error(str(err))
    gpu = args.device == 'cuda'
    args.size = args.size or (512 if gpu else 64)
    args.batch = args.batch or (4 if gpu else 1)
    args.precision = args.precision or ('fp16' if gpu else 'no')
    args.channel_scale = args.channel_scale if args.channel_scale is not None else (1.0 if gpu else 0.25)
    args.steps = args.steps or (5 if gpu else 2)
    args.infer_steps = args.infer_steps or (50 if gpu else 4)
    args.infer_runs = args.infer_runs or (3 if gpu else 1)
    if args.size % 64:
        p.error(f'--size must be a multiple of 64, got {args.size}')
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        args.method = args.one
        args.checkpointing = args.checkpointing == 'on'
        print('RESULT ' + json.dumps(run_one(args)), flush=True)
        return 0
    methods = [m.strip() for m in args.methods.split(',') if m.strip()]
    if any(m not in METHODS for m in methods):
        p.error(f'--methods takes {", ".join(METHODS)}')
    env = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONPATH=str(REPO))
    print(f'SSP-IR vs DaLPSR on the SD 1.5 architecture x {args.channel_scale} widths, random weights; {args.device}, '
          f'{args.size} px, batch {args.batch}, precision {args.precision}, checkpointing {args.checkpointing}; '
          f'{args.warmup}+{args.steps} train steps'
          + (f', {args.infer_warmup}+{args.infer_runs} restorer calls of {args.infer_steps} DDPM steps' if args.infer
             else ''), flush=True)
    results = {}
    for m in methods:
        cmd = [sys.executable, os.path.abspath(__file__), '--one', m, '--device', args.device, '--size', str(args.size),
               '--batch', str(args.batch), '--precision', args.precision, '--checkpointing', args.checkpointing,
               '--channel-scale', str(args.channel_scale), '--steps', str(args.steps), '--warmup', str(args.warmup),
               '--infer-steps', str(args.infer_steps), '--infer-runs', str(args.infer_runs),
               '--infer-warmup', str(args.infer_warmup)]
        if not args.infer:
            cmd.append('--no-infer')
        if args.threads:
            cmd += ['--threads', str(args.threads)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith('RESULT ')]
        if r.returncode or not line:
            err = (r.stderr.strip().splitlines() or ['?'])[-1]
            results[m] = {'method': m, 'error': 'OOM' if 'out of memory' in r.stderr.lower() else err[:300]}
            print(f'  {m}: FAILED ({results[m]["error"]})', flush=True)
            continue
        results[m] = json.loads(line[-1][7:])
        x = results[m]
        print(f'  {m:7s}: {x["sec_per_step"]:8.3f} s/step  train peak {x["train_peak_mb"]:8.0f} MiB  trainable '
              f'{x["trainable_m"]:7.2f} M' + (f'  | {x["sec_per_img"]:8.3f} s/img  peak {x["infer_peak_mb"]:8.0f} MiB'
                                              if 'sec_per_img' in x else ''), flush=True)
    ok = {k: v for k, v in results.items() if 'error' not in v}
    dev = next(iter(ok.values()))['device_name'] if ok else args.device
    print()
    print(f'| method | s/train step | trainable params | s/img | ({dev}, {args.size} px, x{args.channel_scale} widths) |')
    print('|---|---|---|---|---|')
    for m, x in results.items():
        if 'error' in x:
            print(f'| {m} | {x["error"]} | | | |')
        else:
            img = f'{x["sec_per_img"]:.3f}' if 'sec_per_img' in x else '-'
            print(f'| {m} | {x["sec_per_step"]:.3f} | {x["trainable_m"]:.2f} M | {img} | |')
    if 'sspir' in ok and 'dalpsr' in ok:
        a, b = ok['sspir'], ok['dalpsr']
        line = f'SSP-IR / DaLPSR: train step x{a["sec_per_step"] / b["sec_per_step"]:.2f}'
        if 'sec_per_img' in a and 'sec_per_img' in b:
            line += f', s/img x{a["sec_per_img"] / b["sec_per_img"]:.2f}'
        print(line + f', trainable params x{a["trainable_m"] / b["trainable_m"]:.2f}')
        if args.device == 'cpu':  # process CPU time: robust to other jobs on a shared machine (1 thread: = compute)
            line = (f'CPU time (process_time, {a["threads"]} thread(s)): train step {a["cpu_sec_per_step"]:.2f} vs '
                    f'{b["cpu_sec_per_step"]:.2f} s (x{a["cpu_sec_per_step"] / b["cpu_sec_per_step"]:.2f})')
            if 'cpu_sec_per_img' in a and 'cpu_sec_per_img' in b:
                line += (f', per image {a["cpu_sec_per_img"]:.2f} vs {b["cpu_sec_per_img"]:.2f} s '
                         f'(x{a["cpu_sec_per_img"] / b["cpu_sec_per_img"]:.2f})')
            print(line)
    if args.json:
        from dalpsr.utils.misc import atomic_write_json
        atomic_write_json(args.json, {'args': {k: v for k, v in vars(args).items() if k != 'one'}, 'results': results})
    return 0 if len(ok) == len(results) else 1


if __name__ == '__main__':
    sys.exit(main())
