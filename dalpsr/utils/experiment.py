"""The one rule for experiment folders (train.py) and result folders (test.py).

A run writes into one folder (``experiments/<name>`` or ``results/<name>``) and leaves there a
*fingerprint*: the options that decide what the folder holds (train.py: ``model``, ``datasets``,
``seed`` read back from ``options.yml``; test.py: the options that change output pixels, in
``run.json``). When the folder already exists, :func:`plan_folder` decides, without touching
anything (so every process of a distributed run can decide alike before building a model):

=====================================  ==================================================
folder                                  action
=====================================  ==================================================
missing or empty                        ``'fresh'``
exists, ``force``                       ``'archive'`` (renamed ``<name>_archived_<time>``)
exists, same fingerprint                ``'resume'`` (continue / reuse what is there)
exists, other fingerprint               :class:`FolderConflict` naming the changed keys
exists, no fingerprint                  :class:`FolderConflict` (unknown contents)
=====================================  ==================================================

:func:`act_on_folder` then archives and creates the folder (main process only); records are
written with :func:`write_record` (temporary file + rename). Nothing is ever deleted.

Shared helpers: :func:`changed_keys` (dotted keys that differ between two option trees),
:func:`merge_defaults` (a block over its defaults with key checking) and
:func:`library_versions` (the package versions a result records).
"""
from __future__ import annotations

import copy
import json
import logging
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from dalpsr.utils.misc import atomic_write_json, get_time_str
from dalpsr.utils.options import OptionError, check_keys

PathLike = Union[str, Path]
ACTIONS = ('fresh', 'resume', 'archive')
#: packages whose versions a result records (``library_versions()``)
VERSION_PACKAGES = ('torch', 'diffusers', 'transformers', 'accelerate', 'pyiqa')

logger = logging.getLogger('dalpsr')


class FolderConflict(FileExistsError, OptionError):
    """An existing folder that this run may not use; the message is one line naming the
    changed keys (``.changed``) and the way out (``--force`` or another name). It is a
    :class:`FileExistsError` and an :class:`~dalpsr.utils.options.OptionError`, so the
    command lines print it as a one-line error."""

    def __init__(self, message: str, changed: Sequence[str] = ()):
        super().__init__(message)
        self.changed = list(changed)

    def __str__(self) -> str:  # FileExistsError would print '[Errno ...]' forms for 2 args
        return self.args[0]


# ---------------------------------------------------------------------------------------------
# option trees
# ---------------------------------------------------------------------------------------------
def changed_keys(old: Any, new: Any, prefix: str = '') -> List[str]:
    """Dotted keys whose values differ between two option trees (sorted; a key present in
    only one tree counts as changed; ``'<root>'`` when two non-mappings differ)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: List[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += changed_keys(old.get(k), new.get(k), f'{prefix}.{k}' if prefix else str(k))
        return out
    return [] if old == new else [prefix or '<root>']


def describe_keys(keys: Sequence[str], limit: int = 6) -> str:
    """``'a.b, c'`` with at most ``limit`` keys, then ``', ...'``."""
    keys = list(keys)
    return ', '.join(keys[:limit]) + (', ...' if len(keys) > limit else '')


def merge_defaults(defaults: Dict[str, Any], block: Optional[Dict[str, Any]], where: str) -> Dict[str, Any]:
    """``defaults`` updated with ``block`` (deep copies); ``None`` gives the defaults. An unknown
    key or a block that is not a mapping raises :class:`OptionError` naming ``where``."""
    out = copy.deepcopy(defaults)
    if block is None:
        return out
    if not isinstance(block, dict):
        raise OptionError(f'{where} must be a mapping, got {type(block).__name__}')
    check_keys(block, defaults, where)
    out.update(copy.deepcopy(block))
    return out


def library_versions(packages: Iterable[str] = VERSION_PACKAGES) -> Dict[str, str]:
    """``{package: installed version}`` from the package metadata (no import; ``'missing'``
    for a package that is not installed)."""
    out = {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = 'missing'
    return out


# ---------------------------------------------------------------------------------------------
# the folder rule
# ---------------------------------------------------------------------------------------------
def folder_in_use(path: PathLike) -> bool:
    """True when ``path`` is a folder with something in it; a file there is an error."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FolderConflict(f'{path} exists and is not a folder')
    return path.is_dir() and any(path.iterdir())


