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

Items: those of TripletDataset (``gt``, ``lq``, ``labels``, ``prompt``, ``caption``, ``params``,
``key``, ``index``), plus ``degraded`` (bool: False for a no-degradation sample) and
``patches`` when ``patch_size`` is set.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Optional

import cv2
import numpy as np

from dalpsr.data.triplet_dataset import TripletDataset
from dalpsr.utils.misc import sample_rng
from dalpsr.utils.registry import DATASET_REGISTRY


def bicubic_down(gt_hwc: np.ndarray, scale: int) -> np.ndarray:
    """HxWx3 float32 [0, 1] -> (H/scale)x(W/scale)x3 bicubic, clipped and on the 8-bit grid."""
    h, w = gt_hwc.shape[:2]
    lq = cv2.resize(gt_hwc, (w // scale, h // scale), interpolation=cv2.INTER_CUBIC)
    return np.round(np.clip(lq, 0, 1) * 255.0).astype(np.float32) / 255.0


@DATASET_REGISTRY.register()
class DeeDSRDataset(TripletDataset):
    """TripletDataset + ``no_degradation_prob`` + optional MoCo ``patch_size`` (module doc).

    Extra args:
        no_degradation_prob: probability of a bicubic-only LR (StableSR setting 0.01).
        patch_size: side of the two LR patches (query, key) of stage 1, or ``None``.
        patch_pairs: (query, key) pairs per LR (default 1).
    Every other argument is TripletDataset's.
    """

    def __init__(self, *args, no_degradation_prob: float = 0.0, patch_size: Optional[int] = None,
                 patch_pairs: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        p = float(no_degradation_prob)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f'no_degradation_prob must be a probability in [0, 1], got {no_degradation_prob}')
        self.no_degradation_prob = p
        self.patch_size = int(patch_size) if patch_size else None
        self.patch_pairs = int(patch_pairs)
        if self.patch_pairs < 1:
            raise ValueError(f'patch_pairs must be >= 1, got {patch_pairs}')
        if self.patch_size is not None:
            if self.patch_size < 8:
                raise ValueError(f'patch_size must be >= 8, got {patch_size}')
            if self.gt_size is not None and self.patch_size > self.gt_size // self.scale:
                raise ValueError(f'patch_size {self.patch_size} is larger than the LR crop '
                                 f'{self.gt_size // self.scale} (gt_size {self.gt_size} / scale {self.scale})')

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
            item['patches'] = torch.cat([two_patches(item['lq'], self.patch_size, rng)
                                         for _ in range(self.patch_pairs)])
        return item


def two_patches(lq, p: int, rng: np.random.Generator):
    """Two ``p x p`` crops of ``lq`` ``[3, h, w]`` at different random positions (if possible)
    -> ``[2, 3, p, p]``. Images smaller than ``p`` are reflect-padded first."""
    import torch
    import torch.nn.functional as F
    _, h, w = lq.shape
    if h < p or w < p:
        lq = F.pad(lq[None], (0, max(0, p - w), 0, max(0, p - h)), mode='replicate')[0]
        _, h, w = lq.shape
    pos = []
    for k in range(2):
        for _ in range(8):
            t, l_ = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
            if k == 0 or (t, l_) != pos[0] or (h == p and w == p):
                break
        pos.append((t, l_))
    return torch.stack([lq[:, t:t + p, l_:l_ + p] for t, l_ in pos])
