#!/usr/bin/env python
"""Export a RealDAT / DAT training checkpoint as a loadable RealDAT export folder.

    python scripts/export_realdat_checkpoint.py --exp experiments/realdat_cpu --step 400 --out DIR

Builds the model from the experiment's ``options.yml`` (as train.py did), loads the network
weights of ``checkpoints/checkpoint-<step>/model.safetensors`` (the first module Accelerate saved:
RealDATModel has one, ``net``) and writes ``realdat.json`` + ``realdat.safetensors`` (+ the SRCLIP
image encoder) into ``--out`` (refused when it exists). Used to compare runs at the same step.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--exp', required=True, help='experiment folder (options.yml, checkpoints/)')
    p.add_argument('--step', type=int, required=True)
    p.add_argument('--out', required=True)
    args = p.parse_args(argv)
    from safetensors.torch import load_file
    import dalpsr.archs  # noqa: F401
    import dalpsr.losses  # noqa: F401
    from dalpsr.models.realdat_model import RealDATModel, save_realdat
    from dalpsr.utils.options import load_options
    ckpt = os.path.join(args.exp, 'checkpoints', f'checkpoint-{args.step}', 'model.safetensors')
    opt_file = os.path.join(args.exp, 'options.yml')
    for f in (ckpt, opt_file):
        if not os.path.isfile(f):
            print(f'error: {f} not found', file=sys.stderr)
            return 2
    if os.path.exists(args.out):
        print(f'error: {args.out} exists; choose another --out', file=sys.stderr)
        return 2
    opt = load_options(opt_file)
    if opt['model'].get('type') != 'RealDATModel':
        print(f"error: {opt_file} is not a RealDATModel experiment", file=sys.stderr)
        return 2
    model = RealDATModel(opt)
    model.net.load_state_dict(load_file(ckpt))
    save_realdat(model.net, args.out, model.srclip_dir,
                 extra={'trained_with': opt_file, 'name': opt.get('name'), 'conditioning': model.conditioning,
                        'step': args.step})
    print(f'exported step {args.step} of {args.exp} to {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
