#!/usr/bin/env python
"""Pre-generate degraded LR crops + interval labels into one .npz (dalpsr.data.lr_cache).

    python scripts/make_lr_cache.py --out datasets/irpad/train_256.npz --hr sample:train \
        --num 24000 --gt-size 256 --seed 1 --workers 2
    python scripts/make_lr_cache.py --out datasets/irpad/heldout_512.npz --hr sample:val \
        --num 2000 --gt-size 512 --seed 2

--hr: 'sample:train' / 'sample:val' (photos shipped in installed packages) or an HR folder.
Deterministic from --seed whatever --workers; refuses to overwrite without --overwrite.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', required=True, help='output .npz file')
    p.add_argument('--hr', default='sample:train', help="HR images: 'sample:train', 'sample:val' or a folder")
    p.add_argument('--num', type=int, default=1000, help='number of samples')
    p.add_argument('--gt-size', type=int, default=256, help='HR crop size (LR = gt_size / scale)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--workers', type=int, default=1)
    p.add_argument('--noise-severity', choices=('params', 'measured'), default='params',
                   help='noise labels from the recorded params or from the noise measured in each LR')
    p.add_argument('--hr-limit', type=int, default=None,
                   help='use only this many of the HR photos (a fixed random subset; smaller ones nested in larger)')
    p.add_argument('--overwrite', action='store_true')
    args = p.parse_args(argv)
    from dalpsr.data.lr_cache import build_lr_cache, load_lr_cache
    t = time.time()
    try:
        build_lr_cache(args.out, hr=args.hr, num_samples=args.num, gt_size=args.gt_size, seed=args.seed,
                       workers=args.workers, overwrite=args.overwrite,
                       prompt={'noise_severity': args.noise_severity}, hr_limit=args.hr_limit)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    dt = time.time() - t
    data = load_lr_cache(args.out)
    import numpy as np
    print(f'{args.out}: {len(data["lq"])} samples, LR {data["lq"].shape[1]}x{data["lq"].shape[2]}, '
          f'{dt:.1f} s ({len(data["lq"]) / dt:.1f} samples/s, {args.workers} worker(s))')
    for t_i, name in enumerate(data['meta']['prompt']['types']):
        hist = np.bincount(data['labels'][:, t_i], minlength=data['meta']['prompt']['num_intervals'])
        print(f'  {name:6s} interval histogram: {hist.tolist()}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
