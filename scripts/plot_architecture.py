#!/usr/bin/env python
"""Draw the data flow of dalpsr (docs/ARCHITECTURE.md): training and inference, with the code of each step.

    python scripts/plot_architecture.py --out figs/architecture.png

Every path printed in a box is checked to exist by tests/test_architecture_doc.py, so the figure
cannot silently drift from the code. The PNG is written atomically.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: (key, title, code paths shown in the box, (column, row)); row 0 = training, row 1 = inference.
BOXES = [
    ('hr', 'HR photos', ['datasets/ or sample:train'], (0, 0)),
    ('deg', 'degradation', ['data/degradations.py'], (1, 0)),
    ('labels', 'labels / prompts', ['data/prompt_labels.py', 'data/prompt_compose.py',
                                    'captioning/ (scripts/caption.py)'], (2, 0)),
    ('dataset', 'dataset', ['data/triplet_dataset.py', 'data/lr_cache.py', 'data/loader.py'], (3, 0)),
    ('model', 'model', ['models/ (+ archs/, losses/)'], (4, 0)),
    ('train', 'train loop', ['train.py', 'training/loop.py', 'training/ (steps)'], (5, 0)),
    ('lr', 'LR images', ['datasets/ or a folder'], (0, 1)),
    ('prompts', 'captions / prompts', ['inference/prompts.py (caches)', 'captioning/', 'models/irpad_model.py'],
     (1, 1)),
    ('restorer', 'restorer', ['restorers/ (method: {type})', 'pipelines/loop.py (diffusion)'], (2, 1)),
    ('results', 'results', ['test.py', 'inference/runner.py', 'inference/results.py'], (3, 1)),
    ('metrics', 'metrics', ['metrics/', 'scripts/iqa.py'], (4, 1)),
]
EDGES = [('hr', 'deg'), ('deg', 'labels'), ('labels', 'dataset'), ('dataset', 'model'), ('model', 'train'),
         ('lr', 'prompts'), ('prompts', 'restorer'), ('restorer', 'results'), ('results', 'metrics')]
#: exported weights of the training run go to the restorer of the test run
WEIGHTS_EDGE = ('train', 'restorer', 'exported weights (experiments/<name>/export/)')


def code_paths():
    """The repository paths named in the boxes (relative to dalpsr/ unless they start with a
    top-level folder of the repository)."""
    out = []
    for _, _, lines, _ in BOXES:
        for line in lines:
            for part in line.replace('(', ',').replace(')', ',').replace(' or ', ',').split(','):
                part = part.strip().replace('+ ', '').split(' ')[0]
                if '/' not in part and not part.endswith('.py') or part == 'datasets/':
                    continue
                top = part.split('/')[0]
                out.append(part if top in ('scripts', 'datasets', 'options', 'docs') else f'dalpsr/{part}')
    return out


def draw(out: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    from dalpsr.utils.misc import atomic_path

    w, h, dx, dy = 2.55, 1.25, 3.0, 2.4
    fig, ax = plt.subplots(figsize=(17.5, 5.6), dpi=110)
    pos = {}
    colors = {0: '#dbe9f6', 1: '#fde7cf'}
    for key, title, lines, (c, r) in BOXES:
        x, y = c * dx, -r * dy
        pos[key] = (x, y)
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle='round,pad=0.04',
                                    fc=colors[r], ec='#333333', lw=1.2))
        ax.text(x, y + h / 2 - 0.2, title, ha='center', va='center', fontsize=11, weight='bold')
        ax.text(x, y - 0.12, '\n'.join(lines), ha='center', va='center', fontsize=8, family='monospace')

    def arrow(a, b, **kw):
        (xa, ya), (xb, yb) = pos[a], pos[b]
        if ya == yb:
            start, end = (xa + w / 2 + 0.05, ya), (xb - w / 2 - 0.05, yb)
        else:
            start, end = (xa - 0.3, ya - h / 2 - 0.05), (xb + 0.6, yb + h / 2 + 0.05)
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle='-|>', mutation_scale=16, lw=1.4,
                                     color='#333333', **kw))
        return start, end

    for a, b in EDGES:
        arrow(a, b)
    (xs, ys), (xe, ye) = arrow(*WEIGHTS_EDGE[:2], linestyle='--')
    ax.text(xs + 0.2, ys - 0.35, WEIGHTS_EDGE[2], fontsize=9, style='italic', ha='center', va='center',
            bbox=dict(fc='white', ec='none', pad=1))
    ax.text(-w / 2, h / 2 + 0.45, 'training  (python dalpsr/train.py -opt options/train/<recipe>.yml)',
            fontsize=10, color='#1f4e79', ha='left')
    ax.text(-w / 2, -dy + h / 2 + 0.45, 'inference  (python dalpsr/test.py -opt options/test/<method>.yml; '
            'scripts/iqa.py)', fontsize=10, color='#8a4b08', ha='left')
    ax.text(5 * dx + w / 2, -dy - h / 2 - 0.25, 'paths relative to dalpsr/ unless they start with scripts/',
            fontsize=8, color='#555555', ha='right')
    ax.set_xlim(-w / 2 - 0.2, 5 * dx + w / 2 + 0.2)
    ax.set_ylim(-dy - h / 2 - 0.45, h / 2 + 0.75)
    ax.set_aspect('equal')
    ax.axis('off')
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format='png')
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default='figs/architecture.png', help='PNG to write')
    args = p.parse_args(argv)
    draw(args.out)
    print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
