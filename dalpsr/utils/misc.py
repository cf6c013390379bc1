"""Small shared helpers: seeding, folders that are never silently overwritten, atomic writes."""
from __future__ import annotations

import json
import os
import random
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Union

import numpy as np

PathLike = Union[str, os.PathLike]

#: File suffixes treated as images when scanning folders (case-insensitive).
IMG_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')


def get_time_str() -> str:
    return time.strftime('%Y%m%d_%H%M%S', time.localtime())


def set_random_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import torch
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def sample_rng(*keys: int) -> np.random.Generator:
    """A numpy Generator that depends only on ``keys`` (e.g. ``(seed, epoch, index)``).

    Every per-sample random choice in dalpsr is drawn from such a generator, so a sample is
    the same whichever worker, process or resume point produces it.
    """
    return np.random.default_rng([int(k) % (2 ** 63) for k in keys])


def resolve_device(name: str = 'auto') -> str:
    """``'auto'`` -> ``'cuda'`` when a CUDA device is available, else ``'cpu'``; any other name is
    returned as given, except a CUDA device on a machine without one: ValueError (one line)."""
    import torch
    name = str(name)
    if name == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f'device {name}: no CUDA device is available')
    return name


def is_image_file(path: PathLike) -> bool:
    return str(path).lower().endswith(IMG_EXTENSIONS)


def scan_images(folder: PathLike, recursive: bool = True) -> List[Path]:
    """Sorted image paths under ``folder`` (by suffix; content is checked when read)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    it = folder.rglob('*') if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and is_image_file(p) and not p.name.startswith('.'))


def mkdir_and_rename(path: PathLike, rename: bool = True) -> Path:
    """Create ``path``. If it exists and is not empty, rename it to ``path_archived_<time>``
    (``rename=True``) or raise ``FileExistsError`` (``rename=False``). Never deletes anything."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        if not rename:
            raise FileExistsError(f"{path} exists and is not empty; refusing to overwrite it "
                                  "(use --force to archive it with a timestamp, or pick another name)")
        new = path.with_name(f'{path.name}_archived_{get_time_str()}')
        n = 1
        while new.exists():
            new = path.with_name(f'{path.name}_archived_{get_time_str()}_{n}')
            n += 1
        os.replace(path, new)
        print(f'Existing folder archived: {path} -> {new}')
    path.mkdir(parents=True, exist_ok=True)
    return path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same folder; on success it replaces ``path`` atomically.

    The temporary name keeps the suffix (so writers that infer the format still work) and
    starts with a dot (so folder scans ignore it). On error the temporary file is removed and
    any earlier ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.stem}.', suffix=f'.tmp{path.suffix}', dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file normal permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding='utf-8')


def atomic_write_json(path: PathLike, obj: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=_json_default) + '\n')


def _json_default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f'not JSON serialisable: {type(o).__name__}')


def append_jsonl(path: PathLike, record: Any) -> None:
    """Append one JSON line and flush+fsync it (a crash leaves complete lines only)."""
    line = json.dumps(record, ensure_ascii=False, default=_json_default) + '\n'
    with open(path, 'a', encoding='utf-8') as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: PathLike) -> List[Any]:
    """Read a JSONL file, skipping a truncated last line (from an interrupted writer)."""
    out = []
    with open(path, 'r', encoding='utf-8') as f:
        lines = f.readlines()
    for i, line in enumerate(lines):
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue
            raise ValueError(f"{path}: line {i + 1} is not valid JSON")
    return out


def sizeof_fmt(num: float, suffix: str = 'B') -> str:
    for unit in ['', 'K', 'M', 'G', 'T']:
        if abs(num) < 1024.0:
            return f'{num:3.1f} {unit}{suffix}'
        num /= 1024.0
    return f'{num:.1f} P{suffix}'
