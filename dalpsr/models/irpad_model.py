"""IRPAD training model (for the loop in dalpsr/train.py) and the inference API.

* ``IRPADModel`` (registered): trains :class:`dalpsr.archs.irpad_arch.IRPAD` as fine-grained
  retrieval of the right interval prompt per degradation type (cross-entropy over the K
  intervals of each type, averaged over types), validates per-type accuracy, balanced
  accuracy and within-one-interval accuracy, and exports ``irpad.json`` +
  ``irpad.safetensors``.
* ``IRPADPredictor.from_pretrained(dir_or_file)``: ``predict_labels(lq) -> [B, T]``,
  ``predict_prompt(lq) -> List[str]`` (the C2 prompt format), used by training of the
  diffusion model (optional p_r from predictions) and by test.py.
* ``confusion_metrics``: the numbers that validate() and scripts/eval_irpad.py report.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dalpsr.models.base_model import BaseModel
from dalpsr.utils.registry import MODEL_REGISTRY

__all__ = ['IRPADModel', 'IRPADPredictor', 'StatsTermOnly', 'crop_starts', 'crop_boxes', 'lr_statistics', 'build_irpad', 'confusion_metrics', 'confusion_matrices',
           'save_irpad', 'load_irpad', 'CONFIG_NAME', 'WEIGHTS_NAME']

CONFIG_NAME = 'irpad.json'
WEIGHTS_NAME = 'irpad.safetensors'

logger = logging.getLogger('dalpsr')


def _spec_from_opt(prompt_opt):
    from dalpsr.data.prompt_labels import PromptSpec
    return PromptSpec.from_opt(prompt_opt)


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
    STATS_PRETRAIN = {'epochs': 30, 'lr': 1.0e-3, 'batch_size': 256, 'weight_decay': 0.01, 'freeze': False}

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
                   'weight_decay': float(out['weight_decay']), 'freeze': out['freeze']}
        except (TypeError, ValueError) as err:
            raise OptionError(f'model.stats_pretrain in {src}: {err}') from err
        if out['epochs'] < 0 or out['lr'] <= 0 or out['batch_size'] < 2 or out['weight_decay'] < 0:
            raise OptionError(f'model.stats_pretrain in {src} needs epochs >= 0, lr > 0, batch_size >= 2 and '
                              f'weight_decay >= 0, got {out}')
        if out['epochs'] and not self.net.stats_tokens:
            raise OptionError(f'model.stats_pretrain in {src} fits the stats_score path: set '
                              'model.network.stats_score: true (with image_encoder.dstat_tokens > 0)')
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
        per training LR, for ``epochs`` passes (AdamW, batch ``batch_size``, seeded by ``seed``),
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
        for _ in range(cfg['epochs']):
            perm = torch.randperm(n, generator=g)
            for i in range(0, n - bs + 1, bs):   # whole batches only (BatchNorm)
                b = perm[i:i + bs].to(self.device)
                loss = self.loss_fn(net.stats_logits(feats[b]), labels[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
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
