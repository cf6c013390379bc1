"""The options tree of the training loop: which keys exist, their defaults, their checks.

Every key accepted here is documented once in options/reference/train.yml (a test walks this
module's key sets against that file). Blocks owned by others check their own keys: ``model``
(the model class, reference files per model), ``datasets.<phase>`` (the dataset class's
keyword arguments, checked by ``build_dataset``).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Dict

from dalpsr.utils.options import OptionError, check_keys

#: Top-level keys of a training options file. ``is_train`` is set by the loader;
#: ``manual_seed`` is BasicSR's name for ``seed`` (read when ``seed`` is absent).
TOP_KEYS = ('name', 'seed', 'manual_seed', 'is_train', 'imports', 'path', 'model', 'datasets', 'train')
PATH_KEYS = ('experiments_root',)
DATASET_PHASES = ('train', 'val')
#: Keys of a ``datasets.<phase>`` block read by the loop (not passed to the dataset).
LOADER_KEYS = ('batch_size', 'num_workers')
MIXED_PRECISION = ('no', 'fp16', 'bf16')

#: Defaults of the ``train:`` block (each key is documented in options/reference/train.yml).
TRAIN_DEFAULTS: Dict[str, Any] = {
    'total_iter': 1000,
    'batch_size': 4,
    'num_workers': 2,
    'grad_accum': 1,
    'mixed_precision': 'no',
    'optimizer': {'type': 'AdamW', 'lr': 2.0e-5, 'weight_decay': 0.0, 'betas': [0.9, 0.999]},
    'scheduler': {'type': 'constant', 'warmup_iter': 0},
    'max_grad_norm': 1.0,
    'ema': None,
    'checkpoint_freq': 500,
    'keep_checkpoints': 3,
    'val_freq': 500,
    'val_at_start': False,
    'val_batch_size': 1,
    'val_num_workers': 0,
    'print_freq': 10,
    'tensorboard': True,
    'progress_bar': True,
    'stop_after_iter': None,
    'pin_memory': None,
    'prefetch_factor': None,
    'persistent_workers': True,
    'ddp_find_unused_parameters': False,
    'allow_tf32': True,
    'cpu': False,
    'handle_signals': True,
    'export': True,
}


def check_train_options(opt: Dict[str, Any]) -> None:
    """Structure of the whole tree: required blocks present, no unknown key at the top level,
    in ``path`` or ``datasets`` (one-line :class:`OptionError` naming the key and the file).
    The ``train`` block is checked by :func:`resolve_train_opt`."""
    src = opt.get('_source', 'the options')
    check_keys(opt, TOP_KEYS, f'top level of {src}')
    if 'name' not in opt:
        raise OptionError(f"missing required key 'name' in {src}")
    for key in ('model', 'datasets'):
        if not isinstance(opt.get(key), dict):
            raise OptionError(f"missing required block '{key}' in {src}")
    if 'train' not in opt['datasets']:
        raise OptionError(f"missing required block 'datasets.train' in {src}")
    check_keys(opt['datasets'], DATASET_PHASES, f'datasets block of {src}')
    path = opt.get('path')
    if path is not None:
        if not isinstance(path, dict):
            raise OptionError(f"'path' must be a mapping in {src}, got {type(path).__name__}")
        check_keys(path, PATH_KEYS, f'path block of {src}')


def resolve_train_opt(opt: Dict[str, Any]) -> Dict[str, Any]:
    """The ``train:`` block with defaults filled in and every key/value checked."""
    src = opt.get('_source', 'the options')
    block = opt.get('train') or {}
    if not isinstance(block, dict):
        raise OptionError(f"'train' must be a mapping in {src}")
    check_keys(block, TRAIN_DEFAULTS, f'train block of {src}')
    t = copy.deepcopy(TRAIN_DEFAULTS)
    t.update(copy.deepcopy(block))
    for key in ('total_iter', 'batch_size', 'grad_accum', 'print_freq', 'keep_checkpoints'):
        if not isinstance(t[key], int) or t[key] < 1:
            raise OptionError(f"train.{key} must be an integer >= 1 in {src}, got {t[key]!r}")
    for key in ('num_workers', 'val_num_workers', 'checkpoint_freq', 'val_freq'):
        if t[key] is None:
            t[key] = 0
        if not isinstance(t[key], int) or t[key] < 0:
            raise OptionError(f"train.{key} must be an integer >= 0 in {src} (0 = off), got {t[key]!r}")
    if t['mixed_precision'] in (None, False):
        t['mixed_precision'] = 'no'
    if t['mixed_precision'] not in MIXED_PRECISION:
        raise OptionError(f"train.mixed_precision must be one of {MIXED_PRECISION} in {src}, "
                          f"got {t['mixed_precision']!r}")
    if t['max_grad_norm'] is not None and float(t['max_grad_norm']) <= 0:
        t['max_grad_norm'] = None
    if t['stop_after_iter'] is not None and (not isinstance(t['stop_after_iter'], int) or t['stop_after_iter'] < 1):
        raise OptionError(f"train.stop_after_iter must be null or an integer >= 1 in {src}")
    for key in ('optimizer', 'scheduler'):
        if not isinstance(t[key], dict):
            raise OptionError(f"train.{key} must be a mapping with a 'type' key in {src}")
        merged = dict(TRAIN_DEFAULTS[key]) if t[key].get('type', TRAIN_DEFAULTS[key]['type']) == \
            TRAIN_DEFAULTS[key]['type'] else {}
        merged.update(t[key])
        t[key] = merged
    return t


def get_seed(opt: Dict[str, Any]) -> int:
    """``seed`` (or BasicSR's ``manual_seed`` when ``seed`` is absent), an integer."""
    seed = opt.get('seed', opt.get('manual_seed', 0))
    if not isinstance(seed, int):
        raise OptionError(f"'seed' must be an integer in {opt.get('_source', 'the options')}, got {seed!r}")
    return seed


def experiments_root(opt: Dict[str, Any]) -> Path:
    """``path.experiments_root`` (default ``experiments``), ``~`` expanded."""
    root = (opt.get('path') or {}).get('experiments_root') or 'experiments'
    return Path(os.path.expanduser(str(root)))
