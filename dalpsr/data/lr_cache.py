"""A pre-generated, in-memory set of degraded LR crops with their labels (for IRPAD).

IRPAD only needs the LR image and its interval labels, and on a CPU the Real-ESRGAN
degradation of a 512 crop (~80 ms) costs more than an IRPAD training step on it. So the CPU
recipe degrades once, into one ``.npz`` file, and trains many epochs over it:

* :func:`build_lr_cache` draws sample ``i`` from ``sample_rng(seed, i)`` only (HR image,
  random crop of ``gt_size`` — reflect-padded when the image is smaller —, flip/rot90, every
  degradation choice), degrades it with :class:`~dalpsr.data.degradations.RealESRGANDegradation`
  and labels it with :class:`~dalpsr.data.prompt_labels.PromptSpec`. Deterministic for a seed,
  whatever the number of worker processes; written atomically.
* :class:`CachedLRDataset` (registered) serves the items, optionally building the file first
  (``build:`` block) when it does not exist, with random flips/rot90 per index (they keep
  the 8x8 JPEG grid of crops whose side is a multiple of 8).

File content: ``lq`` uint8 [N, h, w, 3]; ``labels`` int64 [N, T]; ``degrees`` float32 [N, T];
``keys`` (image stem + index); ``params`` (JSON per sample); ``meta`` (JSON: options used).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from dalpsr.data.degradations import RealESRGANDegradation
from dalpsr.data.prompt_labels import PromptSpec
from dalpsr.data.sample_images import sample_image_paths
from dalpsr.utils.img_io import read_image
from dalpsr.utils.misc import atomic_path, sample_rng, scan_images
from dalpsr.utils.registry import DATASET_REGISTRY
from dalpsr.utils.workers import worker_pool  # one thread per worker, fork-safe

__all__ = ['build_lr_cache', 'load_lr_cache', 'CachedLRDataset', 'resolve_hr_paths', 'limit_photos']


def resolve_hr_paths(hr: Any) -> List[str]:
    """``hr``: ``'sample:train'`` / ``'sample:val'`` (photos shipped in installed packages), a
    folder of images, or a list of files. Returns sorted paths; an empty result is an error."""
    if isinstance(hr, str) and hr.startswith('sample:'):
        paths = [str(p) for p in sample_image_paths(hr.split(':', 1)[1])]
    elif isinstance(hr, str):
        paths = [str(p) for p in scan_images(hr)]
    else:
        paths = [str(p) for p in hr]
    if not paths:
        raise FileNotFoundError(f'no HR images found for {hr!r}')
    return paths


def limit_photos(paths: Sequence[str], limit: Optional[int]) -> List[str]:
    """The first ``limit`` photos of one fixed random order of ``paths`` (``None``: all), in
    their sorted order. The order does not depend on ``limit``, so smaller subsets are nested in
    larger ones (a training-set-size curve trains on 12 of the 100 photos of the next point)."""
    paths = list(paths)
    if limit is None:
        return paths
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= len(paths):
        raise ValueError(f'hr_limit must be an integer in [1, {len(paths)}] (the number of HR photos), got {limit!r}')
    keep = np.random.default_rng(0).permutation(len(paths))[:limit]
    return [paths[i] for i in sorted(keep)]


def _crop(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    if h < size or w < size:  # reflect-pad small images (documented rule)
        ph, pw = max(0, size - h), max(0, size - w)
        img = np.pad(img, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode='reflect')
        h, w = img.shape[:2]
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(0, w - size + 1))
    return img[y:y + size, x:x + size]


def _dihedral(img: np.ndarray, code: int) -> np.ndarray:
    """One of the 8 flips/rotations (code 0..7) of an HxWxC array."""
    if code & 4:
        img = img[:, ::-1]
    return np.ascontiguousarray(np.rot90(img, code & 3))


def sample_gt(hr_paths: Sequence[str], gt_size: int, seed: int, i: int, images: Optional[Dict[int, np.ndarray]] = None):
    """The HR crop of sample ``i`` of a cache built from ``hr_paths`` with ``gt_size`` and ``seed``:
    returns ``(photo index, gt [gt_size, gt_size, 3] float32 RGB in [0, 1], rng)`` where ``rng``
    is positioned where the degradation draws its parameters (so ``deg(gt, rng)`` reproduces the
    cached sample). ``images`` memoises decoded photos across calls."""
    images = {} if images is None else images
    rng = sample_rng(seed, i)
    j = int(rng.integers(0, len(hr_paths)))
    if j not in images:
        images[j] = read_image(hr_paths[j])
    gt = _dihedral(_crop(images[j], gt_size, rng), int(rng.integers(0, 8)))
    return j, np.ascontiguousarray(gt, dtype=np.float32), rng


_WORKER: Dict[str, Any] = {}
_CACHE_KEYS = ('lq', 'labels', 'degrees', 'keys', 'params', 'meta')


def _init_worker(hr_paths, gt_size, seed, degradation, prompt):
    spec = PromptSpec.from_opt(prompt)
    _WORKER.update(paths=hr_paths, gt_size=gt_size, seed=seed, images={}, spec=spec,
                   deg=RealESRGANDegradation(**spec.degradation_options(degradation)))


def _make_sample(i: int):
    w = _WORKER
    j, gt, rng = sample_gt(w['paths'], w['gt_size'], w['seed'], i, w['images'])
    out = w['deg'](gt, rng)
    lq = np.clip(np.round(out['lq'] * 255.0), 0, 255).astype(np.uint8)
    spec = w['spec']
    deg = spec.degrees(out['params'])
    key = f"{os.path.splitext(os.path.basename(w['paths'][j]))[0]}_{i:07d}"
    return (i, lq, spec.labels_from_degrees(deg), [deg[t] for t in spec.types], key,
            json.dumps(out['params'], default=float))


def build_lr_cache(out_file: str, hr: Any = 'sample:train', num_samples: int = 1000, gt_size: int = 256,
                   seed: int = 0, degradation: Optional[Dict[str, Any]] = None,
                   prompt: Optional[Dict[str, Any]] = None, workers: int = 1, overwrite: bool = False,
                   progress: bool = True, hr_limit: Optional[int] = None) -> str:
    """Degrade ``num_samples`` random crops of the ``hr`` images and save them to ``out_file``
    (``.npz``). ``hr_limit``: use only that many of the photos (:func:`limit_photos`).
    Refuses to overwrite an existing file unless ``overwrite``. Returns the path."""
    from tqdm import tqdm
    if os.path.exists(out_file) and not overwrite:
        raise FileExistsError(f'{out_file} exists; refusing to overwrite it (pass overwrite=True / --overwrite)')
    if int(num_samples) < 1:
        raise ValueError(f'num_samples must be >= 1, got {num_samples}')
    paths = limit_photos(resolve_hr_paths(hr), hr_limit)
    args = (paths, int(gt_size), int(seed), degradation, prompt)
    n = int(num_samples)
    results = [None] * n
    it = range(n)
    if int(workers) > 1:
        with worker_pool(int(workers), _init_worker, args, threads=1) as pool:
            for r in tqdm(pool.imap_unordered(_make_sample, it, chunksize=16), total=n, disable=not progress,
                          desc=f'degrading {os.path.basename(out_file)}'):
                results[r[0]] = r
    else:
        _init_worker(*args)
        for i in tqdm(it, total=n, disable=not progress, desc=f'degrading {os.path.basename(out_file)}'):
            results[i] = _make_sample(i)
    spec = PromptSpec.from_opt(prompt)
    meta = {'hr': [os.path.basename(p) for p in paths], 'num_samples': n, 'gt_size': int(gt_size),
            'seed': int(seed), 'degradation': degradation or {}, 'prompt': spec.to_opt(), 'hr_limit': hr_limit}
    with atomic_path(out_file) as tmp:
        with open(tmp, 'wb') as f:
            np.savez(f, lq=np.stack([r[1] for r in results]),
                     labels=np.asarray([r[2] for r in results], dtype=np.int64),
                     degrees=np.asarray([r[3] for r in results], dtype=np.float32),
                     keys=np.asarray([r[4] for r in results]), params=np.asarray([r[5] for r in results]),
                     meta=np.asarray(json.dumps(meta)))
    return out_file


def load_lr_cache(path: str) -> Dict[str, Any]:
    """Arrays of a cache file (see module doc) with ``meta`` decoded."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'LR cache not found: {path} (build it with scripts/make_lr_cache.py or give '
                                'the dataset a build: block)')
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        data['meta'] = json.loads(str(data['meta']))
    except Exception as err:  # not a zip, pickled objects, truncated, no or bad meta: all one answer
        raise ValueError(f'{path}: not an LR cache written by scripts/make_lr_cache.py '
                         f'({type(err).__name__})') from None
    missing = sorted(set(_CACHE_KEYS) - set(data))
    if missing:
        raise ValueError(f'{path}: not an LR cache written by scripts/make_lr_cache.py (no {", ".join(missing)})')
    return data


