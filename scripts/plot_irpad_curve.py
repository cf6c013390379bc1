#!/usr/bin/env python
"""Accuracy of IRPAD against the number of training photos (docs/irpad.md, issue 18).

    python scripts/plot_irpad_curve.py --out figs/irpad/photos_curve.png \
        --point 12=results/irpad_eval/irpad_curve_n12_s2 --point 100=results/irpad_eval/irpad_curve_n100_s2 ...

Each ``--point N=DIR`` is the number of training photos and an ``eval_irpad.py --out`` folder
(its metrics.json). Writes the figure (accuracy per type, log-scaled x, the paper's Table IV as
dashed lines) and, next to it, a JSON with the plotted numbers.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: IRPAD accuracy of the DaLPSR paper, Table IV (CLIP ViT, their data)
PAPER_TABLE_IV = {'blur': 0.63, 'noise': 0.65, 'jpeg': 0.69}


def read_points(points):
    """``['N=DIR', ...]`` -> sorted ``[(N, metrics dict of DIR/metrics.json), ...]``."""
    out = []
    for p in points:
        n, sep, folder = p.partition('=')
        if not sep or not n.strip().isdigit():
            raise ValueError(f'--point must be N=DIR (N photos, an eval_irpad.py output folder), got {p!r}')
        f = os.path.join(folder, 'metrics.json')
        if not os.path.isfile(f):
            raise FileNotFoundError(f'{f} not found: run scripts/eval_irpad.py --out {folder} first')
        with open(f, encoding='utf-8') as fh:
            out.append((int(n), json.load(fh)['metrics']))
    return sorted(out, key=lambda x: x[0])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--point', action='append', required=True, help='N=DIR: N training photos, eval folder')
    p.add_argument('--out', required=True, help='figure (.png); the numbers go to the same name .json')
    p.add_argument('--title', default='IRPAD accuracy vs training photos (held-out set)')
    args = p.parse_args(argv)
    try:
        points = read_points(args.point)
    except (ValueError, FileNotFoundError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    types = [k.split('/', 1)[1] for k in points[0][1] if k.startswith('acc/') and k != 'acc/mean']
    table = {'photos': [n for n, _ in points],
             **{f'{m}/{t}': [met[f'{m}/{t}'] for _, met in points] for t in types for m in ('acc', 'bacc', 'within1')}}
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from dalpsr.utils.misc import atomic_path, atomic_write_json
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, t in enumerate(types):
        c = f'C{i}'
        ax.plot(table['photos'], table[f'acc/{t}'], 'o-', color=c, label=f'{t}')
        if t in PAPER_TABLE_IV:
            ax.axhline(PAPER_TABLE_IV[t], color=c, ls='--', lw=1)
    ax.set_xscale('log')
    ax.set_xticks(table['photos'])
    ax.set_xticklabels([str(n) for n in table['photos']])
    ax.set_xlabel('training photos')
    ax.set_ylabel('accuracy (K = 4, chance 0.25)')
    ax.set_title(args.title, fontsize=10)
    ax.legend(title='type (dashed: paper Table IV)', fontsize=8, title_fontsize=8, loc='center left')
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with atomic_path(args.out) as tmp:
        fig.savefig(tmp, dpi=120, format='png')
    atomic_write_json(os.path.splitext(args.out)[0] + '.json', table)
    for t in types:
        print(f'{t:6s} ' + '  '.join(f'{n}: {a:.3f}' for n, a in zip(table['photos'], table[f'acc/{t}'])))
    print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