def plan_folder(path: PathLike, fingerprint: Any, stored: Any, force: bool = False, *, verb: str = 'made',
                content: str = 'results', record: str = 'run.json', ignore_leaves: Iterable[str] = (),
                advice: str = '') -> str:
    """Decide what a run does with ``path`` (see the module table); touches nothing.

    Args:
        fingerprint: this run's options that decide the folder's contents (a JSON/YAML tree).
        stored: the fingerprint read from the folder (``None``: the folder holds none).
        force: archive an existing folder instead of refusing.
        verb, content, record: wording of the error (``'<path> was <verb> with other options;
            refusing to mix <content> ...'``, ``'... holds no <record>'``).
        ignore_leaves: changed keys whose last component is listed here do not count (options
            that do not change the contents, e.g. ``num_workers``).
        advice: an extra way out appended to the error.

    Returns ``'fresh'``, ``'resume'`` or ``'archive'``; raises :class:`FolderConflict`.
    """
    path = Path(path)
    if not folder_in_use(path):
        return 'fresh'
    if force:
        return 'archive'
    way_out = 'Use --force to archive it with a timestamp, or choose another name' + (f', {advice}' if advice else '')
    if stored is None:
        raise FolderConflict(f'{path} exists and holds no {record}; refusing to mix {content} with it. {way_out}')
    ignore = set(ignore_leaves)
    changed = [k for k in changed_keys(stored, fingerprint) if k.rsplit('.', 1)[-1] not in ignore]
    if changed:
        raise FolderConflict(f'{path} was {verb} with other options; refusing to mix {content} with different '
                             f'options ({describe_keys(changed)}). {way_out}', changed)
    return 'resume'


def archive_folder(path: PathLike) -> Path:
    """Rename ``path`` to ``<name>_archived_<time>`` (``_<n>`` added when taken); returns the
    new path. Nothing is deleted."""
    path = Path(path)
    stamp = get_time_str()
    new, n = path.with_name(f'{path.name}_archived_{stamp}'), 1
    while new.exists():
        new, n = path.with_name(f'{path.name}_archived_{stamp}_{n}'), n + 1
    os.replace(path, new)
    logger.info('existing folder archived: %s -> %s', path, new)
    return new


def act_on_folder(path: PathLike, action: str) -> Optional[Path]:
    """Carry out :func:`plan_folder`'s ``action`` (main process only): ``'archive'`` renames the
    folder (the new path is returned); every action leaves ``path`` existing."""
    if action not in ACTIONS:
        raise ValueError(f'unknown folder action {action!r} (one of {ACTIONS})')
    path = Path(path)
    archived = archive_folder(path) if action == 'archive' and folder_in_use(path) else None
    path.mkdir(parents=True, exist_ok=True)
    return archived


def read_record(path: PathLike) -> Optional[Dict[str, Any]]:
    """A JSON record written by :func:`write_record`; ``None`` when missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_record(path: PathLike, record: Dict[str, Any]) -> None:
    """Write a JSON record atomically (temporary file + rename: a reader sees the old or the
    new file, never half of one)."""
    atomic_write_json(path, record)


def prepare_folder(path: PathLike, fingerprint: Any, force: bool = False, *, record: str = 'run.json',
                   extra: Optional[Dict[str, Any]] = None, **wording) -> str:
    """The whole rule for a single-process run (test.py): plan with the fingerprint stored in
    ``path/record``, act, and (re)write the record ``{'fingerprint': ..., **extra}`` when it is
    new. Returns the action taken."""
    path = Path(path)
    stored = (read_record(path / record) or {}).get('fingerprint')
    action = plan_folder(path, fingerprint, stored, force, record=record, **wording)
    act_on_folder(path, action)
    if action != 'resume' or stored != fingerprint:
        write_record(path / record, {'fingerprint': fingerprint, **(extra or {})})
    return action
