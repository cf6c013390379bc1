"""DePLSR's feed-forward inference as a test.py restorer: RealDAT (or the plain DAT) on whole images
in overlapping pieces.

``method: {type: RealDATRestorer, weights: <RealDAT export folder>, tile: 200, tile_overlap: 16}``

* The SRCLIP conditioning (content + fine embeddings) is computed once per image from the whole
  LR (the paper model resizes it to 224 inside the encoder), so every piece of an image gets the
  same embeddings and the result does not depend on the tiling.
* The LR is cut into ``tile`` x ``tile`` pieces (DePLSR's test: 200 px, 16 px overlap) whose
  SR outputs are averaged where they overlap (uniform weights); ``tile: 0`` runs whole images.
  A piece at the right/bottom edge is shifted inwards so that every piece has the full size
  (when the image is at least that large).
* Deterministic: no random choice (``seeds`` are accepted and unused).
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Sequence

import torch

from dalpsr.restorers.base import Restorer
from dalpsr.utils.registry import RESTORER_REGISTRY

__all__ = ['RealDATRestorer', 'tile_starts']


def tile_starts(size: int, tile: int, overlap: int) -> List[int]:
    """Start offsets of pieces of ``tile`` px with at least ``overlap`` px overlap covering ``size``."""
    if tile <= 0 or size <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return sorted(set(starts))


@RESTORER_REGISTRY.register()
class RealDATRestorer(Restorer):
    """RealDAT / DAT from an export folder of ``RealDATModel`` (module doc).

    Args:
        weights: the export folder (``realdat.json``, ``realdat.safetensors`` [, ``srclip/``]).
        tile: LR piece size in px (0: whole images). tile_overlap: px shared by neighbouring pieces.
        device: 'cpu' / 'cuda' / 'cuda:N'.
    """

    def __init__(self, weights: str, tile: int = 200, tile_overlap: int = 16, device: str = 'cpu') -> None:
        super().__init__()
        from dalpsr.models.realdat_model import load_realdat
        if not weights:
            raise ValueError('RealDATRestorer: give weights (a RealDAT export folder)')
        self.weights = str(weights)
        self.tile, self.overlap = int(tile), int(tile_overlap)
        if self.tile < 0 or self.overlap < 0 or (self.tile and self.overlap >= self.tile):
            raise ValueError(f'RealDATRestorer: need tile >= 0 and 0 <= tile_overlap < tile, got {tile}, {tile_overlap}')
        self.device = torch.device(device)
        self.net, self.encoder, self.meta = load_realdat(self.weights, self.device)
        if self.meta.get('conditioning') == 'oracle':
            raise ValueError(f'{self.weights}: trained with conditioning: oracle (the true degradation degrees of '
                             'each training pair), which an image to restore does not have; it is an upper bound '
                             'measured at validation only')
        self.scale = int(self.net.config['upscale'])

    def describe(self) -> Dict[str, Any]:
        return {'type': type(self).__name__, 'scale': self.scale, 'weights': os.path.abspath(self.weights),
                'arch': self.meta.get('arch'), 'config': self.meta.get('config'), 'tile': self.tile,
                'tile_overlap': self.overlap, 'srclip': bool(self.encoder is not None)}

    @torch.no_grad()
    def _sr(self, lq: torch.Tensor, xi, xd) -> torch.Tensor:
        return self.net(lq, xi, xd) if xi is not None else self.net(lq)

    @torch.no_grad()
    def encode(self, lq: torch.Tensor):
        """The conditioning of whole LR images [B, 3, h, w] in [0, 1]: (xi [B, 1, E], xd [B, 5, E]),
        or (None, None) for an unconditioned DAT."""
        from dalpsr.models.realdat_model import condition
        return condition(self.encoder, lq.to(self.device, torch.float32))

    @torch.no_grad()
    def restore(self, lq: torch.Tensor, *, seeds: Sequence[int], captions: Sequence[str] = (),
                restoration: Sequence[str] = ()) -> torch.Tensor:
        if lq.dim() != 4 or lq.shape[1] != 3:
            raise ValueError(f'RealDATRestorer expects lq [B, 3, h, w], got {tuple(lq.shape)}')
        t0 = time.time()
        xi, xd = self.encode(lq)
        t1 = time.time()
        sr = self.super_resolve(lq, xi, xd)
        self.last_stats = {'encode_s': t1 - t0, **self.last_stats}
        return sr

    @torch.no_grad()
    def super_resolve(self, lq: torch.Tensor, xi=None, xd=None) -> torch.Tensor:
        """SR [B, 3, h*s, w*s] in [0, 1] of ``lq`` in pieces, every piece conditioned on the given
        (xi, xd) (:meth:`encode` of this or, for an ablation, of another image)."""
        if (xi is None) != (self.encoder is None):
            raise ValueError('RealDATRestorer.super_resolve: give (xi, xd) exactly when the model is conditioned')
        t1 = time.time()
        x = lq.to(self.device, torch.float32)
        B, _, h, w = x.shape
        s = self.scale
        out = torch.zeros(B, 3, h * s, w * s, device=self.device)
        cnt = torch.zeros(1, 1, h * s, w * s, device=self.device)
        ys, xs = tile_starts(h, self.tile, self.overlap), tile_starts(w, self.tile, self.overlap)
        th, tw = min(h, self.tile or h), min(w, self.tile or w)
        for y in ys:
            for x0 in xs:
                piece = self._sr(x[:, :, y:y + th, x0:x0 + tw], xi, xd)
                out[:, :, y * s:(y + th) * s, x0 * s:(x0 + tw) * s] += piece
                cnt[:, :, y * s:(y + th) * s, x0 * s:(x0 + tw) * s] += 1
        sr = (out / cnt).clamp(0, 1).cpu()
        self.last_stats = {'sr_s': time.time() - t1, 'pieces': len(ys) * len(xs)}
        return sr
