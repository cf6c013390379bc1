#!/usr/bin/env python
"""DaLPSR super-resolution demo on photographs that ship inside installed packages.

    python scripts/demo_sr.py [--num-images 2] [--steps N] [--tiny] [--force]

With the real weights present (pretrained_models/ or the HF cache: SD 2.1-base and a trained
DaLPSR export; IRPAD, RAM and LLaVA are used when present) it runs dalpsr/test.py with the paper's
sampler settings on 128 px LR crops (-> 512 px). Otherwise it prints what to download and where,
then builds TINY RANDOM STAND-INS (random weights in the real layouts) and runs the same code on
32 px crops on CPU; their outputs are noise and the output folder says so.

LR inputs are made from the photographs (centre crop, area downscale x4) next to their GT crops in
``<results_root>/demo_sr_inputs/<size>/``, so PSNR/SSIM are computed too. Results:
``<results_root>/demo_sr_sd21/`` or ``<results_root>/demo_sr_TINY_RANDOM_STAND-IN/``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SD_ID = 'stabilityai/stable-diffusion-2-1-base'
DOWNLOAD_HELP = """\
Real DaLPSR weights not found ({missing}). To run the real model, put:
  pretrained_models/stable-diffusion-2-1-base/  huggingface-cli download {sd} --local-dir pretrained_models/stable-diffusion-2-1-base
  pretrained_models/dalpsr/                     controlnet/ + dalpsr.json: experiments/<name>/export/ of
                                                python dalpsr/train.py -opt options/train/train_dalpsr_sd21.yml
  pretrained_models/irpad/        (optional)    export of python dalpsr/train.py -opt options/train/train_irpad_cpu.yml
  pretrained_models/ram/, pretrained_models/llava-1.5-7b-hf/  (optional captions; see pretrained_models/README.md)
