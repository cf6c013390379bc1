#!/usr/bin/env python
"""Super-resolve a folder of LR images with any registered restorer (feed-forward measurements).

    python scripts/restore_folder.py --lr datasets/deplsr/val_testset_x4/LR --out results/deplsr/realdat \
        --method '{type: RealDATRestorer, weights: pretrained_models/deplsr_cpu_x4, tile: 200, tile_overlap: 16}'
    python scripts/restore_folder.py --lr LR --out results/bicubic --method '{type: Bicubic, scale: 4}'
    python scripts/iqa.py --sr results/deplsr/realdat --gt datasets/deplsr/val_testset_x4/GT --metrics psnr ssim niqe

A small stand-in for ``dalpsr/test.py`` until it takes a ``method:`` block: images are read as RGB
(gray expanded, alpha dropped, 16-bit scaled), one at a time, and written as 8-bit PNGs with the
LR's stem, each atomically; existing outputs are kept (a rerun resumes), an unreadable file is
skipped with a one-line message. Exit status: 0 done, 2 bad input.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--lr', required=True, help='folder of LR images')
    p.add_argument('--out', required=True, help='output folder (PNG per image)')
    p.add_argument('--method', required=True, help="YAML mapping of the restorer, e.g. '{type: Bicubic, scale: 4}'")
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: leave as is)')
    p.add_argument('--limit', type=int, default=0, help='only the first N images (0: all)')
    args = p.parse_args(argv)
    import torch
    import yaml
    if args.threads:
        torch.set_num_threads(args.threads)
    from dalpsr.restorers import build_restorer
    from dalpsr.utils.img_io import read_image, write_image
    from dalpsr.utils.misc import scan_images
    try:
        cfg = yaml.safe_load(args.method)
        if not isinstance(cfg, dict) or 'type' not in cfg:
            raise ValueError(f'--method must be a YAML mapping with a type, got {args.method!r}')
        restorer = build_restorer(cfg, where='--method')
        paths = scan_images(args.lr)
    except (ValueError, KeyError, FileNotFoundError, TypeError, yaml.YAMLError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    if args.limit:
        paths = paths[:args.limit]
    os.makedirs(args.out, exist_ok=True)
    t0, done = time.time(), 0
    for path in paths:
        dst = os.path.join(args.out, path.stem + '.png')
        if os.path.exists(dst):
            continue
        try:
            img = read_image(path)
        except Exception as err:  # noqa: BLE001 - a bad file is skipped, the rest goes on
            print(f'skipped {path.name}: {err}', file=sys.stderr)
            continue
        lq = torch.from_numpy(img).permute(2, 0, 1)[None].float()
        sr = restorer.restore(lq, seeds=[0])[0].permute(1, 2, 0).numpy()
        write_image(dst, sr)
        done += 1
    print(f'{done} image(s) written to {args.out} in {time.time() - t0:.1f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
