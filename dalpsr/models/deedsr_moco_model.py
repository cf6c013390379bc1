"""DeeDSR stage 1: ``MoCoDegradationModel``, the degradation learner trained with MoCo v2.

Per micro-batch (items of :class:`~dalpsr.data.deedsr_dataset.DeeDSRDataset` with
``patch_size``: ``patches`` ``[B, 2n, 3, p, p]``, n pairs of patches of the same degraded LR,
flattened to B*n (query, key) pairs)::

    q = normalize(head_q(E_q(patch 0)))                    # [B, dim], trained
    k = normalize(head_k(E_k(patch 1)))                    # momentum encoder, no gradient,
                                                           #   Shuffle-BN (below)
    logits = [q.k, q.queue] / tau                          # [B, 1 + K]; queue [dim, K] of past keys
    loss = cross_entropy(logits, 0)                        # InfoNCE, positive in the denominator
    enqueue k (of every process)

The key encoder follows the query encoder once per optimizer step (``theta_k = m theta_k +
(1 - m) theta_q``, at the first micro-batch of each step, before the keys are computed, as in
MoCo). Key encoder (parameters and BN buffers), queue, queue pointer and the per-step
micro-batch counter are one module registered with ``accelerator.register_for_checkpointing``,
so a resumed run continues exactly.

Shuffle-BN (``shuffle_bn: true``): with several processes the key batch is gathered, permuted
with a permutation shared by all processes (drawn from ``(seed, step, micro-batch)``), encoded
in per-process slices and un-shuffled, so the BatchNorm statistics of a key never come from the
samples its query saw. On one process the substitute is ``network.bn_splits`` > 1 (split-batch
BN, the official MoCo CIFAR demo's) with an in-batch permutation of the keys, or
``network.norm: gn`` (GroupNorm: no batch statistics at all). A single process with plain BN
and no splits trains, but BN can leak batch information (the model logs a warning).

Options (``model:`` block; every key documented in options/reference/deedsr.yml)::

    type: MoCoDegradationModel
    network: {type: DegradationResNet, layers, widths, stem, norm, bn_splits}
    head_dim: 128        # MoCo v2 MLP head output
    queue_size: 24576    # K (code 24576, paper 16384)
    momentum: 0.999
    temperature: 0.07
    shuffle_bn: true

``export``: ``degradation_learner.pth`` (encoder only, the head is dropped) and
``degradation_learner.json`` (its architecture); stage 2 loads them with
:func:`dalpsr.archs.deedsr_learner_arch.load_degradation_learner`.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Dict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dalpsr.archs.deedsr_learner_arch import DegradationResNet, MoCoEncoder, save_degradation_learner
from dalpsr.models.base_model import BaseModel, resolve_model_block
from dalpsr.utils.misc import sample_rng
from dalpsr.utils.options import OptionError, check_keys
from dalpsr.utils.registry import MODEL_REGISTRY

logger = logging.getLogger('dalpsr')

DEFAULTS: Dict[str, Any] = {
    'network': {'type': 'DegradationResNet'},
    'head_dim': 128,
    'queue_size': 24576,
    'momentum': 0.999,
    'temperature': 0.07,
    'shuffle_bn': True,
}
NETWORK_KEYS = ('type', 'layers', 'widths', 'stem', 'norm', 'bn_splits', 'in_range', 'stem_stride', 'stem_pool', 'highpass')


class MoCoState(nn.Module):
    """Everything of MoCo that is not trained by the optimizer: the key encoder (+ head), the
    queue ``[dim, K]`` of normalised keys, its write pointer and the micro-batch counter."""

    def __init__(self, encoder_q: MoCoEncoder, queue_size: int, dim: int):
        super().__init__()
        self.encoder_k = copy.deepcopy(encoder_q)
        self.encoder_k.requires_grad_(False)
        self.register_buffer('queue', F.normalize(torch.randn(dim, queue_size), dim=0))
        self.register_buffer('queue_ptr', torch.zeros((), dtype=torch.long))
        self.register_buffer('micro_step', torch.tensor([-1, 0], dtype=torch.long))  # (step, micro index)


def _gather(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 (same shape on every process), no gradient."""
    import torch.distributed as dist
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def build_learner(network: Dict[str, Any], src: str) -> DegradationResNet:
    """The ``model.network`` block (type DegradationResNet, keys of :data:`NETWORK_KEYS`) as a
    network; a bad key or value is an ``OptionError`` naming ``src``."""
    net = dict(network or {})
    check_keys(net, NETWORK_KEYS, f'model.network in {src}')
    if net.pop('type', 'DegradationResNet') != 'DegradationResNet':
        raise OptionError(f'model.network.type in {src} must be DegradationResNet')
    try:
        return DegradationResNet(**net)
    except (TypeError, ValueError) as err:
        raise OptionError(f'model.network in {src}: {err}') from None


