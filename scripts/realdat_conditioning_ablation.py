#!/usr/bin/env python
"""Does a trained RealDAT use its SRCLIP conditioning? PSNR with each image's own embeddings
against the same network fed the embeddings of another image or the set's mean embedding.

    python scripts/realdat_conditioning_ablation.py --weights pretrained_models/deplsr_cpu_x4 \
        --lr datasets/deplsr/val_testset_x4_sub22/LR --gt datasets/deplsr/val_testset_x4_sub22/GT \
        --crop-border 2 --out results/deplsr/conditioning_ablation.json

For every LR/GT pair (same stem) the SRCLIP encoder of the export computes (xi, xd) from the whole
LR (as ``RealDATRestorer`` does), then the same pieces are super-resolved three times:

* ``own``: the image's own embeddings (what test.py does);
* ``other``: the embeddings of the image half the sorted list away (``(i + N // 2) mod N``), i.e.
  a photo with another, random degradation;
* ``mean``: the mean of the embeddings over the set (no per-image degradation information).

PSNR-Y (BT.601, 8-bit, ``--crop-border``) per image and the mean per row are printed and written
(``--out``, JSON, atomically), with how far apart the images' embeddings are (smallest cosine
between two images' content embeddings, mean per-dimension std across images). If ``own`` is not above ``other`` / ``mean`` the network restores
as well without knowing which degradation it faces: the conditioning carries nothing it uses.
Only for conditioned exports (RealDAT with ``srclip/``); exit status 2 on bad input.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROWS = ('own', 'other', 'mean')


def pairs(lr_dir: str, gt_dir: str):
    """[(key, lr path, gt path)] of the LR images with a GT, sorted, paired by the rules of
    scripts/iqa.py (``dalpsr.metrics.pairing``: file stems, ``_x4`` / ``_hr``-style suffixes ignored)."""
    from pathlib import Path
    from dalpsr.metrics.pairing import pair_folders
    if not os.path.isdir(lr_dir) or not os.path.isdir(gt_dir):
        raise FileNotFoundError(f'not a folder: {lr_dir if not os.path.isdir(lr_dir) else gt_dir}')
    out = [(p.key, Path(p.sr_path), Path(p.gt_path)) for p in pair_folders(lr_dir, gt_dir) if p.status == 'ok']
    if not out:
        raise ValueError(f'no LR image of {lr_dir} has a GT of the same name in {gt_dir}')
    return sorted(out)


def ablate(restorer, items, crop_border: int = 0) -> dict:
    """``items``: [(stem, lq [1, 3, h, w], gt [1, 3, sh, sw])] -> {'per_image': ..., 'mean': {row: dB}}."""
    import torch
    from dalpsr.models.realdat_model import psnr_y
    if restorer.encoder is None:
        raise ValueError(f'{restorer.weights} is an unconditioned DAT (no srclip/): nothing to ablate')
    conds = [restorer.encode(lq) for _, lq, _ in items]
    mean = tuple(torch.stack([c[k] for c in conds]).mean(0) for k in range(2))
    n, per = len(items), {}
    for i, (stem, lq, gt) in enumerate(items):
        use = {'own': conds[i], 'other': conds[(i + n // 2) % n], 'mean': mean}
        per[stem] = {row: round(float(psnr_y(restorer.super_resolve(lq, *use[row]), gt, crop_border)[0]), 4)
                     for row in ROWS}
    means = {row: round(sum(v[row] for v in per.values()) / n, 4) for row in ROWS}
    return {'per_image': per, 'mean': means, 'num_images': n,
            'own_minus': {row: round(means['own'] - means[row], 4) for row in ROWS if row != 'own'},
            'embedding_spread': spread(conds)}


def spread(conds) -> dict:
    """How much the images' embeddings differ: the smallest cosine between two images' xi, and
    the mean over dimensions of the across-image std of xi and of xd (unit-norm embeddings)."""
    import torch
    xi = torch.cat([c[0].reshape(1, -1) for c in conds]).double()
    xd = torch.cat([c[1].reshape(1, -1) for c in conds]).double()
    u = torch.nn.functional.normalize(xi, dim=1)
    return {'xi_min_cosine': float((u @ u.T).min()), 'xi_dim_std': float(xi.std(0).mean()),
            'xd_dim_std': float(xd.std(0).mean())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--weights', required=True, help='RealDAT export folder (realdat.json, srclip/)')
    p.add_argument('--lr', required=True, help='folder of LR images')
    p.add_argument('--gt', required=True, help='folder of the HR images (same stems)')
    p.add_argument('--crop-border', type=int, default=0)
    p.add_argument('--tile', type=int, default=200)
    p.add_argument('--tile-overlap', type=int, default=16)
    p.add_argument('--limit', type=int, default=0, help='only the first N pairs (0: all)')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: leave as is)')
    p.add_argument('--out', default=None, help='JSON file for the results')
    args = p.parse_args(argv)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from dalpsr.restorers.realdat import RealDATRestorer
    from dalpsr.utils.img_io import ImageReadError, read_image
    try:
        restorer = RealDATRestorer(args.weights, tile=args.tile, tile_overlap=args.tile_overlap)
        found = pairs(args.lr, args.gt)[:args.limit or None]
        items = []
        for stem, lr, gt in found:
            lq = torch.from_numpy(read_image(lr)).permute(2, 0, 1)[None].float()
            hr = torch.from_numpy(read_image(gt)).permute(2, 0, 1)[None].float()
            if hr.shape[-2:] != (lq.shape[-2] * restorer.scale, lq.shape[-1] * restorer.scale):
                raise ValueError(f'{gt.name}: GT {tuple(hr.shape[-2:])} is not x{restorer.scale} of its LR '
                                 f'{tuple(lq.shape[-2:])}')
            items.append((stem, lq, hr))
        if len(items) < 2:
            raise ValueError('need at least 2 image pairs (the "other" row borrows another image\'s embeddings)')
        res = ablate(restorer, items, args.crop_border)
    except (ValueError, OSError, ImageReadError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    res.update(weights=os.path.abspath(args.weights), lr=args.lr, gt=args.gt, crop_border=args.crop_border,
               tile=args.tile, tile_overlap=args.tile_overlap)
    print(f"RealDAT conditioning ablation, {res['num_images']} images, PSNR-Y (crop {args.crop_border}):")
    for row in ROWS:
        extra = f"   own - {row}: {res['own_minus'][row]:+.3f} dB" if row != 'own' else ''
        print(f"  {row:6s} {res['mean'][row]:7.3f}{extra}")
    sp = res['embedding_spread']
    print(f"embeddings across images: smallest cosine of xi {sp['xi_min_cosine']:.6f}, mean per-dimension std "
          f"xi {sp['xi_dim_std']:.2e}, xd {sp['xd_dim_std']:.2e}")
    if args.out:
        from dalpsr.utils.misc import atomic_write_json
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        atomic_write_json(args.out, res)
    return 0


if __name__ == '__main__':
    sys.exit(main())
