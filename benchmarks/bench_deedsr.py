#!/usr/bin/env python
"""DeeDSR inference cost against DaLPSR's at the same size, steps and (random) SD 2.1-base weights.

Seconds per image (LR size/4 -> SR size) of

  deedsr   the DeeDSR restorer's path: shared DenoisingLoop + DeeDSRDenoiser (learner once per image,
           adapter + SPADE/attn2 UNet per step, no CFG), DDIM eta 1, noise guidance at the first step
  dalpsr   DaLPSRSampler: text encoding of prompt + negative prompt, ControlNet + UNet per step with
           classifier-free guidance (both branches in one call), LR-embedded start, AdaIN color fix

built from the published architectures with random weights (``dalpsr/archs/configs``; DeeDSR's
adapter and learner at their published sizes), optionally narrowed by ``--channel-scale`` (every
width of UNet, VAE, text encoder, ControlNet, adapter and learner times the scale). Prints a table
and the ratio deedsr / dalpsr; ``--json`` writes it.

    python benchmarks/bench_deedsr.py                  # CPU: 64 px out, 4 steps, widths x0.25, 1 thread
    python benchmarks/bench_deedsr.py --device cuda    # GPU: 128 -> 512, 50 steps, fp16, full width
                                                       #   (the paper: 7.13 s on an RTX 3090)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def build_deedsr(scale: float, dtype, device, comps):
    from dalpsr.archs.deedsr_learner_arch import DegradationResNet
    from dalpsr.models.deedsr_model import ADAPTER_DEFAULTS, build_deedsr_nets
    torch.manual_seed(3)
    with torch.device(device):
        learner = DegradationResNet(widths=[int(w * scale) for w in (128, 256, 512, 1024)], stem=max(8, int(64 * scale)))
    learner.eval().to(dtype)
    adapter = dict(ADAPTER_DEFAULTS, model_channels=int(256 * scale), out_channels=int(256 * scale))
    nets = build_deedsr_nets(comps.unet, comps.vae, comps.scheduler_config, learner, adapter,
                             spade_hidden=max(8, int(128 * scale)))
    nets.adapter.to(device=device, dtype=dtype).eval()   # SPADE/attn2 were created in fp32: cast them too
    nets.unet.to(device=device, dtype=dtype).eval()
    return nets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    p.add_argument('--size', type=int, default=None, help='SR side in px (default 64 CPU, 512 GPU); a multiple of 64')
    p.add_argument('--steps', type=int, default=None, help='sampler steps (default 4 CPU, 50 GPU)')
    p.add_argument('--channel-scale', type=float, default=None, help='width factor (default 0.25 CPU, 1 GPU)')
    p.add_argument('--precision', default=None, help='fp32 | fp16 | bf16 (default fp32 CPU, fp16 GPU)')
    p.add_argument('--repeats', type=int, default=None, help='timed runs, best kept (default 1 CPU, 3 GPU)')
    p.add_argument('--threads', type=int, default=1, help='CPU threads')
    p.add_argument('--json', default=None)
    args = p.parse_args(argv)
    gpu = args.device == 'cuda'
    size = args.size or (512 if gpu else 64)
    steps = args.steps or (50 if gpu else 4)
    scale = args.channel_scale or (1.0 if gpu else 0.25)
    prec = args.precision or ('fp16' if gpu else 'fp32')
    repeats = args.repeats or (3 if gpu else 1)
    if size % 64:
        p.error('--size must be a multiple of 64')
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from dalpsr.archs.controlnet_arch import get_controlnet_class
    from dalpsr.archs.sd_components import build_sd21_base_random, parse_dtype
    from dalpsr.pipelines.denoiser import Conditions
    from dalpsr.pipelines.loop import DenoisingLoop, SamplingSettings
    from dalpsr.pipelines.sampler import DaLPSRSampler
    from dalpsr.restorers.deedsr import SAMPLER_DEFAULTS, DeeDSRDenoiser
    dtype = parse_dtype(prec)
    g = torch.Generator().manual_seed(0)
    lq = torch.nn.functional.interpolate(torch.rand(1, 3, size // 32, size // 32, generator=g),
                                         size=(size // 4, size // 4), mode='bicubic', align_corners=False).clamp(0, 1)

    def sync():
        if gpu:
            torch.cuda.synchronize(device)

    def timed(fn):
        fn()  # warm-up
        best = float('inf')
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            out = fn()
            sync()
            best = min(best, time.perf_counter() - t)
        return best, out

    results = {'device': str(device), 'device_name': torch.cuda.get_device_name(device) if gpu else 'cpu',
               'size': size, 'steps': steps, 'channel_scale': scale, 'precision': prec, 'threads': args.threads}
    with torch.inference_mode():
        # ---- DeeDSR
        comps = build_sd21_base_random(seed=0, channel_scale=scale, dtype=dtype, device=device, parts=('unet', 'vae'))
        nets = build_deedsr(scale, dtype, device, comps)
        n_params = sum(sum(p.numel() for p in m.parameters()) for m in (nets.unet, nets.adapter, nets.learner, nets.vae))
        loop = DenoisingLoop(nets.vae, nets.scheduler_config, device=device, vae_dtype=dtype)
        den = DeeDSRDenoiser(nets, dtype)
        settings = SamplingSettings.from_opt(dict(SAMPLER_DEFAULTS, num_steps=steps))

        def deedsr():
            def cond(lr):
                d = nets.learner(lr.lq.to(device, dtype)).float()
                return Conditions(spatial={'z_lr': lr.z_lr}, shared={'d': d})
            return loop(lq, den, cond, [0], settings)
        t_d, out_d = timed(deedsr)
        results['deedsr'] = {'s_per_img': t_d, 'params_M': n_params / 1e6, 'unet_calls': loop.last_stats['unet_calls'],
                             'finite': bool(torch.isfinite(out_d).all())}
        del nets, comps, loop, den
        # ---- DaLPSR
        comps = build_sd21_base_random(seed=0, channel_scale=scale, dtype=dtype, device=device)
        torch.manual_seed(1)
        with torch.device(device):
            cn = get_controlnet_class().from_unet(comps.unet, condition_mode='latent')
        cn.to(dtype=dtype).eval()
        n_params = sum(sum(p.numel() for p in m.parameters()) for m in (comps.unet, comps.vae, comps.text_encoder, cn))
        sampler = DaLPSRSampler(comps, cn, condition_mode='latent', device=device, dtype=dtype)

        def dalpsr():
            return sampler(lq, 'Deblur with sigma 0.5~0.75, Denoise with sigma 0~0.25. a photo. clean, high-resolution, 8k',
                           negative_prompt='dotted, noise, blur, lowres, smooth', num_steps=steps, guidance_scale=5.5,
                           scheduler='ddpm', start='lr', start_step=999, seed=0, color_fix='adain')
        t_l, out_l = timed(dalpsr)
        results['dalpsr'] = {'s_per_img': t_l, 'params_M': n_params / 1e6, 'finite': bool(torch.isfinite(out_l).all())}
    results['ratio_deedsr_over_dalpsr'] = t_d / t_l
    print(f"{size // 4} -> {size} px, {steps} steps, widths x{scale}, {prec}, {results['device_name']}, "
          f"{args.threads} thread(s), best of {repeats}")
    print(f"{'method':8s} {'s/img':>9s} {'params (M)':>11s}")
    for k in ('deedsr', 'dalpsr'):
        print(f"{k:8s} {results[k]['s_per_img']:9.3f} {results[k]['params_M']:11.1f}")
    print(f"ratio deedsr / dalpsr: {results['ratio_deedsr_over_dalpsr']:.2f} "
          f"(DeeDSR: {results['deedsr']['unet_calls']} UNet calls, no CFG; DaLPSR: CFG, 2 branches per call)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        tmp = f'{args.json}.tmp'
        Path(tmp).write_text(json.dumps(results, indent=2))
        os.replace(tmp, args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())
