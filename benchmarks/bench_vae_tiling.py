#!/usr/bin/env python
"""Our tiled VAE decode against diffusers' ``AutoencoderKL.enable_tiling()`` on the same VAE.

    python benchmarks/bench_vae_tiling.py [--latent 96x128] [--tile 32] [--vae tiny|fast|sd21] [--device cpu]

Both decode the same random latent with the same tile size (latent px) and an overlap of a
quarter tile (diffusers' ``tile_overlap_factor`` 0.25; ours ``vae_decoder_overlap`` = tile/4).
Prints the seconds of each (median of ``--repeats``), the time ratio ours/diffusers, and the max
abs difference of each from the untiled decode and from each other (outputs in [-1, 1]).
``--vae tiny``: the tiny stand-in VAE in SD's layout (with mid-block attention); ``fast``: the VAE
of the default ``fast`` stand-in (dalpsr/inference/tiny.py); ``sd21``: SD 2.1-base's VAE config with
random weights (dalpsr/archs/configs; slow on a CPU). Both decodes run inside the loop's CPU
allocator setting (dalpsr/pipelines/cpu_memory.py), as test.py's do.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_vae(kind: str):
    import torch
    from diffusers import AutoencoderKL

    from dalpsr.archs.sd_components import TINY_VAE
    torch.manual_seed(0)
    if kind == 'tiny':
        return AutoencoderKL(**TINY_VAE)
    if kind == 'fast':
        from dalpsr.inference.tiny import FAST_VAE
        return AutoencoderKL(**dict(TINY_VAE, **FAST_VAE))
    from dalpsr.archs.sd_components import build_sd21_base_random
    return build_sd21_base_random(parts=('vae',)).vae


def timed(fn, repeats: int, device: str):
    import torch
    times, out = [], None
    for _ in range(repeats):
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--latent', default='96x128', help='latent size HxW (x8 pixels)')
    p.add_argument('--tile', type=int, default=32, help='decoder tile in latent px')
    p.add_argument('--vae', default='tiny', choices=('tiny', 'fast', 'sd21'))
    p.add_argument('--device', default='cpu')
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--threads', type=int, default=1)
    args = p.parse_args(argv)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    import torch

    from dalpsr.pipelines.tiling import tiled_vae_decode
    torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.latent.lower().split('x'))
    vae = build_vae(args.vae).to(args.device).eval()
    z = torch.randn(1, vae.config.latent_channels, h, w, generator=torch.Generator().manual_seed(1)).to(args.device)
    t, ov = args.tile, args.tile // 4
    from dalpsr.pipelines.cpu_memory import reuse_freed_memory
    with torch.no_grad(), reuse_freed_memory(args.device == 'cpu'):
        vae.disable_tiling()
        full = vae.decode(z).sample.float()
        t_ours, ours = timed(lambda: tiled_vae_decode(vae, z, tile=t, overlap=ov), args.repeats, args.device)
        vae.enable_tiling()
        vae.tile_latent_min_size, vae.tile_sample_min_size, vae.tile_overlap_factor = t, 8 * t, 0.25
        t_diff, theirs = timed(lambda: vae.decode(z).sample, args.repeats, args.device)
    ours, theirs = ours.float(), theirs.float()
    print(f'VAE {args.vae}, latent {h}x{w} -> {8 * h}x{8 * w} px, tile {t} latent px (overlap {ov}), '
          f'{args.device}, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f}')
    print('| decode | s (median) | max abs diff vs untiled |')
    print('|---|---|---|')
    print(f'| ours (tiled_vae_decode, Gaussian blend) | {t_ours:.3f} | {(ours - full).abs().max():.4f} |')
    print(f'| diffusers enable_tiling (linear blend) | {t_diff:.3f} | {(theirs - full).abs().max():.4f} |')
    print(f'time ratio ours/diffusers: {t_ours / t_diff:.2f}; max abs diff ours vs diffusers: '
          f'{(ours - theirs).abs().max():.4f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
