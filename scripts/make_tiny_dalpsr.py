#!/usr/bin/env python
"""Write the tiny random stand-ins test.py loads: SD (diffusers layout), a DaLPSR export and an IRPAD export.

    python scripts/make_tiny_dalpsr.py [pretrained_models/tiny] [--seed 0] [--overwrite]

Layout: <dir>/sd/, <dir>/dalpsr/{controlnet/, dalpsr.json}, <dir>/irpad/{irpad.json, irpad.safetensors}.
NOT real models (random weights; outputs are noise): for tests, the CPU demo and
options/test/test_dalpsr_tiny.yml. Parts already there are kept unless --overwrite.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('out_dir', nargs='?', default='pretrained_models/tiny', help='folder to write (default pretrained_models/tiny)')
    p.add_argument('--seed', type=int, default=0, help='seed of the random weights (default 0)')
    p.add_argument('--overwrite', action='store_true', help='rebuild parts that already exist')
    p.add_argument('--layout', default='fast', choices=('fast', 'sd'),
                   help="fast (default: small widths, attention at 1/8 latent resolution only, none in the VAE) "
                        "or sd (SD's layout, the stand-in of earlier versions)")
    args = p.parse_args(argv)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    import torch
    torch.set_num_threads(1)
    from dalpsr.inference.tiny import TINY_LABEL, build_tiny_dalpsr
    paths = build_tiny_dalpsr(args.out_dir, seed=args.seed, overwrite=args.overwrite, layout=args.layout)
    print(f'{TINY_LABEL}: ' + ', '.join(f'{k} -> {v}' for k, v in paths.items()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
