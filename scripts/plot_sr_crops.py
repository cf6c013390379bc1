#!/usr/bin/env python
"""A figure of SR crops side by side: LR (nearest-upscaled), each method, HR; one row per image.

    python scripts/plot_sr_crops.py --lr LR --gt GT --sr bicubic=results/bic dat=results/dat \
        realdat=results/realdat --images kodim05 0801 --crop 128 --out figs/deplsr_cpu_crops.png

Each row shows the same ``--crop`` x ``--crop`` HR-resolution window (the centre, or ``--at Y X``
in HR pixels for all rows) with the PSNR-Y (dB) of each SR crop against the HR crop in its title.
The figure is written atomically.
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
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    import torch
    from dalpsr.models.realdat_model import psnr_y
    from dalpsr.utils.img_io import read_image
    from dalpsr.utils.misc import atomic_path

    def find(folder, stem):
        for ext in ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp'):
            path = os.path.join(folder, stem + ext)
            if os.path.isfile(path):
                return read_image(path)
        raise FileNotFoundError(f'{stem}: no image in {folder}')

    methods = [s.split('=', 1) for s in args.sr]
    if any(len(m) != 2 for m in methods):
        print('error: --sr takes NAME=DIR items', file=sys.stderr)
        return 2
    cols = 2 + len(methods)
    fig, axes = plt.subplots(len(args.images), cols, figsize=(2.2 * cols, 2.35 * len(args.images)), dpi=130,
                             squeeze=False)
    try:
        for r, stem in enumerate(args.images):
            gt = find(args.gt, stem)
            lr = find(args.lr, stem)
            s = gt.shape[0] // lr.shape[0]
            c = args.crop
            y, x = args.at if args.at else ((gt.shape[0] - c) // 2, (gt.shape[1] - c) // 2)
            y, x = (y // s) * s, (x // s) * s
            hr_crop = gt[y:y + c, x:x + c]
            lr_crop = np.repeat(np.repeat(lr[y // s:(y + c) // s, x // s:(x + c) // s], s, 0), s, 1)
            panels = [('LR (x%d nearest)' % s, lr_crop)]
            for name, folder in methods:
                crop = find(folder, stem)[y:y + c, x:x + c]
                t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None]  # noqa: E731
                panels.append((f'{name} {psnr_y(t(crop), t(hr_crop)).item():.2f} dB', crop))
            panels.append(('HR', hr_crop))
            for k, (title, img) in enumerate(panels):
                ax = axes[r][k]
                ax.imshow(np.clip(img, 0, 1), interpolation='nearest')
                ax.set_title(title, fontsize=7)
                ax.set_xticks([])
                ax.set_yticks([])
            axes[r][0].set_ylabel(stem, fontsize=7)
    except FileNotFoundError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with atomic_path(args.out) as tmp:
        fig.savefig(str(tmp))
    print(f'written: {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