@MODEL_REGISTRY.register()
class MoCoDegradationModel(BaseModel):
    """MoCo v2 on pairs of LR patches (module doc)."""

    def __init__(self, opt: Dict[str, Any], accelerator=None):
        super().__init__(opt, accelerator)
        cfg, src = resolve_model_block(opt, DEFAULTS)
        self.cfg = cfg
        self.seed = int(opt.get('seed', opt.get('manual_seed', 0)))
        self.tau = float(cfg['temperature'])
        self.m = float(cfg['momentum'])
        if not (self.tau > 0 and 0 <= self.m < 1 and int(cfg['queue_size']) > 0 and int(cfg['head_dim']) > 0):
            raise OptionError(f'model in {src}: need temperature > 0, 0 <= momentum < 1, queue_size > 0, head_dim > 0')
        encoder = build_learner(cfg['network'], src)
        self.encoder_q = MoCoEncoder(encoder, int(cfg['head_dim'])).to(self.device)
        self.moco = MoCoState(self.encoder_q, int(cfg['queue_size']), int(cfg['head_dim'])).to(self.device)
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.shuffle_bn = bool(cfg['shuffle_bn'])
        if self.world == 1 and encoder.config['norm'] == 'bn' and encoder.config['bn_splits'] == 1:
            logger.warning('MoCo on one process with plain BatchNorm: batch statistics are shared by query and '
                           'key; set model.network.bn_splits > 1 (split-batch Shuffle-BN) or norm: gn')
        if accelerator is not None:
            accelerator.register_for_checkpointing(self.moco)

    def trainable_modules(self) -> Dict[str, nn.Module]:
        return {'encoder_q': self.encoder_q}

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _momentum_update(self) -> None:
        q = self.unwrap(self.encoder_q)
        for pk, pq in zip(self.moco.encoder_k.parameters(), q.parameters()):
            pk.mul_(self.m).add_(pq.detach(), alpha=1 - self.m)

    def _perm(self, n: int, step: int, micro: int) -> torch.Tensor:
        return torch.from_numpy(sample_rng(self.seed, step, micro, 303).permutation(n)).to(self.device)

    @torch.no_grad()
    def _keys(self, x: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        """Normalised keys of ``x`` ``[B, 3, p, p]`` with Shuffle-BN (module doc)."""
        enc = self.moco.encoder_k
        enc.train()
        if not self.shuffle_bn:
            return F.normalize(enc(x), dim=1)
        if self.world > 1:
            import torch.distributed as dist
            b = x.shape[0]
            allx = _gather(x)
            perm = self._perm(allx.shape[0], step, micro)
            rank = dist.get_rank()
            mine = perm[rank * b:(rank + 1) * b]
            k = _gather(enc(allx[mine]))           # keys of the shuffled order
            inv = torch.argsort(perm)
            return F.normalize(k[inv][rank * b:(rank + 1) * b], dim=1)
        perm = self._perm(x.shape[0], step, micro)
        k = enc(x[perm])
        return F.normalize(k[torch.argsort(perm)], dim=1)

    @torch.no_grad()
    def _enqueue(self, k: torch.Tensor) -> None:
        if self.world > 1:
            k = _gather(k)
        queue, size = self.moco.queue, self.moco.queue.shape[1]
        ptr = int(self.moco.queue_ptr)
        n = k.shape[0]
        idx = (torch.arange(n, device=k.device) + ptr) % size
        queue[:, idx[-size:]] = k[-size:].T.to(queue.dtype)
        self.moco.queue_ptr.fill_((ptr + n) % size)

    def training_step(self, batch: Dict[str, Any], step: int) -> Dict[str, Any]:
        patches = batch['patches'].to(self.device).float()
        if patches.ndim != 5 or patches.shape[1] % 2:
            raise ValueError(f"batch['patches'] must be [B, 2n, 3, p, p], got {list(patches.shape)}")
        patches = patches.reshape(-1, 2, *patches.shape[2:])  # [B*n, 2, 3, p, p]: (query, key) pairs
        ms = self.moco.micro_step
        if int(ms[0]) != step:
            self._momentum_update()
            ms[0], ms[1] = step, 0
        micro = int(ms[1])
        ms[1] += 1
        q = F.normalize(self.encoder_q(patches[:, 0]), dim=1)
        k = self._keys(patches[:, 1], step, micro)
        queue = self.moco.queue.clone().detach()
        l_pos = (q * k).sum(dim=1, keepdim=True)
        l_neg = q @ queue
        logits = torch.cat([l_pos, l_neg], dim=1) / self.tau
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        loss = F.cross_entropy(logits.float(), labels)
        acc = (logits.argmax(dim=1) == 0).float().mean()
        self._enqueue(k)
        return {'loss': loss, 'acc_queue': float(acc), 'pos_sim': float(l_pos.detach().mean())}

    @torch.no_grad()
    def validate(self, loader, step: int, writer=None) -> Dict[str, float]:
        """In-batch instance discrimination on the val set: for each query patch, is its own key
        (the other patch of the same LR) the most similar key of the batch? Encoders in eval
        mode. Returns ``{'top1': fraction, 'pos_sim': mean q.k}``."""
        enc = self.unwrap(self.encoder_q)
        hits, n, pos = 0, 0, 0.0
        for batch in loader:
            p = batch['patches'].to(self.device).float()[:, :2]  # the first pair of each LR
            if p.shape[0] < 2:
                continue
            q = F.normalize(enc(p[:, 0]), dim=1)
            k = F.normalize(enc(p[:, 1]), dim=1)
            sim = q @ k.T
            hits += int((sim.argmax(dim=1) == torch.arange(len(q), device=q.device)).sum())
            pos += float(sim.diag().sum())
            n += len(q)
        return {'top1': hits / n, 'pos_sim': pos / n} if n else {}

    def export(self, out_dir: str) -> None:
        enc = self.unwrap(self.encoder_q).encoder
        save_degradation_learner(out_dir, enc, {'stage': 1, 'method': 'DeeDSR', 'momentum': self.m,
                                                'temperature': self.tau, 'queue_size': int(self.cfg['queue_size']),
                                                'head_dim': int(self.cfg['head_dim'])})


def queue_snapshot(model: MoCoDegradationModel) -> np.ndarray:
    """The current queue as numpy ``[dim, K]`` (tests, diagnostics)."""
    return model.state.queue.detach().cpu().numpy().copy()
