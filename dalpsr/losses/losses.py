"""Basic losses, registered in ``LOSS_REGISTRY`` (options: ``type: MSELoss``, ``loss_weight: 1``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dalpsr.utils.registry import LOSS_REGISTRY

_REDUCTIONS = ('none', 'mean', 'sum')


class _WeightedLoss(nn.Module):
    def __init__(self, loss_weight: float = 1.0, reduction: str = 'mean'):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got '{reduction}'")
        self.loss_weight = float(loss_weight)
        self.reduction = reduction


@LOSS_REGISTRY.register()
class L1Loss(_WeightedLoss):
    """Mean absolute error. pred, target: any matching shapes."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_weight * F.l1_loss(pred, target, reduction=self.reduction)


@LOSS_REGISTRY.register()
class MSELoss(_WeightedLoss):
    """Mean squared error (the eps-prediction loss of the diffusion model, the LR/HR
    feature-alignment loss of the captioner's encoder). pred, target: matching shapes."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_weight * F.mse_loss(pred.float(), target.float(), reduction=self.reduction)


@LOSS_REGISTRY.register()
class CrossEntropyLoss(_WeightedLoss):
    """Cross-entropy over classes. logits: (N, C) or (N, C, ...); target: (N, ...) int64."""

    def __init__(self, loss_weight: float = 1.0, reduction: str = 'mean', label_smoothing: float = 0.0):
        super().__init__(loss_weight, reduction)
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_weight * F.cross_entropy(logits.float(), target, reduction=self.reduction,
                                                  label_smoothing=self.label_smoothing)
