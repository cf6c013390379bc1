"""IRPAD exports and inference: ``save_irpad`` / ``load_irpad`` (irpad.json + irpad.safetensors),
``IRPADPredictor`` (prompt from LR images with a trained export) and the crop grid and LR
statistics it shares with training (:mod:`dalpsr.models.irpad_model` re-exports all of it).

* ``IRPADPredictor.from_pretrained(dir_or_file)``: ``predict_labels(lq) -> [B, T]``,
  ``predict_prompt(lq) -> List[str]`` (the C2 prompt format), used by training of the
  diffusion model (optional p_r from predictions) and by test.py.
* ``crop_starts`` / ``crop_boxes``: the crops an LR larger than ``train_crop`` is scored with.
* ``lr_statistics``: the degradation statistics of uint8 LR arrays per crop.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

__all__ = ['IRPADPredictor', 'StatsTermOnly', 'crop_starts', 'crop_boxes', 'lr_statistics', 'save_irpad', 'load_irpad',
           'CONFIG_NAME', 'WEIGHTS_NAME']

CONFIG_NAME = 'irpad.json'
WEIGHTS_NAME = 'irpad.safetensors'

logger = logging.getLogger('dalpsr')


def _spec_from_opt(prompt_opt):
    from dalpsr.data.prompt_labels import PromptSpec
    return PromptSpec.from_opt(prompt_opt)


# --------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------
def save_irpad(net, prompt_opt: Optional[Dict[str, Any]], out_dir: str, extra: Optional[Dict[str, Any]] = None):
    """Write ``out_dir/irpad.json`` (arch config + prompt options) and ``out_dir/irpad.safetensors``
    atomically."""
    from safetensors.torch import save_file
    from dalpsr.utils.misc import atomic_path, atomic_write_json
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(os.path.join(out_dir, WEIGHTS_NAME)) as tmp:
        save_file(state, str(tmp))
    # the full spec (types, intervals, templates, separator, noise severity), defaults written out
    meta = {'format': 'dalpsr-irpad-1', 'arch': net.config, 'prompt': _spec_from_opt(prompt_opt or None).to_opt()}
    meta.update(extra or {})
    atomic_write_json(os.path.join(out_dir, CONFIG_NAME), meta)


def load_irpad(path: str, map_location='cpu'):
    """Load what :func:`save_irpad` wrote. ``path``: the folder, or its irpad.safetensors /
    irpad.json. Returns ``(net in eval mode, PromptSpec, meta)``."""
    from safetensors.torch import load_file
    from dalpsr.archs.irpad_arch import IRPAD
    folder = path if os.path.isdir(path) else os.path.dirname(path) or '.'
    cfg_path, w_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, WEIGHTS_NAME)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"IRPAD checkpoint incomplete: {p} not found (an IRPAD export folder holds "
                                    f"{CONFIG_NAME} and {WEIGHTS_NAME}; train one with "
                                    "options/train/train_irpad_cpu.yml)")
    with open(cfg_path, encoding='utf-8') as f:
        meta = json.load(f)
    if meta.get('format') != 'dalpsr-irpad-1':
        raise ValueError(f"{cfg_path}: not an IRPAD config (format {meta.get('format')!r})")
    net = IRPAD(**meta['arch'])
    state = load_file(w_path, device='cpu')
    missing, unexpected = net.load_state_dict(state, strict=False)
    # non-persistent buffers (normalisation constants) are not in the file; anything else is an error
    missing = [k for k in missing if not k.endswith(('.mean', '.std'))]
    if missing or unexpected:
        raise ValueError(f"{w_path}: weights do not match the config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    if 'prompt' not in meta:
        logger.info(f'{cfg_path} records no prompt spec (an older export): the default spec is assumed')
    spec = _spec_from_opt(meta.get('prompt') or None)
    if len(spec.types) != net.num_types or spec.num_intervals != net.num_intervals:
        raise ValueError(f"{cfg_path}: prompt spec ({len(spec.types)} types x {spec.num_intervals}) does not "
                         f"match the network ({net.num_types} x {net.num_intervals})")
    return net.to(map_location).eval(), spec, meta



# --------------------------------------------------------------------------------------------
# inference API (C7)
# --------------------------------------------------------------------------------------------
def crop_starts(size: int, crop: int, align: int = 1) -> List[int]:
    """Start offsets of crops of length ``crop`` that cover ``[0, size)``: one crop (offset 0)
    when ``size <= crop``, else ``ceil((size - crop) / crop) + 1`` evenly spread offsets from 0 to
    ``size - crop``, each rounded down to a multiple of ``align`` (the JPEG 8x8 grid, as in
    training; the last crop then stops at most ``align - 1`` pixels short of the border)."""
    if size <= crop:
        return [0]
    last = size - crop
    n = math.ceil(last / crop) + 1
    starts = [(round(i * last / (n - 1)) // align) * align for i in range(n)]
    return sorted(set(starts))


def crop_boxes(h: int, w: int, crop: int, align: int = 1) -> List[tuple]:
    """``(y, x, ch, cw)`` of the crops IRPAD scores an ``h x w`` LR with: the grid of
    :func:`crop_starts` in both directions, or the whole LR when ``crop`` <= 0."""
    if crop <= 0:
        return [(0, 0, h, w)]
    ch, cw = min(crop, h), min(crop, w)
    return [(y, x, ch, cw) for y in crop_starts(h, ch, align) for x in crop_starts(w, cw, align)]


def lr_statistics(lq_uint8, feature_set: str = 'v1', boxes: Optional[Sequence[tuple]] = None,
                  batch: int = 256) -> torch.Tensor:
    """Degradation statistics (:func:`dalpsr.archs.degradation_stats.degradation_statistics`) of
    LR images uint8 [N, h, w, 3] -> float32 [N, C, F], one row per box ``(y, x, bh, bw)`` of
    ``boxes`` (default: the whole LR, C = 1); ``batch`` images at a time."""
    from dalpsr.archs.degradation_stats import degradation_statistics
    boxes = list(boxes or [(0, 0) + tuple(lq_uint8.shape[1:3])])
    out = []
    with torch.no_grad():
        for i in range(0, len(lq_uint8), batch):
            x = torch.from_numpy(np.ascontiguousarray(lq_uint8[i:i + batch])).permute(0, 3, 1, 2).float().div_(255.0)
            out.append(torch.stack([degradation_statistics(x[:, :, y:y + a, x0:x0 + b], feature_set)
                                    for y, x0, a, b in boxes], 1))
    return torch.cat(out)


class StatsTermOnly(torch.nn.Module):
    """lq [B, 3, h, w] in [0, 1] -> the ``stats_score`` term of ``net`` alone as logits [B, T, K]
    (``IRPAD.stats_logits`` of the LR's statistics): what the statistics path predicts by itself."""

    def __init__(self, net):
        super().__init__()
        if not getattr(net, 'stats_tokens', 0):
            raise ValueError('stats_only needs an IRPAD with stats_score: true')
        self.net = net

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        from dalpsr.archs.degradation_stats import degradation_statistics
        return self.net.stats_logits(degradation_statistics(lq, self.net.image_encoder.dstat.feature_set))


class IRPADPredictor:
    """Degradation prompt from LR images with a trained IRPAD.

    IRPAD sees at test time what it saw in training: with an export that records
    ``train_crop`` > 0, the LR is cut into crops of that size (offsets from :func:`crop_starts`,
    aligned as in training) and the logits are averaged over the crops; an LR no larger than the
    crop is one crop (the whole image). ``train_crop`` 0 (trained on whole LRs) or absent (an
    older export; logged) predicts on the whole LR. ``crop`` overrides it (0: whole LR).
    ``tta``: also average the logits over the 8 flips/rot90 of the LR (the training augmentation;
    they keep the 8x8 JPEG grid of an LR whose sides are multiples of 8). ``stats_only``: score
    with the statistics term alone (:class:`StatsTermOnly`; a diagnostic of ``stats_score`` models).

    >>> pred = IRPADPredictor.from_pretrained('experiments/irpad_cpu/export')   # doctest: +SKIP
    >>> pred.predict_prompt(lq)   # lq [B, 3, h, w] in [0, 1]                    # doctest: +SKIP
    ['Deblur with sigma 0.5~0.75, Denoise with sigma 0~0.25, Dejpeg with sigma 0.25~0.5', ...]
    """

    def __init__(self, net, spec, device='cpu', meta: Optional[Dict[str, Any]] = None, crop: Optional[int] = None,
                 crop_align: Optional[int] = None, crop_batch: int = 16, tta: bool = False,
                 stats_only: bool = False):
        self.device = torch.device(device)
        self.tta = bool(tta)
        self.stats_only = bool(stats_only)
        self.net = (StatsTermOnly(net) if self.stats_only else net).to(self.device).eval()
        self.spec = spec
        self.meta = meta or {}
        if crop is None:
            if 'train_crop' not in self.meta:
                logger.info('IRPAD export records no train_crop (an older export): predicting on whole LR images')
            crop = self.meta.get('train_crop') or 0
        self.crop = int(crop)
        self.crop_align = int(crop_align if crop_align is not None else self.meta.get('train_crop_align') or 1)
        self.crop_batch = max(1, int(crop_batch))
        if self.crop < 0 or self.crop_align < 1:
            raise ValueError(f'IRPADPredictor: crop must be >= 0 and crop_align >= 1, got {self.crop}, {self.crop_align}')

    @classmethod
    def from_pretrained(cls, path_or_dir: str, device='cpu', **kwargs) -> 'IRPADPredictor':
        net, spec, meta = load_irpad(path_or_dir)
        return cls(net, spec, device, meta, **kwargs)

    @property
    def types(self) -> List[str]:
        return list(self.spec.types)

    def _check(self, lq: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(lq) or lq.dim() != 4 or lq.shape[1] != 3:
            raise ValueError(f'IRPADPredictor expects lq as a tensor [B, 3, h, w] in [0, 1], got '
                             f'{tuple(lq.shape) if torch.is_tensor(lq) else type(lq).__name__}')
        return lq.to(self.device, torch.float32)

    def crops(self, h: int, w: int) -> List[tuple]:
        """``(y, x, ch, cw)`` of every crop of an ``h x w`` LR (one, the whole LR, without crop)."""
        return crop_boxes(h, w, self.crop, self.crop_align)

    @torch.no_grad()
    def predict_logits(self, lq: torch.Tensor) -> torch.Tensor:
        """lq [B, 3, h, w] in [0, 1] -> scores [B, T, K] (mean over the crops' logits, and over the
        8 flips/rot90 with ``tta``)."""
        lq = self._check(lq)
        if not self.tta:
            return self._crop_logits(lq)
        views = [torch.rot90(lq.flip(-1) if code & 4 else lq, code & 3, (-2, -1)) for code in range(8)]
        return sum(self._crop_logits(v) for v in views) / len(views)

    def _crop_logits(self, lq: torch.Tensor) -> torch.Tensor:
        boxes = self.crops(*lq.shape[-2:])
        if len(boxes) == 1 and boxes[0][2:] == tuple(lq.shape[-2:]):
            return self.net(lq)
        total = None
        for i in range(0, len(boxes), self.crop_batch):
            part = boxes[i:i + self.crop_batch]
            x = torch.cat([lq[:, :, y:y + ch, x0:x0 + cw] for y, x0, ch, cw in part])   # [n*B, 3, ch, cw]
            s = self.net(x).view(len(part), lq.shape[0], self.spec.num_types, self.spec.num_intervals).sum(0)
            total = s if total is None else total + s
        return total / len(boxes)

    @torch.no_grad()
    def predict_probs(self, lq: torch.Tensor) -> torch.Tensor:
        """lq [B, 3, h, w] in [0, 1] -> per-type interval probabilities [B, T, K] (sum 1 over K)."""
        return self.predict_logits(lq).softmax(-1)

    @torch.no_grad()
    def predict_labels(self, lq: torch.Tensor) -> torch.LongTensor:
        """lq [B, 3, h, w] in [0, 1] -> LongTensor [B, T] (interval 0..K-1 per type, order of spec.types)."""
        return self.predict_logits(lq).argmax(-1).cpu()

    @torch.no_grad()
    def predict_prompt(self, lq: torch.Tensor) -> List[str]:
        """lq [B, 3, h, w] in [0, 1] -> one restoration prompt per image (``spec.prompt``)."""
        return [self.spec.prompt([int(v) for v in row]) for row in self.predict_labels(lq).tolist()]
