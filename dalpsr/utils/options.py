"""YAML options: loading, ``--set`` overrides and key checking.

An options file is a nested mapping; blocks that name a registered object carry a
``type:`` key. ``load_options`` is used by ``dalpsr/train.py``, ``dalpsr/test.py`` and scripts::

    python dalpsr/train.py -opt options/train/train_irpad_cpu.yml --set train.total_iter=200 \
        --set datasets.train.batch_size=8

``--set`` values are parsed as YAML scalars (``8`` -> int, ``1e-4`` -> float, ``true`` -> bool,
``[1,2]`` -> list, ``null`` -> None). An override may create a block the file lacks (every
documented key can be set); unknown keys and missing required keys raise :class:`OptionError`
naming the key and the file.
"""
from __future__ import annotations

import copy
import difflib
import os
from typing import Any, Dict, Iterable, List, Optional

import yaml

_MISSING = object()

#: Keys allowed at the top level of an options file (each documented in options/reference.yml).
TOP_LEVEL_KEYS = {
    'name', 'model', 'manual_seed', 'num_gpu', 'is_train', 'datasets', 'network', 'networks',
    'path', 'train', 'val', 'logger', 'dist', 'degradation', 'prompt', 'sampler', 'test',
    'metrics', 'captioner', 'irpad', 'sd', 'tile', 'color_fix', 'accelerate', 'output',
    'imports', 'seed', 'method',
}


class OptionError(ValueError):
    """A bad options file or override; the message names the key and the file."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (a silent source of wrong experiments)."""


def _construct_mapping(loader, node, deep=False):
    mapping = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in mapping:
            raise OptionError(f"duplicate key '{key}' at line {key_node.start_mark.line + 1}")
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: str) -> Dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    if not os.path.isfile(path):
        raise OptionError(f"options file not found: {path}")
    try:
        with open(path, 'r', encoding='utf-8') as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)
    except OptionError as err:
        raise OptionError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise OptionError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise OptionError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def apply_overrides(opt: Dict[str, Any], overrides: Iterable[str], source: str = '',
                    top_keys: Optional[Iterable[str]] = None) -> Dict[str, Any]:
    """Apply ``key.sub=value`` overrides in place.

    With ``top_keys`` (the keys a file may have at its top level), a block that the file lacks
    (or sets to ``null``) is created, so every documented key can be set from the command line
    (``--set path.experiments_root=/data``); a typo in a top-level name still fails here, and a
    typo deeper down fails at the check of its block. Without ``top_keys`` only existing blocks
    can be entered. A value that is not a mapping is never replaced by a block."""
    top = set(top_keys) if top_keys is not None else None
    for item in overrides or []:
        if '=' not in item:
            raise OptionError(f"--set expects key.sub=value, got '{item}'")
        key, raw = item.split('=', 1)
        parts = key.strip().split('.')
        value = yaml.safe_load(raw) if raw != '' else ''
        node = opt
        for i, part in enumerate(parts[:-1]):
            prefix = '.'.join(parts[:i + 1])
            child = node.get(part)
            if child is None and top is not None and (i > 0 or part in top):
                child = node[part] = {}
            if not isinstance(child, dict):
                if part in node:
                    raise OptionError(f"--set {key}: '{prefix}' is not a block in {source or 'the options'} "
                                      f"(it is {child!r})")
                close = difflib.get_close_matches(part, top or (k for k in node if isinstance(node[k], dict)), n=1)
                hint = f" (did you mean '{'.'.join(parts[:i] + [close[0]])}'?)" if close else ''
                raise OptionError(f"--set {key}: there is no block '{prefix}' in {source or 'the options'}{hint}")
            node = child
        node[parts[-1]] = value
    return opt


def get_opt(opt: Dict[str, Any], dotted: str, default: Any = _MISSING) -> Any:
    """``get_opt(opt, 'datasets.train.dataroot_gt')``; a missing key without default raises
    :class:`OptionError` naming the key and the file the options came from."""
    node: Any = opt
    for part in dotted.split('.'):
        if isinstance(node, dict) and part in node:
            node = node[part]
        else:
            if default is _MISSING:
                raise OptionError(f"missing required key '{dotted}' in {opt.get('_source', 'the options')}")
            return default
    return node


def check_keys(block: Dict[str, Any], allowed: Iterable[str], where: str) -> None:
    """Raise ``OptionError`` for keys of ``block`` not in ``allowed`` (with a suggestion)."""
    allowed = set(allowed)
    for key in block:
        if key.startswith('_'):
            continue
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ''
            raise OptionError(f"{where}: unknown key '{key}'{hint}")


def load_options(path: str, overrides: Optional[List[str]] = None, is_train: bool = True,
                 top_keys: Optional[Iterable[str]] = None) -> Dict[str, Any]:
    """Load, override and check an options file. Adds ``_source`` (the path) and ``is_train``.
    ``top_keys``: the keys allowed at the top level (default :data:`TOP_LEVEL_KEYS`; train.py
    passes its own, stricter set); overrides may create any of these blocks."""
    top = tuple(top_keys) if top_keys is not None else tuple(TOP_LEVEL_KEYS)
    opt = load_yaml(path)
    apply_overrides(opt, overrides or [], source=path, top_keys=top)
    check_keys(opt, top, f"top level of {path}")
    if 'name' not in opt:
        raise OptionError(f"missing required key 'name' in {path}")
    opt['_source'] = path
    opt['is_train'] = is_train
    opt.setdefault('manual_seed', 0)
    if not isinstance(opt['manual_seed'], int):
        raise OptionError(f"'manual_seed' must be an integer in {path}, got {opt['manual_seed']!r}")
    return opt


def dump_options(opt: Dict[str, Any]) -> str:
    """YAML text of ``opt`` without private keys (saved next to every experiment)."""
    clean = {k: copy.deepcopy(v) for k, v in opt.items() if not k.startswith('_')}
    return yaml.safe_dump(clean, sort_keys=False, allow_unicode=True)
