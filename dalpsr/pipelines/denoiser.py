"""What a method gives the shared denoising loop: a :class:`Denoiser` and its :class:`Conditions`.

The loop (:class:`dalpsr.pipelines.loop.DenoisingLoop`) owns everything that is the same for every
latent-diffusion SR method: the start latent, the scheduler, classifier-free guidance (CFG), latent
tiling, VAE tiling and the color fix. A method supplies

* a :class:`Denoiser`: ``predict(x_t, t, conditions) -> model output`` (one network evaluation;
  e.g. DaLPSR runs ControlNet then UNet inside it), and
* a function ``make_conditions(lr) -> Conditions`` that the loop calls once per batch with the
  :class:`~dalpsr.pipelines.loop.LRLatents` it computed (the upsampled LR and its latent ``z_lr``).

How the loop hands conditions to ``predict`` (N = batch rows of ``x_t``):

* no CFG (``guidance_scale <= 1``): N = B, ``conditions[key]`` is the conditional value;
* CFG: N = 2B, rows ``[0:B]`` are the unconditional branch and ``[B:2B]`` the conditional one
  (``conditions.branches == 2``); per-branch values (:attr:`Conditions.cond` /
  :attr:`Conditions.uncond`) are concatenated ``[uncond; cond]``; shared and spatial tensors are
  repeated ``[v; v]``;
* latent tiling: spatial maps are cropped to the tile (:attr:`Conditions.box`, in latent px,
  times each map's size ratio), the untiled maps stay available in :attr:`Conditions.full`.

Examples of the three kinds of value:

============  ===========================================================================  ========
kind          examples                                                                      per tile
============  ===========================================================================  ========
``cond``      text embeddings [B, L, D] (``uncond``: the negative prompt's)                 no
``shared``    CLIP image tokens [B, N, D], a degradation vector [B, K], a scalar           no
``spatial``   z_lr [B, 4, h, w] (ratio 1), upsampled LR image [B, 3, 8h, 8w] (ratio 8)      cropped
============  ===========================================================================  ========
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, Optional, Tuple

import torch

Box = Tuple[int, int, int, int]


def _cat2(a: Any, b: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, (list, tuple)):
        return type(a)(list(a) + list(b))
    raise TypeError(f'a per-branch condition must be a tensor or a list, got {type(a).__name__}')


def _repeat2(v: Any, b: int) -> Any:
    """Repeat batch-first values for the CFG batch; other values (scalars, ...) pass unchanged."""
    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b:
        return torch.cat([v, v])
    if isinstance(v, list) and len(v) == b:
        return v + v
    return v


@dataclass
class Conditions:
    """Everything a denoiser needs besides ``x_t`` and ``t``, for a batch of B images.

    Attributes:
        cond: per-branch values of the conditional branch, e.g. ``{'text': [B, L, D]}``.
        uncond: the same keys for the unconditional branch (needed when the loop runs CFG;
            a key missing here is taken from ``cond``).
        shared: values that are the same in both CFG branches and are not cropped per tile
            (batch-first tensors/lists of length B are repeated for the CFG batch).
        spatial: maps aligned with the latent, ``[B, C, h*r, w*r]`` for an integer ratio ``r``
            (``r`` = map height / latent height); cropped to the tile, repeated for CFG.
        box: set by the loop on the copy handed to ``predict``: the latent tile
            ``(top, left, h, w)`` in latent px (``(0, 0, H, W)`` without tiling).
        latent_hw: set by the loop: ``(H, W)`` of the whole latent.
        branches: set by the loop: 2 when rows ``[0:B]`` / ``[B:2B]`` are uncond / cond, else 1.
        full: set by the loop: the uncropped ``spatial`` maps ([B, ...], not repeated for CFG).
    """

    cond: Dict[str, Any] = field(default_factory=dict)
    uncond: Dict[str, Any] = field(default_factory=dict)
    shared: Dict[str, Any] = field(default_factory=dict)
    spatial: Dict[str, torch.Tensor] = field(default_factory=dict)
    box: Optional[Box] = None
    latent_hw: Optional[Tuple[int, int]] = None
    branches: int = 1
    full: Dict[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        """Look a key up in ``cond``, then ``shared``, then ``spatial``."""
        for d in (self.cond, self.shared, self.spatial):
            if key in d:
                return d[key]
        raise KeyError(f"no condition '{key}' (have: {', '.join(self.keys()) or 'none'})")

    def __contains__(self, key: str) -> bool:
        return key in self.cond or key in self.shared or key in self.spatial

    def keys(self):
        return list(self.cond) + list(self.shared) + list(self.spatial)

    def for_step(self, cfg: bool, latent_hw: Tuple[int, int], box: Optional[Box] = None) -> 'Conditions':
        """The view of these conditions for one ``predict`` call (batched for CFG, cropped to
        ``box``); the loop calls this, a method normally does not."""
        H, W = latent_hw
        box = box or (0, 0, H, W)
        top, left, th, tw = box
        spatial = {}
        for k, v in self.spatial.items():
            r = v.shape[-2] // H
            if r < 1 or v.shape[-2] != r * H or v.shape[-1] != r * W:
                raise ValueError(f"spatial condition '{k}' of size {tuple(v.shape[-2:])} is not an integer "
                                 f'multiple of the latent size {(H, W)}')
            spatial[k] = v[..., top * r:(top + th) * r, left * r:(left + tw) * r] if box != (0, 0, H, W) else v
        if not cfg:
            return replace(self, uncond={}, spatial=spatial, box=box, latent_hw=(H, W), branches=1,
                           full=self.spatial)
        b = self.batch_size()
        cond = {k: _cat2(self.uncond.get(k, v), v) for k, v in self.cond.items()}
        shared = {k: _repeat2(v, b) for k, v in self.shared.items()}
        spatial = {k: torch.cat([v, v]) for k, v in spatial.items()}
        return Conditions(cond=cond, uncond={}, shared=shared, spatial=spatial, box=box, latent_hw=(H, W),
                          branches=2, full=self.spatial)

    def batch_size(self) -> int:
        """B, from the first batch-first tensor of ``cond`` / ``spatial`` / ``shared``."""
        for d in (self.cond, self.spatial, self.shared):
            for v in d.values():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    return int(v.shape[0])
                if isinstance(v, list):
                    return len(v)
        raise ValueError('conditions hold no batch-first tensor: cannot tell the batch size')


class Denoiser:
    """One network evaluation of a method, called by the loop at every step (and tile).

    Subclass and implement :meth:`predict`. Attributes the loop reads:

    * ``prediction_type`` (optional): overrides the scheduler config's (``epsilon`` |
      ``v_prediction`` | ``sample``) when the method's network predicts something else.
    * ``dtype``: the loop hands ``x_t`` in float32; cast inside ``predict`` as needed.
    """

    prediction_type: Optional[str] = None

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, conditions: Conditions) -> torch.Tensor:
        """Model output for ``x_t`` [N, C, h, w] (float32, already ``scheduler.scale_model_input``-ed)
        at timestep ``t`` (a scalar tensor of the scheduler's timesteps, on the loop's device).

        ``conditions`` is the per-call view (see the module doc: N = B, or 2B with CFG where rows
        ``[0:B]`` are unconditional; spatial maps cropped to ``conditions.box``).
        Returns [N, C, h, w] in the scheduler's prediction type (any float dtype; the loop casts
        to float32 and applies CFG).
        """
        raise NotImplementedError

    def modules(self):
        """The torch modules of this denoiser (for ``eval()``, hooks, statistics); default none."""
        return []


__all__ = ['Conditions', 'Denoiser', 'Box']
