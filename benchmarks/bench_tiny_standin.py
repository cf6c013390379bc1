#!/usr/bin/env python
"""Per-stage time of the tiny random stand-in on one large LR, per stand-in layout and allocator setting.

    python benchmarks/bench_tiny_standin.py [--lr 448x640] [--steps 2] [--threads 1] [--layouts fast,sd]
                                            [--malloc reuse,default] [--profile]

Builds the stand-ins (dalpsr/inference/tiny.py) in a temporary folder and restores one smooth
random LR with DaLPSR's restorer (test.py's defaults: DDIM here, CFG 5.5, 96/32 latent tiles,
1024 px encoder tiles, 224 latent px decoder tiles, adain), once per layout x ``--malloc`` value:
``reuse`` is what the denoising loop does on a CPU (dalpsr/pipelines/cpu_memory.py: freed memory
stays in the heap), ``default`` is glibc's own behaviour (``DALPSR_CPU_MALLOC=default``).
Prints wall seconds and the process's CPU seconds (user + system) of the whole call and of VAE
encode, denoising steps and VAE decode (+ color fix) (wall: the records' encode_s / denoise_s /
decode_s), minor page faults, and the max abs difference of each output from the first row of
its layout (0: the allocator does not change the result). On a machine shared with other jobs
the wall seconds grow with the load, the CPU seconds much less: compare rows of one run.
``--profile``: also the share of the wall time spent in scaled_dot_product_attention (cProfile).
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYOUTS = ('fast', 'sd')
MALLOC = ('reuse', 'default')


def restorer(paths, steps: int):
    from dalpsr.inference.options import TEST_DEFAULTS
    from dalpsr.restorers.dalpsr_diffusion import DaLPSRDiffusion
    model = dict(TEST_DEFAULTS['model'], path=paths['dalpsr'], device='cpu', dtype='fp32')
    sampler = dict(TEST_DEFAULTS['sampler'], num_steps=steps, scheduler='ddim')
    r = DaLPSRDiffusion(model, sampler, device='cpu')
    r.sampler()
    return r


def run(r, lq, malloc: str, profile: bool):
    """One restore; returns (output, figures)."""
    from dalpsr.pipelines.loop import DenoisingLoop
    clocks = []
    wall_now = DenoisingLoop._now

    def now(self):  # the loop's stage clock, with the CPU clock beside it
        clocks.append(time.process_time())
        return wall_now(self)

    os.environ['DALPSR_CPU_MALLOC'] = malloc
    prof = cProfile.Profile() if profile else None
    DenoisingLoop._now = now
    try:
        ru0, c0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
        if prof:
            prof.enable()
        sr = r.restore(lq, seeds=[0])
        if prof:
            prof.disable()
        wall, cpu, ru1 = time.perf_counter() - t0, time.process_time() - c0, resource.getrusage(resource.RUSAGE_SELF)
    finally:
        DenoisingLoop._now = wall_now
        os.environ.pop('DALPSR_CPU_MALLOC', None)
    st = r.last_stats
    fig = dict(wall=wall, cpu=cpu, faults=ru1.ru_minflt - ru0.ru_minflt, stages_wall=(st['encode_s'], st['denoise_s'], st['decode_s']),
               stages_cpu=tuple(clocks[i + 1] - clocks[i] for i in (0, 2, 4)), attn=None)
    if prof:
        stats = pstats.Stats(prof).stats
        fig['attn'] = sum(v[3] for k, v in stats.items() if 'scaled_dot_product_attention' in k[2]) / wall
    return sr, fig


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--lr', default='448x640', help='LR size HxW (default 448x640 -> 1792x2560)')
    p.add_argument('--steps', type=int, default=2)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--layouts', default='fast,sd', help='comma-separated: fast, sd')
    p.add_argument('--malloc', default='reuse,default', help='comma-separated: reuse (the loop on a CPU), default (glibc)')
    p.add_argument('--profile', action='store_true', help='also the share of scaled_dot_product_attention (cProfile)')
    args = p.parse_args(argv)
    for name, allowed in (('layouts', LAYOUTS), ('malloc', MALLOC)):
        vals = [v.strip() for v in getattr(args, name).split(',') if v.strip()]
        bad = [v for v in vals if v not in allowed]
        if bad or not vals:
            p.error(f"--{name}: use a comma-separated subset of {', '.join(allowed)}, got {getattr(args, name)!r}")
        setattr(args, name, vals)
    try:
        args.hw = tuple(int(v) for v in args.lr.lower().split('x'))
        assert len(args.hw) == 2 and min(args.hw) >= 8
    except (ValueError, AssertionError):
        p.error(f'--lr: expected HxW such as 448x640, got {args.lr!r}')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    import torch

    from dalpsr.inference.tiny import build_tiny_dalpsr
    torch.set_num_threads(args.threads)
    hw = args.hw
    g = torch.Generator().manual_seed(0)
    lq = torch.nn.functional.interpolate(torch.rand(1, 3, hw[0] // 8, hw[1] // 8, generator=g), size=hw,
                                         mode='bilinear', align_corners=False)
    print(f'LR {hw[0]}x{hw[1]}, {args.steps} DDIM steps, CFG, {args.threads} thread(s), '
          f'load average {os.getloadavg()[0]:.1f}')
    print('| layout | malloc | SR size | wall s | CPU s | CPU s encode / denoise / decode | wall s encode / denoise / decode '
          '| page faults | max abs diff |' + (' attention share |' if args.profile else ''))
    print('|---|---|---|---|---|---|---|---|---|' + ('---|' if args.profile else ''))
    with tempfile.TemporaryDirectory() as tmp:
        for layout in args.layouts:
            r = restorer(build_tiny_dalpsr(Path(tmp) / layout, layout=layout), args.steps)
            first = None
            for malloc in args.malloc:
                sr, f = run(r, lq, malloc, args.profile)
                first = sr if first is None else first
                row = (f"| {layout} | {malloc} | {sr.shape[-2]}x{sr.shape[-1]} | {f['wall']:.1f} | {f['cpu']:.1f} | "
                       + ' / '.join(f'{v:.1f}' for v in f['stages_cpu']) + ' | '
                       + ' / '.join(f'{v:.1f}' for v in f['stages_wall'])
                       + f" | {f['faults']} | {(sr - first).abs().max().item():.1g} |")
                if args.profile:
                    row += f" {100 * f['attn']:.0f} % |"
                print(row, flush=True)
    print(f'load average at the end {os.getloadavg()[0]:.1f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
