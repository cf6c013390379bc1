"""SigLIP loss with a learnable temperature and bias (DePLSR's SRCLIP objective).

    S(x, y) = -(1/B) sum_ij log sigmoid(z_ij (t x_i . y_j + b)),   z_ii = 1, z_ij = -1 (i != j)

``x``, ``y``: [B, E] L2-normalised image / text embeddings; ``t = exp(logit_scale)`` (init
log 10) and ``b`` (init -10) are parameters of the loss, trained with the encoders.
``same_text_positive``: pairs whose two captions are the same string are positives too (z = 1)
instead of being pushed apart (with few distinct captions in a batch, e.g. the two ringing
captions, the plain loss has contradictory targets; off = the paper).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dalpsr.utils.registry import LOSS_REGISTRY

__all__ = ['SigLIPLoss', 'same_text_mask']


def same_text_mask(texts: Sequence[str], device=None) -> torch.Tensor:
    """bool [B, B]: True where texts[i] == texts[j]."""
    ids = {}
    codes = torch.tensor([ids.setdefault(t, len(ids)) for t in texts], device=device)
    return codes[:, None] == codes[None, :]


@LOSS_REGISTRY.register()
class SigLIPLoss(nn.Module):
    """Module doc. ``forward(x [B, E], y [B, E], texts=None) -> scalar``; ``texts`` (the B captions
    of ``y``) is used by ``same_text_positive``."""

    def __init__(self, init_logit_scale: float = math.log(10.0), init_logit_bias: float = -10.0,
                 same_text_positive: bool = False, loss_weight: float = 1.0):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))
        self.same_text_positive = bool(same_text_positive)
        self.loss_weight = float(loss_weight)

    def logits(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.logit_scale.exp() * (x.float() @ y.float().t()) + self.logit_bias

    def forward(self, x: torch.Tensor, y: torch.Tensor, texts: Optional[Sequence[str]] = None) -> torch.Tensor:
        if x.shape != y.shape or x.dim() != 2:
            raise ValueError(f'SigLIPLoss expects two [B, E] tensors of one shape, got {tuple(x.shape)}, {tuple(y.shape)}')
        B = x.shape[0]
        if self.same_text_positive and texts is not None:
            pos = same_text_mask(texts, x.device)
        else:
            pos = torch.eye(B, dtype=torch.bool, device=x.device)
        z = pos.float() * 2 - 1
        return -self.loss_weight * F.logsigmoid(z * self.logits(x, y)).sum(1).mean()
