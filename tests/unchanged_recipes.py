"""The first training losses of the three tiny recipes, for tests/test_unchanged_training.py.

Each recipe (options/train/train_dalpsr_tiny.yml, train_irpad_cpu.yml,
train_caption_align_tiny.yml) runs as shipped except for what must change to run in a test:
tiny models written to a temporary folder (the same builders as scripts/make_tiny_*.py), small
data from the photos shipped in installed packages, ``total_iter`` = the number of recorded
steps, no tensorboard / progress bar. Only ``dalpsr.train.train`` and builders that exist in
both the old and the new code are used, so the same file records the reference on the commit
before the training-loop rework::

    cd /work/wt/base && PYTHONPATH=/work/wt/base HF_HUB_OFFLINE=1 python \\
        /work/wt/train/tests/unchanged_recipes.py --repo /work/wt/base \\
        --out /work/wt/train/tests/data/unchanged_training.json

Each run is pinned to one intra-op thread (``torch.set_num_threads(1)``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict

#: recipe -> number of optimizer steps recorded
STEPS = {'dalpsr_tiny': 6, 'irpad_cpu': 8, 'caption_align_tiny': 6}
RECIPES = {'dalpsr_tiny': 'train_dalpsr_tiny.yml', 'irpad_cpu': 'train_irpad_cpu.yml',
           'caption_align_tiny': 'train_caption_align_tiny.yml'}


def _common(opt: Dict[str, Any], root: Path, steps: int) -> Dict[str, Any]:
    opt['path'] = {'experiments_root': str(root / 'experiments')}
    opt['train'].update(total_iter=steps, tensorboard=False, progress_bar=False)
    opt['_args'] = {'resume': 'no', 'force': False}
    return opt


def recipe_options(name: str, repo: Path, root: Path) -> Dict[str, Any]:
    """Options of recipe ``name`` from ``repo``/options/train, with tiny models and small data
    under ``root`` (built on first use)."""
    from dalpsr.utils.options import load_options
    opt = load_options(str(repo / 'options' / 'train' / RECIPES[name]))
    opt = _common(opt, root, STEPS[name])
    if name == 'dalpsr_tiny':
        from dalpsr.archs.sd_components import build_tiny_sd
        sd = root / 'tiny-sd'
        if not sd.is_dir():
            build_tiny_sd(str(sd), seed=0)
        import skimage.data
        skdata = os.path.dirname(skimage.data.__file__)
        opt['model']['sd']['pretrained'] = str(sd)
        for phase in ('train', 'val'):
            opt['datasets'][phase]['dataroot_gt'] = skdata
            # recorded with the params-based noise labels, before the recipes switched to the
            # measured ones (issue 18): this pins the training code, not the label choice
            if 'prompt' in opt['datasets'][phase]:
                opt['datasets'][phase]['prompt'] = dict(opt['datasets'][phase]['prompt'], noise_severity='params')
    elif name == 'irpad_cpu':
        for phase, (n, size) in (('train', (16, 128)), ('val', (8, 128))):
            d = opt['datasets'][phase]
            d['cache_file'] = str(root / f'irpad_{phase}.npz')
            d['build'] = dict(d['build'], num_samples=n, gt_size=size, workers=1)
        opt['datasets']['val']['batch_size'] = 8
        opt['train']['batch_size'] = 8
        # recorded before the recipe took the v2 statistics, stats_score and stats_pretrain (issue
        # 18): removing the three keys gives the defaults the reference was recorded with (this pins
        # the training code, not the recipe's architecture; tests/test_irpad.py covers the new parts)
        opt['model'].pop('stats_pretrain', None)
        opt['model']['network'].pop('stats_score', None)
        opt['model']['network']['image_encoder'].pop('dstat_features', None)
        opt['model']['network']['image_encoder'].pop('dstat_dropout', None)   # added later, same reason
    elif name == 'caption_align_tiny':
        from dalpsr.captioning.tiny import make_tiny_llava
        from dalpsr.data.sample_images import link_sample_images
        llava = root / 'tiny-llava'
        if not llava.is_dir():
            make_tiny_llava(str(llava), seed=0)
            link_sample_images(str(root / 'samples' / 'train'), 'train')
            link_sample_images(str(root / 'samples' / 'val'), 'val')
        opt['model']['llava'] = str(llava)
        opt['datasets']['train']['dataroot_gt'] = str(root / 'samples' / 'train')
        opt['datasets']['val']['dataroot_gt'] = str(root / 'samples' / 'val')
        opt['datasets']['val']['length'] = 8
    return opt


def run_recipe(name: str, repo: Path, root: Path) -> Dict[str, Any]:
    """Train recipe ``name`` for its recorded steps; ``{'losses': [...], 'val': {...}}``."""
    import torch
    from dalpsr.train import train
    torch.set_num_threads(1)
    res = train(recipe_options(name, repo, root))
    return {'losses': [float(v) for v in res['losses']], 'val': {k: float(v) for k, v in res['val'].items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--repo', required=True, help='checkout whose options/train recipes are run')
    p.add_argument('--out', required=True, help='JSON file to write')
    p.add_argument('--only', nargs='*', default=list(STEPS))
    args = p.parse_args()
    import dalpsr
    out: Dict[str, Any] = {'dalpsr': os.path.dirname(dalpsr.__file__), 'recipes': {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            out['recipes'][name] = run_recipe(name, Path(args.repo), Path(tmp) / name)
            print(name, out['recipes'][name], flush=True)
    import torch
    out['torch'] = torch.__version__
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
