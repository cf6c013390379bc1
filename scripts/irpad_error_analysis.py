#!/usr/bin/env python
"""Where an IRPAD goes wrong, against the recorded degradation params of each held-out sample.

    python scripts/irpad_error_analysis.py --eval results/irpad_eval/irpad_cpu \
        --data datasets/irpad/heldout_512_s2.npz [--json out.json]

Reads predictions.npz written by scripts/eval_irpad.py and the LR cache it evaluated, and
prints the accuracy (and mean signed error pred - true, in intervals) of each type within
groups defined by the params and the LR content:
  noise: kind of the last noise stage (gaussian / poisson), gray or colour noise, LR mean
         brightness tercile (Poisson noise and clipping shrink noise in dark images, while
         the label measures it at mid-gray);
  jpeg:  final order (JPEG last keeps the 8x8 grid; JPEG before the final resize+sinc blurs it);
  every type: source photo (content the label does not see: the photo's own blur/noise/JPEG).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--eval', required=True, help='eval_irpad output folder (predictions.npz, metrics.json)')
    p.add_argument('--data', default='datasets/irpad/heldout_512_s2.npz', help='the LR cache it evaluated')
    p.add_argument('--json', default=None, help='also write the table to this JSON file')
    args = p.parse_args(argv)
    import numpy as np
    from dalpsr.data.lr_cache import load_lr_cache
    pred_file = os.path.join(args.eval, 'predictions.npz')
    if not os.path.isfile(pred_file):
        print(f'error: {pred_file} not found (run scripts/eval_irpad.py first)', file=sys.stderr)
        return 2
    z = np.load(pred_file)
    try:
        data = load_lr_cache(args.data)
    except (FileNotFoundError, ValueError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    if z['keys'].tolist() != data['keys'].tolist():
        print(f'error: {pred_file} was not computed on {args.data} (keys differ)', file=sys.stderr)
        return 2
    pred, lab = z['pred'], z['labels']
    types = list(data['meta']['prompt']['types'])
    params = [json.loads(str(s)) for s in data['params']]
    bright = data['lq'].reshape(len(lab), -1).mean(1) / 255.0
    terc = np.quantile(bright, [1 / 3, 2 / 3])
    groups = {
        'last noise kind': [q['order2']['noise']['kind'] for q in params],
        'last noise gray': ['gray' if q['order2']['noise']['gray'] else 'colour' for q in params],
        'LR brightness': [('dark' if b <= terc[0] else 'mid' if b <= terc[1] else 'bright') for b in bright],
        'final order': [q['final']['order'] for q in params],
        'photo': [str(k).rsplit('_', 1)[0] for k in data['keys']],
    }
    table = {}
    for gname, values in groups.items():
        values = np.asarray(values)
        table[gname] = {}
        print(f'-- by {gname}')
        for v in sorted(set(values.tolist())):
            m = values == v
            row = {'n': int(m.sum())}
            for i, t in enumerate(types):
                row[f'acc/{t}'] = float((pred[m, i] == lab[m, i]).mean())
                row[f'bias/{t}'] = float((pred[m, i] - lab[m, i]).mean())
            table[gname][v] = row
            print(f'  {v:18s} n={row["n"]:5d}  ' + '  '.join(
                f'{t} acc {row[f"acc/{t}"]:.3f} bias {row[f"bias/{t}"]:+.2f}' for t in types))
    if args.json:
        from dalpsr.utils.misc import atomic_write_json
        atomic_write_json(args.json, table)
    return 0


if __name__ == '__main__':
    sys.exit(main())