def _build_once(cache_file: str, build: Dict[str, Any], poll_s: float = 2.0) -> None:
    """Build ``cache_file`` in one process only: the first to create ``<file>.lock`` builds, the
    others (other ranks of a distributed run, or other runs) wait for the file to appear.
    A lock older than its builder (a killed run) is taken over after ``stale_s``."""
    import time
    lock = cache_file + '.lock'
    os.makedirs(os.path.dirname(os.path.abspath(cache_file)), exist_ok=True)
    stale_s = 6 * 3600
    while not os.path.isfile(cache_file):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(lock, encoding='utf-8') as f:
                    pid = int(f.read().strip() or 0)
                alive = pid > 0 and os.path.exists(f'/proc/{pid}') if os.path.isdir('/proc') else True
            except (OSError, ValueError):
                alive = True
            if not alive or time.time() - os.path.getmtime(lock) > stale_s:
                try:
                    os.unlink(lock)
                except OSError:
                    pass
                continue
            time.sleep(poll_s)
            continue
        try:
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            if not os.path.isfile(cache_file):
                build_lr_cache(cache_file, **build)
        finally:
            try:
                os.unlink(lock)
            except OSError:
                pass


def _check_built_as(cache_file: str, meta: Dict[str, Any], build: Dict[str, Any]) -> None:
    """An existing cache must match its ``build:`` block (else it holds other data or labels)."""
    import inspect
    try:
        b = inspect.signature(build_lr_cache).bind(cache_file, **build)  # build_lr_cache's own defaults
    except TypeError as err:
        raise ValueError(f'build: block of {cache_file}: {err}') from None
    b.apply_defaults()
    a = b.arguments
    want = {'num_samples': int(a['num_samples']), 'gt_size': int(a['gt_size']), 'seed': int(a['seed']),
            'degradation': dict(a['degradation'] or {}), 'prompt': PromptSpec.from_opt(a['prompt']).to_opt(),
            'hr': [os.path.basename(p) for p in limit_photos(resolve_hr_paths(a['hr']), a['hr_limit'])]}
    have = {k: meta.get(k) for k in want}
    have['prompt'] = PromptSpec.from_opt(meta.get('prompt')).to_opt()
    diff = [k for k in want if want[k] != have[k]]
    if diff:
        raise ValueError(f"{cache_file} was built with other options than its build: block ({', '.join(diff)}: "
                         f"{', '.join(f'{have[k]} vs {want[k]}' for k in diff)}); delete it or point cache_file "
                         f"elsewhere")


