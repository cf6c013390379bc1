"""Visual comparison: the same crop of LR (nearest-upscaled), each method and HR side by side.

One row per image; each row shows one ``crop`` x ``crop`` window in HR pixels (the centre, or
``at=(y, x)`` for every row), snapped to the LR grid so the LR panel shows exactly the pixels the
methods saw. With an HR folder every method's title carries the PSNR-Y (dB) of its crop against
the HR crop; without one the HR column is left out. Used by ``scripts/compare.py`` (the figure of
a comparison) and ``scripts/plot_sr_crops.py``. The figure is written atomically.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')


def find_image(folder: str, stem: str) -> Optional[Path]:
    """``folder/stem.<image ext>`` or None."""
    for ext in IMAGE_EXTS:
        path = Path(folder) / f'{stem}{ext}'
        if path.is_file():
            return path
    return None


def _read(folder: str, stem: str) -> np.ndarray:
    from dalpsr.utils.img_io import read_image
    path = find_image(folder, stem)
    if path is None:
        raise FileNotFoundError(f'{stem}: no image in {folder}')
    return read_image(path)


def crop_box(hr_shape: Tuple[int, int], scale: int, crop: int, at: Optional[Sequence[int]] = None
             ) -> Tuple[int, int, int]:
    """(y, x, size) of the window in HR pixels: centred (or at ``at``), snapped to multiples of
    ``scale``, the size cut to the image and to a multiple of ``scale``."""
    h, w = hr_shape
    c = max(scale, (min(crop, h, w) // scale) * scale)
    y, x = at if at is not None else ((h - c) // 2, (w - c) // 2)
    y, x = max(0, min(int(y), h - c)), max(0, min(int(x), w - c))
    return (y // scale) * scale, (x // scale) * scale, c


def crop_panels(lr_dir: str, gt_dir: Optional[str], methods: Sequence[Tuple[str, str]], stem: str,
                crop: int = 128, at: Optional[Sequence[int]] = None) -> List[Tuple[str, np.ndarray]]:
    """[(title, HxWx3 float image in [0, 1])] of one row: LR, each method, HR (when ``gt_dir``)."""
    import torch

    from dalpsr.models.realdat_model import psnr_y
    lr = _read(lr_dir, stem)
    ref = _read(gt_dir, stem) if gt_dir else _read(methods[0][1], stem)
    s = max(1, round(ref.shape[0] / lr.shape[0]))
    y, x, c = crop_box(ref.shape[:2], s, crop, at)
    hr_crop = ref[y:y + c, x:x + c]
    lr_crop = np.repeat(np.repeat(lr[y // s:(y + c) // s, x // s:(x + c) // s], s, 0), s, 1)
    panels = [(f'LR (x{s} nearest)', lr_crop)]

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None]
    for name, folder in methods:
        try:
            img = _read(folder, stem)[y:y + c, x:x + c]
        except FileNotFoundError:
            panels.append((f'{name}: no output', np.ones_like(hr_crop)))
            continue
        if gt_dir and img.shape == hr_crop.shape:
            panels.append((f'{name} {psnr_y(t(img), t(hr_crop)).item():.2f} dB', img))
        else:
            panels.append((name, img))
    if gt_dir:
        panels.append(('HR', hr_crop))
    return panels


def crops_figure(lr_dir: str, gt_dir: Optional[str], methods: Sequence[Tuple[str, str]], stems: Sequence[str],
                 out: str, crop: int = 128, at: Optional[Sequence[int]] = None, dpi: int = 130) -> str:
    """Write the figure (rows = ``stems``, columns = LR, ``methods`` [(name, SR folder)], HR) to
    ``out`` atomically; returns ``out``. A missing LR/HR image is a FileNotFoundError naming it;
    a method without that image gets a blank panel titled ``no output``."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from dalpsr.utils.misc import atomic_path
    rows = [crop_panels(lr_dir, gt_dir, methods, stem, crop, at) for stem in stems]
    cols = len(rows[0])
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.2 * cols, 2.35 * len(rows)), dpi=dpi, squeeze=False)
    try:
        for r, (stem, panels) in enumerate(zip(stems, rows)):
            for k, (title, img) in enumerate(panels):
                ax = axes[r][k]
                ax.imshow(np.clip(img, 0, 1), interpolation='nearest')
                ax.set_title(title, fontsize=7)
                ax.set_xticks([])
                ax.set_yticks([])
            axes[r][0].set_ylabel(stem, fontsize=7)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with atomic_path(out) as tmp:
            fig.savefig(str(tmp), format=os.path.splitext(out)[1].lstrip('.') or 'png')
    finally:
        plt.close(fig)
    return out
