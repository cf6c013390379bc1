#!/usr/bin/env python
"""Do our LR images follow the reference's distribution? Two-sample KS test per LR statistic.

dalpsr's RealESRGANDegradation (x4plus defaults) and Real-ESRGAN's chain assembled from basicsr
(benchmarks/degradation_reference.py, USMSharp of the GT included, batch 1 = one data loader
item) degrade the same sequence of random crops of the photos shipped in packages, ``--num``
samples each, every random choice drawn independently by each pipeline from its own seed. For
each LR image a few statistics are measured (luma mean / std, mean gradient, Laplacian variance,
Immerkaer noise sigma, high-frequency power share, 8x8 blockiness, chroma std, clipped share);
for each statistic the two samples are compared with scipy's two-sample Kolmogorov-Smirnov test
(statistic D and p-value printed; with 9 statistics, p < 0.05 / 9 is a Bonferroni-significant
difference at 5 %).

Cost: the reference's USMSharp is a 51x51 convolution (seconds per 512 crop on one CPU thread);
``--usm-cache`` (default) sharpens each distinct crop once with basicsr's USMSharp and feeds the
reference the sharpened crop with its own USM off: identical LR, since USMSharp is deterministic.

    python benchmarks/bench_degradation_ks.py                       # 2000 samples, 256 crops -> 64
    python benchmarks/bench_degradation_ks.py --gt-size 128         # 2000 samples, 128 crops -> 32
    python benchmarks/bench_degradation_ks.py --num 300 --gt-size 512 --crops 100
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # dalpsr and benchmarks importable

import numpy as np  # noqa: E402

from benchmarks.degradation_reference import BasicsrReference, Recorder, make_crops  # noqa: E402

STATS = ('luma_mean', 'luma_std', 'grad_mean', 'lap_var', 'noise_sigma', 'hf_power', 'blockiness',
         'chroma_std', 'clipped')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument('--num', type=int, default=2000, help='samples per pipeline')
    p.add_argument('--gt-size', type=int, default=256, help='HR crop size (LR = gt_size / 4)')
    p.add_argument('--crops', type=int, default=200, help='distinct crops, cycled by both pipelines')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=1, help='torch and OpenCV threads')
    p.add_argument('--no-usm-cache', action='store_true', help="run the reference's USMSharp per sample")
    p.add_argument('--progress', type=int, default=250, help='print progress to stderr every N samples (0: never)')
    return p.parse_args(argv)


def lr_statistics(lq: np.ndarray) -> dict:
    """Statistics of one LR image (HxWx3 float RGB in [0, 1]); see the module doc."""
    import cv2
    x = lq.astype(np.float64)
    y = x @ np.array([0.299, 0.587, 0.114])
    cb, cr = (x[..., 2] - y) * 0.564, (x[..., 0] - y) * 0.713
    dx, dy = np.abs(np.diff(y, axis=1)), np.abs(np.diff(y, axis=0))
    lap = cv2.Laplacian(y, cv2.CV_64F)
    m = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float64)
    h, w = y.shape
    resp = cv2.filter2D(y, -1, m)[1:-1, 1:-1]
    noise = np.sqrt(np.pi / 2) * np.abs(resp).sum() / (6 * (w - 2) * (h - 2)) * 255
    f = np.abs(np.fft.fftshift(np.fft.fft2(y - y.mean()))) ** 2
    fy, fx = np.meshgrid(np.fft.fftshift(np.fft.fftfreq(h)), np.fft.fftshift(np.fft.fftfreq(w)), indexing='ij')
    r = np.hypot(fx, fy)
    hf = f[r > 0.25].sum() / max(f.sum(), 1e-12)
    # 8x8 grid: differences across block boundaries vs inside blocks (columns and rows)
    edge = np.concatenate([dx[:, 7::8].ravel(), dy[7::8, :].ravel()])
    inner = np.concatenate([np.delete(dx, np.s_[7::8], axis=1).ravel(), np.delete(dy, np.s_[7::8], axis=0).ravel()])
    block = edge.mean() / max(inner.mean(), 1e-6)
    clipped = np.mean((lq <= 0.5 / 255) | (lq >= 254.5 / 255))
    return {'luma_mean': y.mean() * 255, 'luma_std': y.std() * 255, 'grad_mean': (dx.mean() + dy.mean()) * 255,
            'lap_var': lap.var() * 255 ** 2, 'noise_sigma': noise, 'hf_power': hf, 'blockiness': block,
            'chroma_std': np.hypot(cb.std(), cr.std()) * 255, 'clipped': clipped}


def main(argv=None):
    args = parse_args(argv)
    import cv2
    import torch
    from scipy.stats import ks_2samp
    from dalpsr.data.degradations import RealESRGANDegradation
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    t_start = time.perf_counter()
    crops = make_crops(min(args.crops, args.num), args.gt_size, args.seed)
    ref = BasicsrReference(gt_usm=args.no_usm_cache)
    ref_inputs = crops
    if not args.no_usm_cache:
        with torch.no_grad():
            ref_inputs = [ref.usm_sharpener(torch.from_numpy(np.ascontiguousarray(c.transpose(2, 0, 1)))[None])[0]
                          .numpy().transpose(1, 2, 0).copy() for c in crops]
    deg = RealESRGANDegradation()
    rng = np.random.default_rng(args.seed)
    ref.seed(args.seed)
    ours, theirs = [], []
    t_ours = t_ref = 0.0
    with Recorder(ref.deg) as rec:
        for i in range(args.num):
            k = i % len(crops)
            t = time.perf_counter()
            lq = deg(crops[k], rng)['lq']
            t_ours += time.perf_counter() - t
            ours.append(lr_statistics(lq))
            t = time.perf_counter()
            lq_ref, _ = ref.run_batch([ref_inputs[k]], rec)
            t_ref += time.perf_counter() - t
            rec.noise_tensors.clear()
            theirs.append(lr_statistics(lq_ref[0].numpy().transpose(1, 2, 0)))
            if args.progress and (i + 1) % args.progress == 0:
                print(f'  {i + 1} / {args.num} (ours {t_ours:.0f} s, reference {t_ref:.0f} s)', file=sys.stderr, flush=True)
    load = os.getloadavg()
    print(f'{args.num} samples per pipeline, {args.gt_size} -> {args.gt_size // 4}, {len(crops)} distinct crops, '
          f'seed {args.seed}, {args.threads} thread(s); ours {t_ours:.0f} s, reference {t_ref:.0f} s, '
          f'total {time.perf_counter() - t_start:.0f} s (load average {load[0]:.1f})')
    print(f"{'statistic':12s} {'ours mean':>10s} {'ref mean':>10s} {'ours sd':>9s} {'ref sd':>9s} {'KS D':>7s} {'p':>9s}")
    results = {}
    for s in STATS:
        a = np.array([o[s] for o in ours])
        b = np.array([o[s] for o in theirs])
        res = ks_2samp(a, b)
        results[s] = (float(res.statistic), float(res.pvalue))
        flag = '  *' if res.pvalue < 0.05 / len(STATS) else ''
        print(f'{s:12s} {a.mean():10.4g} {b.mean():10.4g} {a.std():9.4g} {b.std():9.4g} {res.statistic:7.4f} '
              f'{res.pvalue:9.3g}{flag}')
    print(f'(* = p < 0.05/{len(STATS)}: the two distributions differ, Bonferroni-corrected 5 % level)')
    return results


if __name__ == '__main__':
    main()
