"""Natural images that ship inside installed packages, used for demos, CPU configs and tests.

No dataset download is needed to try dalpsr: scikit-image, matplotlib and pyiqa carry a few
real photographs. ``sample_image_paths('train')`` and ``sample_image_paths('val')`` are
disjoint, so a model trained on one can be evaluated on held-out images of the other.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List

#: RGB photographs in scikit-image's data folder, split into train / val (disjoint).
#: (motorcycle_left/right are a stereo pair of one scene, so both stay in train.)
_SKIMAGE_TRAIN = ['astronaut.png', 'coffee.png', 'chelsea.png', 'rocket.jpg', 'hubble_deep_field.jpg',
                  'motorcycle_left.png', 'motorcycle_right.png']
_SKIMAGE_VAL = ['retina.jpg', 'ihc.png']


def _skimage_dir() -> Path:
    import skimage
    return Path(os.path.dirname(skimage.__file__)) / 'data'


def _matplotlib_dir() -> Path:
    import matplotlib
    return Path(os.path.dirname(matplotlib.__file__)) / 'mpl-data' / 'sample_data'


def _pyiqa_calibra_dir() -> Path:
    import importlib.util
    spec = importlib.util.find_spec('pyiqa')
    return Path(spec.origin).parent.parent / 'ResultsCalibra'


def sample_image_paths(split: str = 'all') -> List[Path]:
    """Paths of shipped RGB photographs.

    split: ``'train'`` (skimage photos + pyiqa's reference BMPs), ``'val'`` (other skimage
    photos + matplotlib's grace_hopper.jpg; disjoint from train) or ``'all'``.
    Missing files (another package version) are skipped.
    """
    if split not in ('train', 'val', 'all'):
        raise ValueError(f"split must be 'train', 'val' or 'all', got '{split}'")
    sk = _skimage_dir()
    train = [sk / n for n in _SKIMAGE_TRAIN]
    calib = _pyiqa_calibra_dir()
    if calib.is_dir():
        train += sorted(p for p in calib.glob('ref_dir/*') if p.suffix.lower() in ('.bmp', '.png', '.jpg'))
    val = [sk / n for n in _SKIMAGE_VAL] + [_matplotlib_dir() / 'grace_hopper.jpg']
    chosen = {'train': train, 'val': val, 'all': train + val}[split]
    return [p for p in chosen if p.is_file()]


def link_sample_images(out_dir: str, split: str = 'all') -> List[Path]:
    """Symlink (or copy, where links fail) the shipped images into ``out_dir``; returns paths."""
    import shutil
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for src in sample_image_paths(split):
        dst = out / src.name
        if not dst.exists():
            try:
                dst.symlink_to(src)
            except OSError:
                shutil.copyfile(src, dst)
        made.append(dst)
    return made
