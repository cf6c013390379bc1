#!/usr/bin/env python
"""Per-stage time of the tiny random stand-in on one large LR, for each stand-in layout.

    python benchmarks/bench_tiny_standin.py [--lr 448x640] [--steps 2] [--threads 1] [--layouts fast,sd]

Builds the stand-ins (dalpsr/inference/tiny.py) in a temporary folder and restores one smooth
random LR with DaLPSR's restorer (test.py's defaults: DDIM here, CFG 5.5, 96/32 latent tiles,
1024 px encoder tiles, 224 latent px decoder tiles, adain). Prints VAE encode, denoising steps and
VAE decode seconds (the records' encode_s / denoise_s / decode_s) and the share of
scaled_dot_product_attention (cProfile). Figures depend on the machine's load: compare layouts
within one run.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(layout: str, root: Path, hw, steps: int):
    import torch

    from dalpsr.inference.options import TEST_DEFAULTS
    from dalpsr.inference.tiny import build_tiny_dalpsr
    from dalpsr.restorers.dalpsr_diffusion import DaLPSRDiffusion
    paths = build_tiny_dalpsr(root / layout, layout=layout)
    model = dict(TEST_DEFAULTS['model'], path=paths['dalpsr'], device='cpu', dtype='fp32')
    sampler = dict(TEST_DEFAULTS['sampler'], num_steps=steps, scheduler='ddim')
    r = DaLPSRDiffusion(model, sampler, device='cpu')
    r.sampler()
    g = torch.Generator().manual_seed(0)
    lq = torch.nn.functional.interpolate(torch.rand(1, 3, hw[0] // 8, hw[1] // 8, generator=g), size=hw,
                                         mode='bilinear', align_corners=False)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    sr = r.restore(lq, seeds=[0])
    prof.disable()
    total = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats
    attn = sum(v[3] for k, v in stats.items() if 'scaled_dot_product_attention' in k[2])
    return total, r.last_stats, attn, tuple(sr.shape[-2:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--lr', default='448x640', help='LR size HxW (default 448x640 -> 1792x2560)')
    p.add_argument('--steps', type=int, default=2)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--layouts', default='fast,sd', help='comma-separated: fast, sd')
    args = p.parse_args(argv)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    import torch
    torch.set_num_threads(args.threads)
    hw = tuple(int(v) for v in args.lr.lower().split('x'))
    print(f'LR {hw[0]}x{hw[1]}, {args.steps} DDIM steps, CFG, {args.threads} thread(s), '
          f'load average {os.getloadavg()[0]:.1f}')
    print('| layout | SR size | total s | VAE encode s | denoise s | VAE decode s | attention share |')
    print('|---|---|---|---|---|---|---|')
    with tempfile.TemporaryDirectory() as tmp:
        for layout in args.layouts.split(','):
            total, st, attn, size = run(layout.strip(), Path(tmp), hw, args.steps)
            print(f"| {layout} | {size[0]}x{size[1]} | {total:.1f} | {st['encode_s']:.1f} | {st['denoise_s']:.1f} | "
                  f"{st['decode_s']:.1f} | {100 * attn / total:.0f} % |", flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
