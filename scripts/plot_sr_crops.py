#!/usr/bin/env python
"""A figure of SR crops side by side: LR (nearest-upscaled), each method, HR; one row per image.

    python scripts/plot_sr_crops.py --lr LR --gt GT --sr bicubic=results/bic dat=results/dat \
        realdat=results/realdat --images kodim05 0801 --crop 128 --out figs/deplsr_cpu_crops.png

Each row shows the same ``--crop`` x ``--crop`` HR-resolution window (the centre, or ``--at Y X``
in HR pixels for all rows) with the PSNR-Y (dB) of each SR crop against the HR crop in its title.
The figure is written atomically. The code is dalpsr/compare/figure.py (scripts/compare.py draws
the same figure for a comparison).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--lr', required=True)
    p.add_argument('--gt', required=True)
    p.add_argument('--sr', nargs='+', required=True, metavar='NAME=DIR')
    p.add_argument('--images', nargs='+', required=True, help='image stems (one row each)')
    p.add_argument('--crop', type=int, default=128)
    p.add_argument('--at', type=int, nargs=2, default=None, metavar=('Y', 'X'))
    p.add_argument('--out', required=True)
    args = p.parse_args(argv)
    from dalpsr.compare.figure import crops_figure
    methods = [s.split('=', 1) for s in args.sr]
    if any(len(m) != 2 for m in methods):
        print('error: --sr takes NAME=DIR items', file=sys.stderr)
        return 2
    try:
        crops_figure(args.lr, args.gt, [tuple(m) for m in methods], args.images, args.out, args.crop, args.at)
    except FileNotFoundError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    print(f'written: {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
