#!/usr/bin/env python
"""Write a tiny, randomly initialised CLIP vision tower (transformers ``CLIPVisionModel``).

    python scripts/make_tiny_clip.py pretrained_models/tiny-clip-vision [--seed 0] [--overwrite]

It loads through ``CLIPVisionModel.from_pretrained(DIR)`` exactly like
``openai/clip-vit-large-patch14`` (SSP-IR's image prior, ``model.clip.pretrained``) but is NOT a
real model: 2 layers, 32 wide, 32x32 input, 16 patch tokens. Used by the tiny SSP-IR recipe
(options/train/train_sspir_tiny.yml) and tests.
"""
import argparse
import os
import sys

if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('out_dir', help='folder to write (must be new or empty unless --overwrite)')
    p.add_argument('--seed', type=int, default=0, help='seed of the random weights (default 0)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing non-empty folder')
    args = p.parse_args(argv)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    from dalpsr.archs.sspir_arch import build_tiny_clip_vision
    try:
        out = build_tiny_clip_vision(args.out_dir, seed=args.seed, overwrite=args.overwrite)
    except FileExistsError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    print(f'tiny CLIP vision stand-in written to {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
