#!/usr/bin/env python
"""Degradation throughput, 512 -> 128: dalpsr's RealESRGANDegradation vs a basicsr reference.

The reference (benchmarks/degradation_reference.py) is assembled from basicsr's own functions in
Real-ESRGAN's order (``RealESRGANDataset.__getitem__`` kernels, then ``RealESRGANModel.feed_data``,
USMSharp of the GT included) with the parameters of train_realesrnet_x4plus.yml (REFERENCE.md
section 3), per sample (batch 1, as a data loader item; ``--ref-batch B`` shares
resize/mode/order choices within a batch as feed_data does).

Both run on the same pre-decoded 512 crops (no file I/O) with the same torch/OpenCV thread count.
The reference's random choices are recorded (its kernel and noise helpers are wrapped while it
runs) into dalpsr's params format, so the same degree function labels both: the histograms show
whether the two produce the same label distribution.

    python benchmarks/bench_degradation.py                          # 200 samples each, 1 thread
    python benchmarks/bench_degradation.py --num 500 --threads 2 --seed 0
    python benchmarks/bench_degradation.py --ref-batch 8 --device cuda   # reference on a GPU
    python benchmarks/bench_degradation.py --skip-ref --measure-noise    # cost of noise_severity: measured
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument('--num', type=int, default=200, help='samples per pipeline (after 3 warm-up samples)')
    p.add_argument('--threads', type=int, default=1, help='torch and OpenCV threads (same for both)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--gt-size', type=int, default=512)
    p.add_argument('--ref-batch', type=int, default=1, help='reference batch size (choices shared per batch)')
    p.add_argument('--device', default='cpu', help='device of the reference (ours is numpy/OpenCV on CPU)')
    p.add_argument('--rounds', type=int, default=5, help='alternate the two pipelines this many times')
    p.add_argument('--skip-ref', action='store_true', help='only time our pipeline')
    p.add_argument('--measure-noise', action='store_true',
                   help='also time ours with measure_noise=True (the measured noise labels: the chain '
                        'rendered a second time with the noise stages off), interleaved in the same rounds')
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------- main

def histogram(params_list, spec):
    from dalpsr.data.prompt_labels import degrees
    labels = np.array([spec.labels_from_degrees(degrees(p)) for p in params_list])
    return {t: np.bincount(labels[:, i], minlength=spec.num_intervals) for i, t in enumerate(spec.types)}


def _sync(device):
    import torch
    if str(device).startswith('cuda'):
        torch.cuda.synchronize()


def main(argv=None):
    args = parse_args(argv)
    import cv2
    import torch
    from dalpsr.data.degradations import RealESRGANDegradation
    from dalpsr.data.prompt_labels import PromptSpec
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    load = os.getloadavg() if hasattr(os, 'getloadavg') else (float('nan'),) * 3
    print(f'load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} CPUs); '
          f'threads={args.threads}, {args.gt_size} -> {args.gt_size // 4}, {args.num} samples each (reference: '
          f'whole batches) in {args.rounds} interleaved rounds, seed {args.seed}')
    n_crops = min(args.num, 32)
    crops = make_crops(n_crops, args.gt_size, args.seed)
    spec = PromptSpec()
    warm = 3
    deg = RealESRGANDegradation()
    rng = np.random.default_rng(args.seed)
    ref = rec = None
    if not args.skip_ref:
        t0 = time.perf_counter()
        ref = BasicsrReference(args.device)
        print(f'(basicsr import + setup {time.perf_counter() - t0:.1f} s, not timed)')
        ref.seed(args.seed)
        rec = Recorder(ref.deg).__enter__()
    bsz = max(1, args.ref_batch)
    for i in range(warm):
        deg(crops[i % n_crops], rng)
        if ref is not None:
            ref.run_batch([crops[i % n_crops]] * bsz, rec)
    # interleaved rounds: a change of machine load affects both pipelines alike
    ours_params, ref_params = [], []
    t_ours = t_ref = t_meas = 0.0
    deg_m = RealESRGANDegradation(measure_noise=True) if args.measure_noise else None
    rng_m = np.random.default_rng(args.seed)
    if deg_m is not None:
        for i in range(warm):
            deg_m(crops[i % n_crops], rng_m)
    per_round = [args.num // args.rounds + (r < args.num % args.rounds) for r in range(args.rounds)]
    k_ours = k_ref = 0
    for n_r in per_round:
        t = time.perf_counter()
        for _ in range(n_r):
            ours_params.append(deg(crops[k_ours % n_crops], rng)['params'])
            k_ours += 1
        t_ours += time.perf_counter() - t
        if deg_m is not None:
            t = time.perf_counter()
            for j in range(n_r):
                deg_m(crops[(k_ours - n_r + j) % n_crops], rng_m)
            t_meas += time.perf_counter() - t
        if ref is None:
            continue
        _sync(args.device)
        t = time.perf_counter()
        target = k_ref + n_r
        while k_ref < target:
            _, prm = ref.run_batch([crops[(k_ref + j) % n_crops] for j in range(bsz)], rec)
            ref_params.extend(prm)
            k_ref += bsz
        _sync(args.device)
        t_ref += time.perf_counter() - t
    if rec is not None:
        rec.__exit__(None, None, None)
    sps_ours = k_ours / t_ours
    print(f'ours (numpy/OpenCV, CPU)  : {sps_ours:8.2f} samples/s  ({1000 * t_ours / k_ours:.1f} ms/sample)')
    results = {'ours_sps': sps_ours}
    if deg_m is not None:
        results.update(measured_sps=k_ours / t_meas, measured_cost=t_meas / t_ours)
        print(f'ours, measure_noise=True  : {k_ours / t_meas:8.2f} samples/s  ({1000 * t_meas / k_ours:.1f} ms/sample, '
              f'{t_meas / t_ours:.2f}x the time of ours)')
    if ref is not None:
        sps_ref = k_ref / t_ref
        results.update(ref_sps=sps_ref, ratio=sps_ours / sps_ref)
        print(f'basicsr reference ({args.device}, batch {bsz}): {sps_ref:8.2f} samples/s  '
              f'({1000 * t_ref / k_ref:.1f} ms/sample)')
        print(f'ratio ours / reference    : {sps_ours / sps_ref:8.2f}x')
    print(f'label histograms (K={spec.num_intervals}, counts per interval of the degree)')
    hists = {'ours': histogram(ours_params, spec)}
    if ref is not None:
        hists['reference'] = histogram(ref_params, spec)
    for name, h in hists.items():
        for typ, c in h.items():
            share = ' '.join(f'{100 * x / c.sum():4.0f}%' for x in c)
            print(f'  {name:9s} {typ:6s} {str(c.tolist()):24s} {share}')
    load = os.getloadavg() if hasattr(os, 'getloadavg') else (float('nan'),) * 3
    print(f'load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}')
    return results


if __name__ == '__main__':
    main()