Running the TINY RANDOM STAND-IN instead (not a real model: outputs are noise)."""


def _sd_source(root: Path) -> Optional[str]:
    """A local SD 2.1-base folder, or the hub id when it is in the HF cache, else None."""
    local = root / 'pretrained_models' / 'stable-diffusion-2-1-base'
    if (local / 'unet' / 'config.json').is_file():
        return str(local)
    try:
        from huggingface_hub import try_to_load_from_cache
        hit = try_to_load_from_cache(SD_ID, 'unet/config.json')
        if isinstance(hit, str) and os.path.isfile(hit):
            return SD_ID
    except Exception:  # noqa: BLE001 - no cache / old hub: treat as absent
        pass
    return None


def find_real_weights(root: Path) -> Dict[str, Optional[str]]:
    """Paths of the real models (None where absent)."""
    pm = root / 'pretrained_models'
    found: Dict[str, Optional[str]] = {'sd': _sd_source(root)}
    found['dalpsr'] = str(pm / 'dalpsr') if (pm / 'dalpsr' / 'dalpsr.json').is_file() else None
    found['irpad'] = str(pm / 'irpad') if (pm / 'irpad' / 'irpad.json').is_file() else None
    found['ram'] = str(pm / 'ram') if (pm / 'ram' / 'ram_swin_large_14m.pth').is_file() else None
    found['llava'] = str(pm / 'llava-1.5-7b-hf') if (pm / 'llava-1.5-7b-hf' / 'config.json').is_file() else None
    return found


def make_inputs(out: Path, lr_size: int, num: int, scale: int = 4) -> Dict[str, str]:
    """LR/GT pairs from shipped photographs: centre crop ``lr_size*scale`` -> area downscale."""
    import cv2

    from dalpsr.data.sample_images import sample_image_paths
    from dalpsr.utils.img_io import read_image, write_image
    lq, gt = out / 'lq', out / 'gt'
    paths = sample_image_paths('val')[:num]
    if not paths:
        raise FileNotFoundError('no sample images found in the installed packages (scikit-image, matplotlib)')
    hr = lr_size * scale
    for p in paths:
        if (lq / f'{p.stem}.png').is_file() and (gt / f'{p.stem}.png').is_file():
            continue
        img = read_image(p)
        h, w = img.shape[:2]
        s = min(h, w)
        img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        img = cv2.resize(img, (hr, hr), interpolation=cv2.INTER_AREA)
        write_image(gt / f'{p.stem}.png', img)
        write_image(lq / f'{p.stem}.png', cv2.resize(img, (lr_size, lr_size), interpolation=cv2.INTER_AREA))
    return {'lq': str(lq), 'gt': str(gt)}


def build_options(real: Dict[str, Optional[str]], tiny: Optional[Dict[str, str]], inputs: Dict[str, str],
                  results: str, steps: Optional[int], device: str) -> Dict:
    base = {'seed': 0, 'path': {'results_root': results},
            'metrics': {'names': ['psnr', 'ssim'], 'crop_border': 4, 'device': 'cpu'},
            'datasets': {'demo': {'dataroot_lq': inputs['lq'], 'dataroot_gt': inputs['gt']}},
            '_source': 'scripts/demo_sr.py'}
    if tiny is None:
        cap = {'mode': 'none'}
        if real['llava']:
            cap = {'mode': 'ram+llava' if real['ram'] else 'llava', 'llava_opts': {'model': real['llava']},
                   'tagger_opts': {'path': real['ram']} if real['ram'] else None}
        return {**base, 'name': 'demo_sr_sd21',
                'model': {'path': real['dalpsr'], 'sd': {'pretrained': real['sd']}, 'device': device},
                'irpad': {'source': 'irpad', 'path': real['irpad']} if real['irpad'] else {'source': 'none'},
                'captioner': cap, 'sampler': {'num_steps': steps or 50}}
    return {**base, 'name': 'demo_sr_TINY_RANDOM_STAND-IN',
            'model': {'path': tiny['dalpsr'], 'device': 'cpu', 'dtype': 'fp32'},
            'irpad': {'source': 'irpad', 'path': tiny['irpad']}, 'captioner': {'mode': 'none'},
            'sampler': {'num_steps': steps or 4, 'scheduler': 'ddim'}}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--num-images', type=int, default=2, help='shipped photographs to use (default 2)')
    p.add_argument('--steps', type=int, default=None, help='sampler steps (default 50 real, 4 tiny)')
    p.add_argument('--tiny', action='store_true', help='use the tiny random stand-in even if real weights exist')
    p.add_argument('--results-root', default='results', help='where run folders go (default results/)')
    p.add_argument('--tiny-dir', default='pretrained_models/tiny', help='where the stand-ins are built/kept')
    p.add_argument('--tiny-layout', default='fast', choices=('fast', 'sd'),
                   help="stand-in layout: fast (default) or sd (SD's attention layout; dalpsr/inference/tiny.py)")
    p.add_argument('--device', default='auto', help='auto | cpu | cuda (real weights; the stand-in runs on CPU)')
    p.add_argument('--force', action='store_true', help='archive an earlier demo run made with other settings')
    args = p.parse_args(argv)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    root = Path(__file__).resolve().parents[1]
    from dalpsr.inference.tiny import TINY_LABEL, build_tiny_dalpsr
    from dalpsr.test import test
    from dalpsr.utils.options import OptionError

    real = find_real_weights(root)
    use_real = bool(real['sd'] and real['dalpsr']) and not args.tiny
    tiny = None
    if not use_real:
        if not args.tiny:
            missing = ', '.join(k for k in ('sd', 'dalpsr') if not real[k])
            print(DOWNLOAD_HELP.format(missing=f'missing: {missing}', sd=SD_ID))
        print(f'*** {TINY_LABEL} ***')
        import torch
        torch.set_num_threads(1)  # tiny models: threads only add overhead (and thrash a busy CPU)
        tiny = build_tiny_dalpsr(args.tiny_dir, layout=args.tiny_layout)
    lr_size = 128 if use_real else 32
    try:
        inputs = make_inputs(Path(args.results_root) / 'demo_sr_inputs' / f'lr{lr_size}', lr_size, args.num_images)
        opt = build_options(real, tiny, inputs, args.results_root, args.steps, args.device)
        res = test(opt, force=args.force)
    except (OptionError, FileExistsError, FileNotFoundError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    s = res['sets']['demo']
    label = f' [{TINY_LABEL}]' if tiny else ''
    means = ', '.join(f"{k} {v['mean']:.3f}" for k, v in s['metrics'].items())
    print(f"demo: {s['ok']}/{s['images']} images -> {res['dir'] / 'demo'}{label}" + (f' ({means})' if means else ''))
    return 0 if s['ok'] == s['images'] else 1


if __name__ == '__main__':
    sys.exit(main())
