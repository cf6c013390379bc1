"""IRPAD training model (for the loop in dalpsr/train.py) and the inference API.

* ``IRPADModel`` (registered): trains :class:`dalpsr.archs.irpad_arch.IRPAD` as fine-grained
  retrieval of the right interval prompt per degradation type (cross-entropy over the K
  intervals of each type, averaged over types), validates per-type accuracy, balanced
  accuracy and within-one-interval accuracy, and exports ``irpad.json`` +
  ``irpad.safetensors``.
* ``IRPADPredictor``, ``save_irpad``, ``load_irpad`` (defined in :mod:`dalpsr.models.irpad_predictor`, re-exported):
  ``from_pretrained(dir_or_file)``, ``predict_labels(lq) -> [B, T]``, ``predict_prompt(lq)``.
* ``confusion_metrics``: the numbers that validate() and scripts/eval_irpad.py report.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dalpsr.models.base_model import BaseModel
from dalpsr.models.irpad_predictor import (CONFIG_NAME, WEIGHTS_NAME, IRPADPredictor, StatsTermOnly, _spec_from_opt,
                                          crop_boxes, crop_starts, load_irpad, lr_statistics, save_irpad)
from dalpsr.utils.registry import MODEL_REGISTRY

__all__ = ['IRPADModel', 'IRPADPredictor', 'StatsTermOnly', 'crop_starts', 'crop_boxes', 'lr_statistics', 'build_irpad', 'confusion_metrics', 'confusion_matrices',
           'save_irpad', 'load_irpad', 'CONFIG_NAME', 'WEIGHTS_NAME']




def build_irpad(spec, network: Optional[Dict[str, Any]] = None):
    """IRPAD for the types/intervals/phrases of a ``PromptSpec``; ``network`` holds the other
    IRPAD kwargs (image_encoder, prompt_embedding, embed_dim, ...)."""
    from dalpsr.archs.irpad_arch import IRPAD
    from dalpsr.utils.registry import check_call_kwargs
    network = dict(network or {})
    network.pop('type', None)
    for key in ('num_types', 'num_intervals', 'candidates'):
        if key in network:
            from dalpsr.utils.options import OptionError
            raise OptionError(f"model.network: '{key}' comes from the prompt spec (model.prompt); remove it")
    check_call_kwargs(IRPAD, network, 'model.network (IRPAD)')
    return IRPAD(num_types=len(spec.types), num_intervals=spec.num_intervals, candidates=spec.candidates(),
                 **network)


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------
def confusion_matrices(pred: torch.Tensor, target: torch.Tensor, num_intervals: int) -> np.ndarray:
    """pred, target: int [N, T] -> counts [T, K, K] (row: true interval, column: predicted)."""
    pred = torch.as_tensor(pred).long().cpu().numpy()
    target = torch.as_tensor(target).long().cpu().numpy()
    T = target.shape[1]
    conf = np.zeros((T, num_intervals, num_intervals), dtype=np.int64)
    for t in range(T):
        np.add.at(conf[t], (target[:, t], pred[:, t]), 1)
    return conf


def confusion_metrics(conf: np.ndarray, types: Sequence[str]) -> Dict[str, float]:
    """Per type ``t``: ``acc/t`` (fraction correct), ``bacc/t`` (balanced accuracy: mean recall
    over the intervals that occur), ``within1/t`` (|pred - true| <= 1); and their means over
    types as ``acc/mean``, ``bacc/mean``, ``within1/mean``. conf: [T, K, K] counts."""
    out: Dict[str, float] = {}
    K = conf.shape[-1]
    near = np.abs(np.arange(K)[:, None] - np.arange(K)[None, :]) <= 1
    for t, name in enumerate(types):
        c = conf[t].astype(np.float64)
        n = c.sum()
        rows = c.sum(1)
        present = rows > 0
        out[f'acc/{name}'] = float(np.trace(c) / n) if n else float('nan')
        out[f'bacc/{name}'] = float(np.mean(np.diag(c)[present] / rows[present])) if present.any() else float('nan')
        out[f'within1/{name}'] = float(c[near].sum() / n) if n else float('nan')
    for key in ('acc', 'bacc', 'within1'):
        out[f'{key}/mean'] = float(np.mean([out[f'{key}/{n}'] for n in types]))
    return out


# --------------------------------------------------------------------------------------------
# training model
# --------------------------------------------------------------------------------------------
@MODEL_REGISTRY.register()
class IRPADModel(BaseModel):
    """Options block ``model`` (documented in options/reference/irpad.yml)::

        model:
          type: IRPADModel
          prompt: {...}          # PromptSpec options; default: datasets.train.prompt / .build.prompt
          network: {image_encoder: {...}, prompt_embedding: {...}, embed_dim: 128, ...}
          label_smoothing: 0.0
          ordinal_sigma: 0.0     # >0: soft targets exp(-(k - y)^2 / (2 s^2)) over intervals
          train_crop: 64         # random crop of the LR per batch (0: full LR)
          train_crop_align: 8    # crop offsets are multiples of this (8 keeps the JPEG block grid)
          encoder_lr_scale: 1.0  # LR of a trainable image encoder = train.optimizer.lr x this
          pretrained: null       # an IRPAD export folder to start from
          stats_pretrain: null   # {epochs, lr, batch_size, weight_decay}: fit the stats_score path first

    Batch keys used: ``lq`` [B, 3, h, w] in [0, 1], ``labels`` int64 [B, T].
    """

    KEYS = {'type', 'prompt', 'network', 'label_smoothing', 'ordinal_sigma', 'train_crop', 'train_crop_align',
            'encoder_lr_scale', 'pretrained', 'stats_pretrain'}
    STATS_PRETRAIN = {'epochs': 30, 'lr': 1.0e-3, 'batch_size': 256, 'weight_decay': 0.01, 'freeze': False,
                      'schedule': 'cosine'}
    STATS_SCHEDULES = ('cosine', 'constant')

    def __init__(self, opt: Dict[str, Any], accelerator=None):
        super().__init__(opt, accelerator)
        from dalpsr.utils.options import OptionError, check_keys, get_opt
        mopt = get_opt(opt, 'model')
        src = opt.get('_source', 'the options')
        check_keys(mopt, self.KEYS, f'model block of {src}')
        train = get_opt(opt, 'datasets.train', None) or {}
        known = 'prompt' in train or isinstance(train.get('build'), dict)  # what the training labels follow
        data_prompt = train['prompt'] if 'prompt' in train else (train.get('build') or {}).get('prompt')
        self.prompt_opt = mopt.get('prompt', data_prompt)
        self.spec = _spec_from_opt(self.prompt_opt)
        if known and _spec_from_opt(data_prompt) != self.spec:
            raise OptionError(f'model.prompt in {src} differs from the prompt the training data is labelled with '
                              f'({self.spec.to_opt()} vs {_spec_from_opt(data_prompt).to_opt()})')
        self.types = list(self.spec.types)
        self.K = int(self.spec.num_intervals)
        self.net = build_irpad(self.spec, mopt.get('network'))
        if mopt.get('pretrained'):
            src_net, _, _ = load_irpad(mopt['pretrained'])
            self.net.load_state_dict(src_net.state_dict())
        self.net.to(self.device)
        self.label_smoothing = float(mopt.get('label_smoothing', 0.0))
        self.ordinal_sigma = float(mopt.get('ordinal_sigma', 0.0))
        self.train_crop = int(mopt.get('train_crop', 0) or 0)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise OptionError(f'model.label_smoothing in {src} must be in [0, 1), got {self.label_smoothing}')
        if self.ordinal_sigma < 0:
            raise OptionError(f'model.ordinal_sigma in {src} must be >= 0, got {self.ordinal_sigma}')
        if self.train_crop < 0:
            raise OptionError(f'model.train_crop in {src} must be >= 0 (0: full LR), got {self.train_crop}')
        align = mopt.get('train_crop_align', 1)
        self.train_crop_align = 1 if align is None else int(align)
        if self.train_crop_align < 1:
            raise OptionError(f'model.train_crop_align in {src} must be >= 1, got {self.train_crop_align}')
        self.encoder_lr_scale = float(mopt.get('encoder_lr_scale', 1.0))
        if self.encoder_lr_scale < 0:
            raise OptionError(f'model.encoder_lr_scale in {src} must be >= 0, got {self.encoder_lr_scale}')
        self.base_lr = float(get_opt(opt, 'train.optimizer.lr', 0.0) or 0.0)
        self.seed = int(opt.get('seed', opt.get('manual_seed', 0)) or 0)
        self.stats_pretrain = self._stats_pretrain_opt(mopt.get('stats_pretrain'), src)

    def _stats_pretrain_opt(self, cfg, src) -> Optional[Dict[str, Any]]:
        from dalpsr.utils.options import OptionError
        if not cfg:
            return None
        if not isinstance(cfg, dict):
            raise OptionError(f'model.stats_pretrain in {src} must be a mapping '
                              f'({sorted(self.STATS_PRETRAIN)}) or null, got {cfg!r}')
        bad = sorted(set(cfg) - set(self.STATS_PRETRAIN))
        if bad:
            raise OptionError(f'model.stats_pretrain in {src}: unknown key(s) {bad} '
                              f'(known: {sorted(self.STATS_PRETRAIN)})')
        out = dict(self.STATS_PRETRAIN, **cfg)
        try:
            out = {'epochs': int(out['epochs']), 'lr': float(out['lr']), 'batch_size': int(out['batch_size']),
                   'weight_decay': float(out['weight_decay']), 'freeze': out['freeze'], 'schedule': out['schedule']}
        except (TypeError, ValueError) as err:
            raise OptionError(f'model.stats_pretrain in {src}: {err}') from err
        if out['epochs'] < 0 or out['lr'] <= 0 or out['batch_size'] < 2 or out['weight_decay'] < 0:
            raise OptionError(f'model.stats_pretrain in {src} needs epochs >= 0, lr > 0, batch_size >= 2 and '
                              f'weight_decay >= 0, got {out}')
        if out['epochs'] and not self.net.stats_tokens:
            raise OptionError(f'model.stats_pretrain in {src} fits the stats_score path: set '
                              'model.network.stats_score: true (with image_encoder.dstat_tokens > 0)')
        if out['schedule'] not in self.STATS_SCHEDULES:
            raise OptionError(f"model.stats_pretrain.schedule in {src} must be one of {list(self.STATS_SCHEDULES)}, "
                              f"got {out['schedule']!r}")
        if not isinstance(out['freeze'], bool):
            raise OptionError(f"model.stats_pretrain.freeze in {src} must be true or false, got {out['freeze']!r}")
        if not out['epochs']:
            return None
        if out['freeze']:   # set here, not in before_training, so a resumed run has it too
            self._set_stats_frozen(True)
        return out

    def _set_stats_frozen(self, frozen: bool) -> None:
        """Statistics path fixed (no gradient, BatchNorm running statistics no longer updated) or
        trainable again."""
        net = self.unwrap(self.net)
        for p in net.stats_parameters():
            p.requires_grad_(not frozen)
        net.image_encoder.dstat.norm.momentum = 0.0 if frozen else 0.1

    # ---- before the first step -----------------------------------------------------------
    def statistics_of(self, train_set):
        """(statistics float32 [M, F], labels int64 [M, T]) of every training LR (``train_set.lq``,
        uint8 [N, h, w, 3], and ``.labels`` [N, T], as a :class:`CachedLRDataset` holds them): an LR
        larger than ``train_crop`` contributes each crop of the prediction grid, with its labels."""
        lq_all, labels = getattr(train_set, 'lq', None), getattr(train_set, 'labels', None)
        if lq_all is None or labels is None:
            from dalpsr.utils.options import OptionError
            raise OptionError(f'model.stats_pretrain needs a training set of cached LRs (CachedLRDataset), '
                              f'got {type(train_set).__name__}; remove stats_pretrain or use an LR cache')
        boxes = crop_boxes(*lq_all.shape[1:3], self.train_crop, self.train_crop_align)
        feats = lr_statistics(lq_all, self.unwrap(self.net).image_encoder.dstat.feature_set, boxes)
        feats = feats.flatten(0, 1)                                                    # [N * crops, F]
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).repeat_interleave(len(boxes), 0)
        return feats, labels

    def before_training(self, train_set, log=None) -> Optional[Dict[str, float]]:
        """With ``stats_pretrain``: fit the statistics path (``IRPAD.stats_parameters``: the
        statistics MLP, its BatchNorm, ``stats_img``, ``stats_q``) alone on statistics computed once
        per training LR, for ``epochs`` passes (AdamW, batch ``batch_size``, learning rate ``lr``
        constant or on a cosine from ``lr`` to 0 over the fit (``schedule``), seeded by ``seed``),
        before the first training step; the rest of the network is untouched. With ``freeze`` the
        path then stays as fitted (not in the optimizer; the decoder learns what the statistics
        miss), else it trains on with the rest. The loop calls it
        only at step 0 (a resumed run has these weights in its checkpoint). Returns the statistics
        path's training accuracy per type (None without stats_pretrain)."""
        cfg = self.stats_pretrain
        if not cfg:
            return None
        import time
        t0 = time.time()
        net = self.unwrap(self.net)
        feats, labels = self.statistics_of(train_set)
        if cfg['freeze']:
            self._set_stats_frozen(False)
        feats, labels = feats.to(self.device), labels.to(self.device)
        params = net.stats_parameters()
        opt = torch.optim.AdamW(params, lr=cfg['lr'], weight_decay=cfg['weight_decay'])
        g = torch.Generator().manual_seed(self.seed * 7919 + 17)
        was_training = net.training
        net.train()
        n, bs = len(labels), min(cfg['batch_size'], len(labels))
        steps = cfg['epochs'] * (n // bs)
        for group in opt.param_groups:
            group['initial_lr'] = group['lr']
        k = 0
        for _ in range(cfg['epochs']):
            perm = torch.randperm(n, generator=g)
            for i in range(0, n - bs + 1, bs):   # whole batches only (BatchNorm)
                b = perm[i:i + bs].to(self.device)
                if cfg['schedule'] == 'cosine':
                    for group in opt.param_groups:
                        group['lr'] = group['initial_lr'] * 0.5 * (1.0 + math.cos(math.pi * k / steps))
                loss = self.loss_fn(net.stats_logits(feats[b]), labels[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                k += 1
        net.zero_grad(set_to_none=True)
        if cfg['freeze']:
            self._set_stats_frozen(True)
        net.eval()
        with torch.no_grad():
            pred = torch.cat([net.stats_logits(feats[i:i + 1024]).argmax(-1) for i in range(0, n, 1024)])
        net.train(was_training)
        acc = {name: float((pred[:, t] == labels[:, t]).float().mean()) for t, name in enumerate(self.types)}
        if log is not None:
            log.info('stats_pretrain: %d epochs over the statistics of %d training LR crops in %.1f s; '
                     'training accuracy of the statistics path: %s', cfg['epochs'], n, time.time() - t0,
                     ', '.join(f'{k} {v:.3f}' for k, v in acc.items()))
        return acc

    def trainable_modules(self):
        return {'net': self.net}

    def param_groups(self):
        """One group, or (``encoder_lr_scale`` != 1) the image encoder's trainable parameters in
        a group of their own with ``lr = train.optimizer.lr x encoder_lr_scale`` (e.g. 0.1 for a
        pretrained ViT fine-tuned next to a decoder trained from scratch)."""
        params = [p for p in self.net.parameters() if p.requires_grad]
        if self.encoder_lr_scale == 1.0:
            return params
        enc = {id(p) for p in self.net.image_encoder.parameters() if p.requires_grad}
        groups = [{'params': [p for p in params if id(p) not in enc]}]
        if enc:
            groups.append({'params': [p for p in params if id(p) in enc], 'lr': self.base_lr * self.encoder_lr_scale})
        return groups

    # ---- loss --------------------------------------------------------------------------
    def loss_fn(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """logits [B, T, K], labels int [B, T] -> scalar (mean over types of the per-type loss)."""
        flat, y = logits.reshape(-1, self.K), labels.reshape(-1).long()
        if self.ordinal_sigma > 0:
            k = torch.arange(self.K, device=flat.device, dtype=flat.dtype)
            soft = torch.exp(-(k[None] - y[:, None].to(flat.dtype)) ** 2 / (2 * self.ordinal_sigma ** 2))
            soft = soft / soft.sum(1, keepdim=True)
            return -(soft * F.log_softmax(flat, -1)).sum(1).mean()
        return F.cross_entropy(flat, y, label_smoothing=self.label_smoothing)

    def _crop(self, lq: torch.Tensor, step: int) -> torch.Tensor:
        c = self.train_crop
        h, w = lq.shape[-2:]
        if c <= 0 or (h <= c and w <= c):
            return lq
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        a = self.train_crop_align
        ys = torch.randint(0, max(h - c, 0) // a + 1, (lq.shape[0],), generator=g) * a
        xs = torch.randint(0, max(w - c, 0) // a + 1, (lq.shape[0],), generator=g) * a
        return torch.stack([lq[i, :, y:y + c, x:x + c] for i, (y, x) in enumerate(zip(ys.tolist(), xs.tolist()))])

    def training_step(self, batch: Dict[str, Any], step: int) -> Dict[str, Any]:
        lq = self._crop(batch['lq'], step).to(self.device, non_blocking=True)
        labels = batch['labels'].to(self.device).long()
        logits = self.net(lq)
        loss = self.loss_fn(logits, labels)
        with torch.no_grad():
            correct = (logits.argmax(-1) == labels).float().mean(0)
        out = {'loss': loss}
        for t, name in enumerate(self.types):
            out[f'acc_{name}'] = float(correct[t])
        return out

    # ---- validation --------------------------------------------------------------------
    @torch.no_grad()
    def predict_loader(self, loader):
        """(pred [N, T], labels [N, T]) over a loader (this process's share), predicted the way the
        export will predict: LRs larger than ``train_crop`` scored as the mean over its crops."""
        net = self.net
        was_training = net.training
        predictor = IRPADPredictor(net, self.spec, self.device, crop=self.train_crop, crop_align=self.train_crop_align)
        preds, labels = [], []
        for batch in loader:
            preds.append(predictor.predict_labels(batch['lq']))
            labels.append(batch['labels'].long().cpu())
        net.train(was_training)
        return torch.cat(preds), torch.cat(labels)

    @torch.no_grad()
    def validate(self, loader, step: int, writer=None) -> Dict[str, float]:
        pred, labels = self.predict_loader(loader)
        if self.accelerator is not None and getattr(self.accelerator, 'num_processes', 1) > 1:
            pred = self.accelerator.gather_for_metrics(pred.to(self.device)).cpu()
            labels = self.accelerator.gather_for_metrics(labels.to(self.device)).cpu()
        conf = confusion_matrices(pred, labels, self.K)
        return confusion_metrics(conf, self.types)

    # ---- export ------------------------------------------------------------------------
    def export(self, out_dir: str) -> None:
        save_irpad(self.unwrap(self.net), self.spec.to_opt(), out_dir,
                   extra={'trained_with': self.opt.get('_source'), 'name': self.opt.get('name'),
                          'train_crop': self.train_crop, 'train_crop_align': self.train_crop_align})
