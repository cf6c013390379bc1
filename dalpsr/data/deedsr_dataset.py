"""DeeDSR training data: the on-the-fly triplets of :class:`TripletDataset` plus StableSR's
``no_degradation_prob`` and, for stage 1, two LR patches for MoCo.

:class:`DeeDSRDataset` is a :class:`~dalpsr.data.triplet_dataset.TripletDataset` (same options:
HR folder, crop, augmentation, ``degradation`` overrides, prompt labels, seed) with

* ``no_degradation_prob`` (StableSR/DeeDSR: 0.01): with this probability the LR is the plain
  bicubic x``scale`` downscale of the HR crop (OpenCV ``INTER_CUBIC``, no blur, noise or JPEG)
  instead of the Real-ESRGAN degradation; its labels are all 0 (lowest interval) and
  ``params`` is ``{"no_degradation": true, "crop": ...}``. The choice comes from
  ``sample_rng(seed, index, 101)``, so it depends only on the sample index.
* ``patch_size`` (stage 1; ``null`` = off): the item also holds ``patches`` ``[2n, 3, p, p]``:
  ``n = patch_pairs`` pairs of random ``p x p`` crops of the same LR (MoCo query and key; the
  code: one pair of 64^2 patches of a 128^2 LR). Positions from ``sample_rng(seed, index, 102)``;
  the two crops of a pair are at distinct positions whenever the LR is larger than the patch.
  ``patch_pairs`` > 1 makes several pairs from one degraded LR (a CPU economy: degrading is the
  slow part; MoCo's negatives come from the queue only, so pairs of one LR in one batch are not
  used as each other's negatives).
* ``positives`` (stage 1): ``'same_lr'`` (the paper's pairs: query and key from one LR) or
  ``'same_degradation'``: the key patches come from a second LR, made from a crop of *another*
  photo with the same recorded degradation parameters (a fresh noise seed). Two patches of one
  LR share content, colour and texture statistics, which a network can match without looking
  at the degradation; with two photos the only thing the pair has in common is the
  degradation. A departure from the paper (docs/deedsr.md); the other photo, its crop and the
  noise seed come from ``sample_rng(seed, index, 103)``. Costs a second degradation per item.
  ``'same_lr_disjoint'``: as ``same_lr`` but the two crops of a pair share no pixel (the LR is
  split along a random axis at a random point, query on one side and key on the other; random
  crops of a 2p x 2p LR overlap by ~44 % of their area on average, pixels a network can match
  without reading the degradation). Needs an LR of at least 2p along one side; a departure
  from the paper (docs/deedsr.md).

Items: those of TripletDataset (``gt``, ``lq``, ``labels``, ``prompt``, ``caption``, ``params``,
``key``, ``index``), plus ``degraded`` (bool: False for a no-degradation sample) and
``patches`` when ``patch_size`` is set.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Optional

import cv2
import numpy as np

from dalpsr.data.triplet_dataset import SkipImage, TripletDataset, crop_and_augment
from dalpsr.utils.img_io import ImageReadError
from dalpsr.utils.misc import sample_rng
from dalpsr.utils.registry import DATASET_REGISTRY


def bicubic_down(gt_hwc: np.ndarray, scale: int) -> np.ndarray:
    """HxWx3 float32 [0, 1] -> (H/scale)x(W/scale)x3 bicubic, clipped and on the 8-bit grid."""
    h, w = gt_hwc.shape[:2]
    lq = cv2.resize(gt_hwc, (w // scale, h // scale), interpolation=cv2.INTER_CUBIC)
    return np.round(np.clip(lq, 0, 1) * 255.0).astype(np.float32) / 255.0


POSITIVES = ('same_lr', 'same_degradation', 'same_lr_disjoint')


@DATASET_REGISTRY.register()
class DeeDSRDataset(TripletDataset):
    """TripletDataset + ``no_degradation_prob`` + optional MoCo ``patch_size`` (module doc).

    Extra args:
        no_degradation_prob: probability of a bicubic-only LR (StableSR setting 0.01).
        patch_size: side of the two LR patches (query, key) of stage 1, or ``None``.
        patch_pairs: (query, key) pairs per LR (default 1).
        positives: ``'same_lr'`` (default, the paper), ``'same_degradation'`` or ``'same_lr_disjoint'``
            (module doc).
    Every other argument is TripletDataset's.
    """

    def __init__(self, *args, no_degradation_prob: float = 0.0, patch_size: Optional[int] = None,
                 patch_pairs: int = 1, positives: str = 'same_lr', **kwargs):
        super().__init__(*args, **kwargs)
        p = float(no_degradation_prob)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f'no_degradation_prob must be a probability in [0, 1], got {no_degradation_prob}')
        self.no_degradation_prob = p
        self.patch_size = int(patch_size) if patch_size else None
        self.patch_pairs = int(patch_pairs)
        if positives not in POSITIVES:
            raise ValueError(f"positives must be one of {', '.join(POSITIVES)}, got '{positives}'")
        self.positives = positives
        if self.patch_pairs < 1:
            raise ValueError(f'patch_pairs must be >= 1, got {patch_pairs}')
        if self.patch_size is not None:
            if self.patch_size < 8:
                raise ValueError(f'patch_size must be >= 8, got {patch_size}')
            if self.gt_size is not None and self.patch_size > self.gt_size // self.scale:
                raise ValueError(f'patch_size {self.patch_size} is larger than the LR crop '
                                 f'{self.gt_size // self.scale} (gt_size {self.gt_size} / scale {self.scale})')
            if (positives == 'same_lr_disjoint' and self.gt_size is not None
                    and 2 * self.patch_size > self.gt_size // self.scale):
                raise ValueError(f'positives same_lr_disjoint: two patches of {self.patch_size} px do not fit side by '
                                 f'side in the LR crop of {self.gt_size // self.scale} px')

    def __getitem__(self, index: int) -> Dict[str, Any]:
        import torch
        item = super().__getitem__(index)
        degraded = True
        if self.no_degradation_prob > 0 and sample_rng(self.seed, int(index), 101).uniform() < self.no_degradation_prob:
            gt = item['gt'].numpy().transpose(1, 2, 0)
            lq = bicubic_down(gt, self.scale)
            item['lq'] = torch.from_numpy(np.ascontiguousarray(lq.transpose(2, 0, 1)))
            old = json.loads(item['params'])
            item['params'] = json.dumps({'no_degradation': True, 'crop': old.get('crop'), 'source': old.get('source')})
            item['labels'] = torch.zeros_like(item['labels'])
            item['prompt'] = self.spec.prompt([0] * len(item['labels']))
            degraded = False
        item['degraded'] = degraded
        if self.patch_size is not None:
            rng = sample_rng(self.seed, int(index), 102)
            key_lq = None
            if self.positives == 'same_degradation':
                key_lq = self._same_degradation_lq(int(index), json.loads(item['params']))
            disjoint = self.positives == 'same_lr_disjoint'
            item['patches'] = torch.cat([two_patches(item['lq'], self.patch_size, rng, other=key_lq, disjoint=disjoint)
                                         for _ in range(self.patch_pairs)])
        return item

    def _same_degradation_lq(self, index: int, params: Dict[str, Any]):
        """``[3, h, w]``: a crop of another photo (not the item's, when there are two or more)
        degraded with ``params`` (a new noise seed), or bicubic-downscaled for a no-degradation
        item. Unreadable photos are skipped, as the dataset does."""
        import torch
        rng = sample_rng(self.seed, index, 103)
        n = len(self.paths)
        own = (index % self.length) % n
        start = (own + 1 + int(rng.integers(0, n - 1))) % n if n > 1 else own
        for k in range(n):
            path = self.paths[(start + k) % n]
            try:
                img = self._load(path)
                gt, _ = crop_and_augment(img, self.gt_size, rng, self.use_hflip, self.use_rot,
                                         self.small_image, self.scale)
                break
            except (ImageReadError, SkipImage) as err:
                self._warn_once(str(path), str(err))
        else:
            raise RuntimeError(f'DeeDSRDataset: no readable photo for the key of item {index}')
        if params.get('no_degradation'):
            lq = bicubic_down(gt, self.scale)
        else:
            params = {k: v for k, v in params.items() if k not in ('crop', 'source')}
            params['noise_seed'] = int(rng.integers(0, 2 ** 62))
            _, lq = self.degradation.apply(gt, params)
        return torch.from_numpy(np.ascontiguousarray(lq.transpose(2, 0, 1)))


def two_patches(lq, p: int, rng: np.random.Generator, other=None, disjoint: bool = False):
    """Two ``p x p`` crops -> ``[2, 3, p, p]``: both of ``lq`` ``[3, h, w]`` at different random
    positions (if possible), or the second of ``other`` ``[3, h', w']`` when it is given.
    Images smaller than ``p`` are replicate-padded first. ``disjoint``: the two crops of ``lq``
    share no pixel (module doc, ``same_lr_disjoint``)."""
    import torch
    import torch.nn.functional as F

    def padded(x):
        _, h, w = x.shape
        if h < p or w < p:
            x = F.pad(x[None], (0, max(0, p - w), 0, max(0, p - h)), mode='replicate')[0]
        return x

    if disjoint and other is None:
        return _disjoint_patches(padded(lq), p, rng)
    srcs = [padded(lq), padded(lq if other is None else other)]
    pos = []
    for k, src in enumerate(srcs):
        _, h, w = src.shape
        for _ in range(8):
            t, l_ = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
            if k == 0 or other is not None or (t, l_) != pos[0] or (h == p and w == p):
                break
        pos.append((t, l_))
    (t0, l0), (t1, l1) = pos
    return torch.stack([srcs[0][:, t0:t0 + p, l0:l0 + p], srcs[1][:, t1:t1 + p, l1:l1 + p]])


def _disjoint_patches(x, p: int, rng: np.random.Generator):
    """Two ``p x p`` crops of ``x`` [3, h, w] without a shared pixel: a random axis with room for
    two (h or w >= 2p), a split point on it, one crop on each side (which side is the query is
    random), a random position along the other axis for each."""
    import torch
    _, h, w = x.shape
    axes = [a for a, n in ((0, h), (1, w)) if n >= 2 * p]
    if not axes:
        raise ValueError(f'same_lr_disjoint needs an LR of at least {2 * p} px along one side, got {h}x{w}')
    a = axes[int(rng.integers(0, len(axes)))]
    n, m = (h, w) if a == 0 else (w, h)
    cut = int(rng.integers(p, n - p + 1))                 # first crop in [0, cut), second in [cut, n)
    along = [int(rng.integers(0, cut - p + 1)), int(rng.integers(cut, n - p + 1))]
    if rng.integers(0, 2):
        along.reverse()
    across = [int(rng.integers(0, m - p + 1)) for _ in range(2)]
    pos = [(u, v) if a == 0 else (v, u) for u, v in zip(along, across)]
    return torch.stack([x[:, t:t + p, l:l + p] for t, l in pos])