@DATASET_REGISTRY.register()
class CachedLRDataset:
    """Items of an LR cache: ``{'lq': float32 [3, h, w] in [0, 1], 'labels': int64 [T],
    'prompt': str, 'key': str, 'index': int}``.

    Args:
        cache_file: the ``.npz`` written by :func:`build_lr_cache`.
        build: optional kwargs of :func:`build_lr_cache` (without ``out_file``), used when
            ``cache_file`` does not exist yet.
        augment: random flip/rot90 per index (from ``sample_rng(seed, i)``).
        seed: seeds the augmentation.
        length: optional number of items to use (the first ``length``).
    """

    def __init__(self, cache_file: str, build: Optional[Dict[str, Any]] = None, augment: bool = False,
                 seed: int = 0, length: Optional[int] = None):
        if not os.path.isfile(cache_file):
            if not build:
                load_lr_cache(cache_file)  # raises the one-line error
            _build_once(cache_file, build)
        data = load_lr_cache(cache_file)
        if build:
            _check_built_as(cache_file, data['meta'], build)
        n = len(data['lq']) if length is None else min(int(length), len(data['lq']))
        self.lq = data['lq'][:n]
        self.labels = data['labels'][:n]
        self.degrees = data['degrees'][:n]
        self.keys = [str(k) for k in data['keys'][:n]]
        self.meta = data['meta']
        self.augment = bool(augment)
        self.seed = int(seed)
        self.spec = PromptSpec.from_opt(self.meta.get('prompt'))

    def __len__(self) -> int:
        return len(self.lq)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        import torch
        idx = int(i) % len(self.lq)
        img = self.lq[idx]
        if self.augment:
            img = _dihedral(img, int(sample_rng(self.seed, int(i)).integers(0, 8)))
        lq = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)
        labels = self.labels[idx]
        return {'lq': lq, 'labels': torch.from_numpy(labels.copy()), 'prompt': self.spec.prompt(labels.tolist()),
                'key': self.keys[idx], 'index': idx}
