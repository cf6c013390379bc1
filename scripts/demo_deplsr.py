#!/usr/bin/env python
"""Real super-resolution of shipped photographs with the CPU-trained DePLSR model in the repository.

    python scripts/demo_deplsr.py [--out results/demo/deplsr] [--weights pretrained_models/deplsr_cpu_x4]

For each photo (the 'val' photos that ship in installed packages: never seen in training) it
takes a centre crop of ``--gt-size`` px, degrades it with the Real-ESRGAN pipeline (seed
``--seed``: blur, resize, noise, JPEG, twice) to an x4 LR, super-resolves the LR with the
shipped RealDAT (conditioned by its SRCLIP-CPU encoder) and with bicubic, and writes
``LR/``, ``SR/``, ``bicubic/`` and ``GT/`` PNGs plus ``summary.json`` (PSNR-Y, crop border 2, of
both against the GT). A real, trained model: no download, a few seconds per image on a CPU.
Reruns overwrite nothing: finished images are kept.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_WEIGHTS = ROOT / 'pretrained_models' / 'deplsr_cpu_x4'


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='results/demo/deplsr')
    p.add_argument('--weights', default=str(DEFAULT_WEIGHTS), help='a RealDAT export folder')
    p.add_argument('--gt-size', type=int, default=256, help='HR centre crop (LR = gt_size / 4)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--num-images', type=int, default=3)
    args = p.parse_args(argv)
    import numpy as np
    import torch
    import torch.nn.functional as F
    from dalpsr.data.degradations import RealESRGANDegradation
    from dalpsr.data.sample_images import sample_image_paths
    from dalpsr.models.realdat_model import psnr_y
    from dalpsr.restorers import build_restorer
    from dalpsr.utils.img_io import read_image, write_image
    from dalpsr.utils.misc import atomic_write_json, sample_rng
    try:
        restorer = build_restorer({'type': 'RealDATRestorer', 'weights': args.weights})
    except (FileNotFoundError, ValueError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    out = Path(args.out)
    for sub in ('LR', 'SR', 'bicubic', 'GT'):
        (out / sub).mkdir(parents=True, exist_ok=True)
    deg = RealESRGANDegradation(scale=4)
    rows = []
    t0 = time.time()
    for k, path in enumerate(sample_image_paths('val')[:args.num_images]):
        img = read_image(path)
        c = min(args.gt_size, img.shape[0], img.shape[1]) // 4 * 4
        y, x = (img.shape[0] - c) // 2, (img.shape[1] - c) // 2
        d = deg(np.ascontiguousarray(img[y:y + c, x:x + c]), sample_rng(args.seed, k))
        gt = torch.from_numpy(d['gt']).permute(2, 0, 1)[None]
        lq = torch.from_numpy(d['lq']).permute(2, 0, 1)[None]
        name = path.stem
        sr_path = out / 'SR' / f'{name}.png'
        if sr_path.exists():
            sr = torch.from_numpy(read_image(sr_path)).permute(2, 0, 1)[None]
        else:
            sr = restorer.restore(lq, seeds=[0])
            write_image(sr_path, sr[0].permute(1, 2, 0).numpy())
        bic = F.interpolate(lq, scale_factor=4, mode='bicubic', align_corners=False).clamp(0, 1)
        for sub, t in (('LR', lq), ('bicubic', bic), ('GT', gt)):
            dst = out / sub / f'{name}.png'
            if not dst.exists():
                write_image(dst, t[0].permute(1, 2, 0).numpy())
        row = {'image': name, 'lr_size': list(lq.shape[-2:]), 'psnr_y_sr': round(psnr_y(sr, gt, 2).item(), 3),
               'psnr_y_bicubic': round(psnr_y(bic, gt, 2).item(), 3)}
        rows.append(row)
        print(f"  {name}: LR {row['lr_size'][0]}x{row['lr_size'][1]} -> x4   PSNR-Y DePLSR-CPU "
              f"{row['psnr_y_sr']:.2f} dB   bicubic {row['psnr_y_bicubic']:.2f} dB", flush=True)
    summary = {'weights': str(args.weights), 'model': restorer.describe(), 'seed': args.seed,
               'degradation': 'Real-ESRGAN second order (dalpsr.data.degradations defaults), x4', 'images': rows,
               'mean_psnr_y_sr': float(np.mean([r['psnr_y_sr'] for r in rows])),
               'mean_psnr_y_bicubic': float(np.mean([r['psnr_y_bicubic'] for r in rows]))}
    atomic_write_json(out / 'summary.json', summary)
    print(f"  mean PSNR-Y: DePLSR-CPU {summary['mean_psnr_y_sr']:.2f} dB, bicubic "
          f"{summary['mean_psnr_y_bicubic']:.2f} dB ({time.time() - t0:.0f} s; images in {out})", flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
