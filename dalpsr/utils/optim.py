"""Optimizer and LR-scheduler builders from the ``train.optimizer`` / ``train.scheduler`` options.

``train.optimizer``::

    {type: AdamW, lr: 2.0e-5, weight_decay: 0.0, betas: [0.9, 0.999], eps: 1.0e-8}
    # type: Adam | AdamW | SGD (any other keyword of the torch class is passed through,
    # e.g. momentum/nesterov for SGD, foreach/fused)

``train.scheduler`` (all schedules are functions of the optimizer step ``s``, 0-based, and
multiply the base LR of every parameter group)::

    {type: constant, warmup_iter: 0}
    {type: linear,    warmup_iter: 0, min_lr_ratio: 0.0}          # base -> base*min_lr_ratio at total_iter
    {type: cosine,    warmup_iter: 0, min_lr_ratio: 0.0}          # half cosine to base*min_lr_ratio
    {type: multistep, warmup_iter: 0, milestones: [1000, 2000], gamma: 0.5}

Warm-up: during the first ``warmup_iter`` steps the factor is ``(s + 1) / warmup_iter``; the
decay of linear/cosine runs from ``warmup_iter`` to ``total_iter``.

Why not diffusers' ``get_scheduler`` (issue 12 item 5): it gives other LRs. Its warm-up factor
is ``s / warmup_iter`` (step 0 trains with LR 0: a wasted step; ours starts at
``1 / warmup_iter``), it has no ``min_lr_ratio`` floor, and its ``cosine`` defaults to
``num_cycles=1`` (a full cosine that climbs back to the base LR). Measured over 1000 steps with
100 warm-up steps (``python benchmarks/bench_train_pieces.py``): max factor difference 1.0e-2
for constant/linear/cosine and 2.0e-2 for cosine with ``min_lr_ratio: 0.02`` (the CPU IRPAD
recipe's); only ``multistep`` without warm-up equals its ``piecewise_constant`` (difference 0).
Switching would change the training losses the recipes record (tests/test_unchanged_training.py).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Union

import torch

from dalpsr.utils.options import OptionError, check_keys
from dalpsr.utils.registry import check_call_kwargs

OPTIMIZERS = {'Adam': torch.optim.Adam, 'AdamW': torch.optim.AdamW, 'SGD': torch.optim.SGD}
SCHEDULERS = ('constant', 'linear', 'cosine', 'multistep')
_SCHED_KEYS = {
    'constant': {'type', 'warmup_iter'},
    'linear': {'type', 'warmup_iter', 'min_lr_ratio'},
    'cosine': {'type', 'warmup_iter', 'min_lr_ratio'},
    'multistep': {'type', 'warmup_iter', 'milestones', 'gamma'},
}


def build_optimizer(params: Union[Iterable[torch.nn.Parameter], List[Dict[str, Any]]],
                    cfg: Dict[str, Any], where: str = 'train.optimizer') -> torch.optim.Optimizer:
    """Build the optimizer named by ``cfg['type']`` over ``params`` (parameters or groups)."""
    cfg = dict(cfg or {})
    otype = cfg.pop('type', 'AdamW')
    if otype not in OPTIMIZERS:
        raise OptionError(f"{where}: unknown optimizer type '{otype}' (known: {', '.join(OPTIMIZERS)})")
    if 'betas' in cfg and cfg['betas'] is not None:
        cfg['betas'] = tuple(float(b) for b in cfg['betas'])
    for k in ('lr', 'weight_decay', 'eps', 'momentum'):
        if k in cfg and isinstance(cfg[k], str):  # YAML reads "2e-5" (no dot) as a string
            try:
                cfg[k] = float(cfg[k])
            except ValueError:
                raise OptionError(f"{where}.{k}: expected a number, got '{cfg[k]}'") from None
    params = list(params)
    if not params:
        raise OptionError(f"{where}: the model has no trainable parameters")
    check_call_kwargs(OPTIMIZERS[otype], dict(cfg, params=None), f'{where} (type: {otype})')
    return OPTIMIZERS[otype](params, **cfg)


def lr_factor(step: int, cfg: Dict[str, Any], total_iter: int) -> float:
    """The LR multiplier at optimizer step ``step`` (0-based) for scheduler options ``cfg``."""
    stype = cfg.get('type', 'constant')
    warm = int(cfg.get('warmup_iter', 0) or 0)
    if warm > 0 and step < warm:
        return (step + 1) / warm
    if stype == 'constant':
        return 1.0
    if stype == 'multistep':
        gamma = float(cfg.get('gamma', 0.5))
        return gamma ** sum(1 for m in cfg.get('milestones', []) if step >= int(m))
    floor = float(cfg.get('min_lr_ratio', 0.0))
    span = max(1, total_iter - warm)
    t = min(1.0, max(0.0, (step - warm) / span))
    if stype == 'linear':
        return floor + (1.0 - floor) * (1.0 - t)
    if stype == 'cosine':
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
    raise OptionError(f"unknown scheduler type '{stype}'")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Dict[str, Any], total_iter: int,
                    where: str = 'train.scheduler') -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`lr_factor`. Its state (the step count) is saved with
    checkpoints; step it exactly once per optimizer step."""
    cfg = dict(cfg or {'type': 'constant'})
    stype = cfg.setdefault('type', 'constant')
    if stype not in SCHEDULERS:
        raise OptionError(f"{where}: unknown scheduler type '{stype}' (known: {', '.join(SCHEDULERS)})")
    check_keys(cfg, _SCHED_KEYS[stype], f'{where} (type: {stype})')
    if int(cfg.get('warmup_iter', 0) or 0) < 0:
        raise OptionError(f"{where}.warmup_iter must be >= 0")

    def fn(step: int) -> float:
        return lr_factor(step, cfg, total_iter)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
