#!/usr/bin/env python
"""Plot examples of a triplet set: HR crop, LR (shown at HR size, nearest) and its restoration prompt.

    python scripts/plot_triplets.py results/demo/triplets --out figs/degradation_examples.png --num 4

Reads ``meta.jsonl`` written by scripts/generate_lq.py; labels and prompts are recomputed from the
recorded parameters with the paper's PromptSpec. The PNG is written atomically.
"""
import argparse
import os
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('triplets', help='folder holding meta.jsonl (scripts/generate_lq.py output)')
    p.add_argument('--out', default='figs/degradation_examples.png', help='PNG to write')
    p.add_argument('--num', type=int, default=4, help='number of examples (rows)')
    p.add_argument('--stride', type=int, default=1, help='take every N-th sample (spread examples)')
    args = p.parse_args(argv)

    from pathlib import Path

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np

    from dalpsr.data.prompt_labels import PromptSpec
    from dalpsr.utils.img_io import read_image
    from dalpsr.utils.misc import atomic_path, read_jsonl

    root = Path(args.triplets)
    meta = root / 'meta.jsonl'
    if not meta.is_file():
        print(f'error: {meta} not found (write a triplet set with scripts/generate_lq.py)', file=sys.stderr)
        return 2
    recs = sorted((r for r in read_jsonl(meta) if isinstance(r, dict) and 'key' in r), key=lambda r: r['key'])
    recs = recs[::max(1, args.stride)][:args.num]
    if not recs:
        print(f'error: {meta} lists no samples', file=sys.stderr)
        return 2
    spec = PromptSpec.from_opt(None)
    fig, axes = plt.subplots(len(recs), 2, figsize=(6.4, 3.55 * len(recs)), squeeze=False,
                             gridspec_kw={'wspace': 0.03, 'hspace': 0.22})
    for row, rec in zip(axes, recs):
        gt, lq = read_image(root / rec['gt']), read_image(root / rec['lq'])
        s = gt.shape[0] // lq.shape[0]
        row[0].imshow(np.clip(gt, 0, 1))
        row[0].set_title(f"HR {gt.shape[1]}x{gt.shape[0]} ({rec['key']})", fontsize=8)
        row[1].imshow(np.clip(np.repeat(np.repeat(lq, s, 0), s, 1), 0, 1))
        row[1].set_title(f'LR {lq.shape[1]}x{lq.shape[0]} (nearest x{s})', fontsize=8)
        prompt = spec.prompt(spec.labels(rec['params'])) if 'order1' in (rec.get('params') or {}) else rec['prompt']
        row[0].text(0, -0.08, '\n'.join(textwrap.wrap(prompt, 90)), transform=row[0].transAxes, fontsize=7,
                    va='top')
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.subplots_adjust(left=0.02, right=0.98, top=0.97, bottom=0.04)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with atomic_path(args.out) as tmp:
        fig.savefig(tmp, dpi=110, format='png')
    print(f'wrote {args.out} ({len(recs)} examples)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
