#!/usr/bin/env python
"""Write a tiny, randomly initialised Stable Diffusion stand-in in diffusers layout.

    python scripts/make_tiny_sd.py pretrained_models/tiny-sd [--seed 0] [--prediction-type epsilon] [--overwrite]

The folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/, model_index.json) loads through
``dalpsr.archs.sd_components.load_sd_components({'pretrained': DIR})`` exactly like
``stabilityai/stable-diffusion-2-1-base``; it is NOT a real model (outputs are noise). Used by the
tiny training config (options/train/train_dalpsr_tiny.yml), tests and the offline demo.
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
    p.add_argument('--prediction-type', default='epsilon', choices=['epsilon', 'v_prediction'],
                   help='prediction type recorded in the scheduler config (default epsilon, as SD 2.1-base)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing non-empty folder')
    args = p.parse_args(argv)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    from dalpsr.archs.sd_components import build_tiny_sd
    try:
        out = build_tiny_sd(args.out_dir, seed=args.seed, prediction_type=args.prediction_type,
                            overwrite=args.overwrite)
    except FileExistsError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    print(f'tiny SD stand-in written to {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
