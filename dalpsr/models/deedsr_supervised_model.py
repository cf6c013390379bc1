"""DeeDSR stage 1, diagnostic: the degradation learner trained *with* the labels.

``SupervisedDegradationModel`` trains the same :class:`DegradationResNet` as
:class:`~dalpsr.models.deedsr_moco_model.MoCoDegradationModel`, on the same patches, with one linear
head per degradation type and cross-entropy on the K-interval labels of the LR (``labels``
[B, T] of :class:`~dalpsr.data.deedsr_dataset.DeeDSRDataset`; every patch of an LR carries that
LR's labels). It is not part of DeeDSR: it measures how much of each type's interval this encoder
can read from these LRs at all, so a linear probe on its frozen d (the same probe as the MoCo
learner's, ``scripts/probe_degradation_encoder.py``) is a ceiling to set the self-supervised
learner against.

Options (``model:`` block; documented in options/reference/deedsr.yml)::

    type: SupervisedDegradationModel
    network: {type: DegradationResNet, ...}   # as MoCoDegradationModel
    num_types: 3          # T: label columns (the dataset's prompt types)
    num_intervals: 4      # K

``export``: the encoder alone, in the learner format (``degradation_learner.pth/.json``), heads dropped.
"""
from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import nn

from dalpsr.archs.deedsr_learner_arch import DegradationResNet, save_degradation_learner
from dalpsr.models.base_model import BaseModel, resolve_model_block
from dalpsr.models.deedsr_moco_model import build_learner
from dalpsr.utils.options import OptionError
from dalpsr.utils.registry import MODEL_REGISTRY

DEFAULTS: Dict[str, Any] = {'network': {'type': 'DegradationResNet'}, 'num_types': 3, 'num_intervals': 4}


class _Classifier(nn.Module):
    def __init__(self, encoder: DegradationResNet, num_types: int, k: int):
        super().__init__()
        self.encoder, self.t, self.k = encoder, num_types, k
        self.heads = nn.Linear(encoder.dim, num_types * k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, 3, p, p] in [0, 1] -> logits [N, T, K]."""
        return self.heads(self.encoder(x)).view(-1, self.t, self.k)


@MODEL_REGISTRY.register()
class SupervisedDegradationModel(BaseModel):
    """Cross-entropy per type on the learner's patches (module doc)."""

    def __init__(self, opt: Dict[str, Any], accelerator=None):
        super().__init__(opt, accelerator)
        cfg, src = resolve_model_block(opt, DEFAULTS)
        t, k = int(cfg['num_types']), int(cfg['num_intervals'])
        if t < 1 or k < 2:
            raise OptionError(f'model in {src}: need num_types >= 1 and num_intervals >= 2, got {t}, {k}')
        self.net = _Classifier(build_learner(cfg['network'], src), t, k).to(self.device)

    def trainable_modules(self) -> Dict[str, nn.Module]:
        return {'net': self.net}

    def _patches_and_labels(self, batch: Dict[str, Any]):
        patches, labels = batch['patches'].to(self.device).float(), batch['labels'].to(self.device).long()
        if patches.ndim != 5 or labels.ndim != 2 or labels.shape[1] != self.unwrap(self.net).t:
            raise ValueError(f"need batch['patches'] [B, 2n, 3, p, p] and labels [B, {self.unwrap(self.net).t}], got "
                             f"{list(patches.shape)} and {list(labels.shape)}")
        n = patches.shape[1]
        return patches.flatten(0, 1), labels.repeat_interleave(n, dim=0)

    def training_step(self, batch: Dict[str, Any], step: int) -> Dict[str, Any]:
        x, y = self._patches_and_labels(batch)
        logits = self.net(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        acc = (logits.argmax(-1) == y).float().mean()
        return {'loss': loss, 'acc': float(acc)}

    @torch.no_grad()
    def validate(self, loader, step: int, writer=None) -> Dict[str, float]:
        """Accuracy per type (``acc_<i>``) and overall on the val patches, heads included."""
        net = self.unwrap(self.net)
        hits, n = None, 0
        for batch in loader:
            x, y = self._patches_and_labels(batch)
            h = (net(x).argmax(-1) == y).float().sum(0)
            hits = h if hits is None else hits + h
            n += len(y)
        if not n:
            return {}
        acc = (hits / n).tolist()
        return {'acc': sum(acc) / len(acc), **{f'acc_{i}': a for i, a in enumerate(acc)}}

    def export(self, out_dir: str) -> None:
        save_degradation_learner(out_dir, self.unwrap(self.net).encoder, {'stage': 1, 'method': 'supervised ceiling'})
