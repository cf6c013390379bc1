"""Cross-check dalpsr's PSNR / SSIM / NIQE (pyiqa 0.1.16) against basicsr's numpy versions.

    python -m dalpsr.metrics.crosscheck [--crop-border 4] [--size 192] [--noise 8] [--device cpu]

Uses the photographs shipped in installed packages (dalpsr.data.sample_images), crops each to
``size`` x ``size`` and adds Gaussian noise (sigma ``noise`` on the 0..255 scale, seed 0) to make
the SR image. Prints one row per image with both values and their difference, then the largest
absolute differences. Known differences (docs/metrics.md): pyiqa rounds Y to integers before
SSIM (as MATLAB does on uint8), basicsr does not; NIQE is a torch re-implementation in pyiqa.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--crop-border', type=int, default=4)
    p.add_argument('--size', type=int, default=192, help='crop size (>= 96 for NIQE)')
    p.add_argument('--noise', type=float, default=8.0)
    p.add_argument('--device', default='cpu')
    p.add_argument('--weights-dir', default=None)
    args = p.parse_args(argv)
    from dalpsr.data.sample_images import sample_image_paths
    from dalpsr.metrics.iqa import MetricSet
    from dalpsr.utils.basicsr_compat import import_basicsr
    from dalpsr.utils.img_io import read_image
    bm = import_basicsr('metrics')
    ms = MetricSet(['psnr', 'ssim', 'niqe'], device=args.device, weights_dir=args.weights_dir,
                   crop_border=args.crop_border, strict=True)
    ms_y = MetricSet(['niqe'], device=args.device, weights_dir=args.weights_dir, strict=True,
                     niqe={'color_space': 'ycbcr'})
    rng = np.random.default_rng(0)
    diffs = {'psnr': [], 'ssim': [], 'niqe(yiq~gray)': [], 'niqe(ycbcr~y)': []}
    print(f"{'image':28s} {'psnr ours':>10s} {'basicsr':>10s} {'ssim ours':>10s} {'basicsr':>10s} "
          f"{'niqe ours':>10s} {'basicsr':>10s} {'niqe-y ours':>11s} {'basicsr':>10s}")
    for path in sample_image_paths('all'):
        img = read_image(path)
        if min(img.shape[:2]) < args.size:
            continue
        gt = np.round(img[:args.size, :args.size] * 255.0)
        sr = np.clip(gt + rng.normal(0, args.noise, gt.shape), 0, 255).round()
        t = lambda a: torch.from_numpy((a / 255.0).transpose(2, 0, 1).copy()).float()[None]  # noqa: E731
        ours = ms.compute(t(sr), t(gt))
        ours_y = ms_y.compute(t(sr))['niqe']
        sr_bgr, gt_bgr = sr[:, :, ::-1].astype(np.uint8), gt[:, :, ::-1].astype(np.uint8)
        ref_p = bm.calculate_psnr(sr_bgr, gt_bgr, args.crop_border, input_order='HWC', test_y_channel=True)
        ref_s = bm.calculate_ssim(sr_bgr, gt_bgr, args.crop_border, input_order='HWC', test_y_channel=True)
        ref_n = float(bm.calculate_niqe(sr_bgr.astype(np.float32), 0, input_order='HWC', convert_to='gray'))
        ref_ny = float(bm.calculate_niqe(sr_bgr.astype(np.float32), 0, input_order='HWC', convert_to='y'))
        for k, a, b in (('psnr', ours['psnr'], ref_p), ('ssim', ours['ssim'], ref_s),
                        ('niqe(yiq~gray)', ours['niqe'], ref_n), ('niqe(ycbcr~y)', ours_y, ref_ny)):
            diffs[k].append(abs(a - b))
        print(f"{path.name[:28]:28s} {ours['psnr']:10.4f} {ref_p:10.4f} {ours['ssim']:10.5f} {ref_s:10.5f} "
              f"{ours['niqe']:10.4f} {ref_n:10.4f} {ours_y:11.4f} {ref_ny:10.4f}")
    print('max |ours - basicsr|: ' + ', '.join(f'{k} {max(v):.2e}' for k, v in diffs.items() if v))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
