"""Triplet datasets of DaLPSR: (HR crop, degraded LR, restoration prompt / labels / params).

* :class:`TripletDataset` degrades on the fly: HR folder (or meta file) -> random crop
  (default 512) -> flips/rotation -> :class:`~dalpsr.data.degradations.RealESRGANDegradation`
  -> labels and prompt (:mod:`dalpsr.data.prompt_labels`).
* :class:`TripletFolderDataset` reads a set written by ``scripts/generate_lq.py``
  (``gt/``, ``lq/``, ``meta.jsonl``).

Items (default collate works)::

    gt      float32 tensor [3, H, W] in [0, 1]            (H = W = gt_size); the target of the
            L1 / main loss: USM-sharpened iff degradation.l1_gt_usm (default true, as x4plus)
    gt_percep, gt_gan  targets of a perceptual / GAN loss (percep_gt_usm / gan_gt_usm), present
            only when they differ from gt (x4plus defaults: gt_gan = the unsharpened crop); a
            loss takes ``batch.get('gt_gan', batch['gt'])``
    lq      float32 tensor [3, H/scale, W/scale] in [0, 1]
    labels  int64 tensor [T]  (interval index per prompt type, 0..K-1)
    prompt  str   restoration prompt p_r, e.g. "Deblur with sigma 0.5~0.75, ..."
    caption str   semantic prompt p_s from ``caption_file`` ('' if none)
    params  str   JSON of every random choice (degradation + crop/augmentation)
    key     str   image stem;  index  int  the index asked for

Determinism: ``ds[i]`` accepts any ``i >= 0``; the item is ``i % len(ds)`` and every random
choice comes from ``sample_rng(seed, i)``, so a sample does not depend on workers or processes.

Bad input rules (docs/degradation.md): grayscale / RGBA / 16-bit images are converted by
``read_image``; an image smaller than the crop is reflect-padded (``small_image='pad'``) or
skipped (``'skip'``); an unreadable / corrupt / non-image file is skipped: the item is taken from
the next file (deterministically), and the reason is logged once per file.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import cv2
import numpy as np

from dalpsr.data.captions import load_captions
from dalpsr.data.degradations import RealESRGANDegradation
from dalpsr.data.prompt_labels import PromptSpec
from dalpsr.utils.img_io import ImageReadError, read_image
from dalpsr.utils.misc import is_image_file, read_jsonl, sample_rng, scan_images
from dalpsr.utils.registry import DATASET_REGISTRY

logger = logging.getLogger('dalpsr')

_MAX_SKIP = 50  # consecutive unusable files before giving up


class SkipImage(Exception):
    """An input image that a documented rule says to skip; ``str(err)`` is the reason."""


def _torch_dataset_base():
    from torch.utils.data import Dataset
    return Dataset


def load_caption_map(path: Optional[str]) -> Dict[str, str]:
    """``{key: description}`` from a caption JSONL (C6 format); ``{}`` for ``None``."""
    if not path:
        return {}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption_file not found: {path}")
    return load_captions(path)


def crop_and_augment(img: np.ndarray, gt_size: int, rng: np.random.Generator, use_hflip: bool = True,
                     use_rot: bool = True, small_image: str = 'pad', scale: int = 4):
    """Random ``gt_size`` crop (reflect-padding images smaller than the crop when
    ``small_image='pad'``, raising :class:`SkipImage` when ``'skip'``) and BasicSR-style
    augmentation (hflip, vflip, transpose; each with prob 0.5 when enabled).
    ``gt_size=None`` keeps the whole image (cropped to a multiple of ``scale``).
    Returns ``(patch HxWx3 float32, record dict)``."""
    h, w = img.shape[:2]
    rec: Dict[str, Any] = {'src_size': [h, w]}
    if gt_size:
        if h < gt_size or w < gt_size:
            if small_image == 'skip':
                raise SkipImage(f'{h}x{w} is smaller than the {gt_size} crop (small_image=skip)')
            ph, pw = max(0, gt_size - h), max(0, gt_size - w)
            border = cv2.BORDER_REFLECT_101 if min(h, w) > 1 else cv2.BORDER_REPLICATE
            img = cv2.copyMakeBorder(img, 0, ph, 0, pw, border)
            rec['pad'] = [ph, pw]
            h, w = img.shape[:2]
        top = int(rng.integers(0, h - gt_size + 1))
        left = int(rng.integers(0, w - gt_size + 1))
        img = img[top:top + gt_size, left:left + gt_size]
        rec.update(top=top, left=left, size=gt_size)
    else:
        hh, ww = (h // scale) * scale, (w // scale) * scale
        if hh < 2 * scale or ww < 2 * scale:
            raise SkipImage(f'{h}x{w} is too small for scale {scale}')
        img = img[:hh, :ww]
    hflip = bool(use_hflip and rng.uniform() < 0.5)
    vflip = bool(use_rot and rng.uniform() < 0.5)
    rot90 = bool(use_rot and rng.uniform() < 0.5)
    if hflip:
        img = img[:, ::-1]
    if vflip:
        img = img[::-1]
    if rot90:
        img = img.transpose(1, 0, 2)
    rec.update(hflip=hflip, vflip=vflip, rot90=rot90)
    return np.ascontiguousarray(img, dtype=np.float32), rec


def make_triplet(img: np.ndarray, rng: np.random.Generator, degradation: RealESRGANDegradation, spec: PromptSpec,
                 gt_size: Optional[int] = 512, use_hflip: bool = True, use_rot: bool = True,
                 small_image: str = 'pad') -> Dict[str, Any]:
    """One triplet from a decoded HR image (HxWx3 float32 RGB [0,1]).

    Returns numpy ``gt``/``lq``, ``params`` (degradation params plus a ``crop`` record),
    ``degrees`` (dict), ``labels`` (list of int) and ``prompt`` (str)."""
    patch, crop = crop_and_augment(img, gt_size, rng, use_hflip, use_rot, small_image, degradation.scale)
    out = degradation(patch, rng)
    params = out['params']
    params['crop'] = crop
    deg = spec.degrees(params)
    labels = spec.labels_from_degrees(deg)
    return {'gt': out['gt'], 'gt_percep': out['gt_percep'], 'gt_gan': out['gt_gan'], 'lq': out['lq'],
            'params': params, 'degrees': deg, 'labels': labels, 'prompt': spec.prompt(labels)}


def _read_meta_info(meta_info: str, root: Optional[str]) -> List[Path]:
    """BasicSR meta file: one path per line (relative to ``root``), optionally followed by
    ``" (h,w,c)"``; blank lines and ``#`` comments ignored."""
    if not os.path.isfile(meta_info):
        raise FileNotFoundError(f"meta_info file not found: {meta_info}")
    out = []
    with open(meta_info, 'r', encoding='utf-8') as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith('#'):
                continue
            line = re.sub(r'\s+\(\s*\d+\s*,\s*\d+\s*(,\s*\d+\s*)?\)\s*$', '', line)
            p = Path(line)
            out.append(p if p.is_absolute() or root is None else Path(root) / p)
    return out


def _expand_root(root: Union[str, os.PathLike]) -> List[Path]:
    """Images of one ``dataroot_gt`` entry: a folder (scanned recursively), an image file, or
    ``'sample:train'`` / ``'sample:val'`` / ``'sample:all'`` (photos shipped in installed packages)."""
    if isinstance(root, str) and root.startswith('sample:'):
        from dalpsr.data.sample_images import sample_image_paths
        return [Path(p) for p in sample_image_paths(root.split(':', 1)[1])]
    if os.path.isfile(root) and is_image_file(root):
        return [Path(root)]
    return scan_images(root)


def _to_tensor(x: np.ndarray):
    import torch
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32))


class _SkipMixin:
    """Deterministic 'skip to the next file' with one log line per bad file."""

    def _warn_once(self, key: str, reason: str):
        if key not in self._warned:
            self._warned.add(key)
            # ImageReadError messages already start with the path; do not repeat it
            msg = reason if key in reason else f'{key}: {reason}'
            logger.warning(f'{type(self).__name__}: skipping {msg}')


@DATASET_REGISTRY.register()
class TripletDataset(_SkipMixin, _torch_dataset_base()):
    """HR images degraded on the fly into (gt, lq, labels, prompt, caption, params) items.

    Args:
        dataroot_gt: HR folder (scanned recursively for image suffixes), an image file,
            ``'sample:train'`` / ``'sample:val'`` (photos shipped in installed packages), or a list of these.
        meta_info: optional text file listing image paths (relative to ``dataroot_gt``).
        gt_size: HR crop size (LR is gt_size / scale); ``null`` keeps whole images.
        scale: down-scaling factor (also passed to the degradation).
        use_hflip, use_rot: augmentation (horizontal flip; vertical flip + transpose).
        degradation: kwargs of ``RealESRGANDegradation`` (defaults: Real-ESRGAN x4plus).
        prompt: ``PromptSpec`` options (types, num_intervals, templates, separator).
        caption_file: optional caption JSONL (key = image stem -> description).
        seed: base seed of every random choice. length: dataset length (default: number of
        images x repeat); repeat: how many times the image list is repeated.
        small_image: 'pad' (reflect-pad to the crop) or 'skip'.
    """

    def __init__(self, dataroot_gt: Union[str, Sequence[str], None] = None, meta_info: Optional[str] = None,
                 gt_size: Optional[int] = 512, scale: int = 4, use_hflip: bool = True, use_rot: bool = True,
                 degradation: Optional[Dict[str, Any]] = None, prompt: Optional[Dict[str, Any]] = None,
                 caption_file: Optional[str] = None, seed: int = 0, length: Optional[int] = None, repeat: int = 1,
                 small_image: str = 'pad', phase: str = 'train'):
        if meta_info:
            root = dataroot_gt if isinstance(dataroot_gt, str) else None
            paths = _read_meta_info(meta_info, root)
        elif dataroot_gt:
            roots = [dataroot_gt] if isinstance(dataroot_gt, (str, os.PathLike)) else list(dataroot_gt)
            paths = [p for r in roots for p in _expand_root(r)]
        else:
            raise ValueError("TripletDataset needs 'dataroot_gt' (HR folder) or 'meta_info' (file list)")
        if not paths:
            raise ValueError(f"TripletDataset: no images found in {meta_info or dataroot_gt}")
        if small_image not in ('pad', 'skip'):
            raise ValueError(f"small_image must be 'pad' or 'skip', got '{small_image}'")
        if gt_size is not None and (int(gt_size) < 2 * int(scale) or int(gt_size) % int(scale)):
            raise ValueError(f"gt_size ({gt_size}) must be a multiple of scale ({scale}) and >= {2 * int(scale)}")
        self.paths = paths
        self.gt_size = int(gt_size) if gt_size else None
        self.scale = int(scale)
        self.use_hflip, self.use_rot = bool(use_hflip), bool(use_rot)
        deg = dict(degradation or {})
        if 'scale' in deg and int(deg['scale']) != self.scale:
            raise ValueError(f"degradation.scale ({deg['scale']}) differs from the dataset scale ({scale})")
        deg['scale'] = self.scale
        self.spec = PromptSpec.from_opt(prompt)
        self.degradation = RealESRGANDegradation(**self.spec.degradation_options(deg))
        self.captions = load_caption_map(caption_file)
        self.seed = int(seed)
        self.small_image = small_image
        self.length = int(length) if length else len(paths) * max(1, int(repeat))
        self.phase = phase
        self._warned = set()

    def __len__(self) -> int:
        return self.length

    def _load(self, path: Path) -> np.ndarray:
        return read_image(path)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        import torch
        index = int(index)
        if index < 0:
            raise IndexError(f'index must be >= 0, got {index}')
        item = index % self.length
        n = len(self.paths)
        rng = sample_rng(self.seed, index)
        for k in range(min(_MAX_SKIP, n)):
            path = self.paths[(item + k) % n]
            try:
                img = self._load(path)
                t = make_triplet(img, rng, self.degradation, self.spec, self.gt_size, self.use_hflip,
                                 self.use_rot, self.small_image)
                break
            except (ImageReadError, SkipImage) as err:
                self._warn_once(str(path), str(err))
                rng = sample_rng(self.seed, index, k + 1)
        else:
            raise RuntimeError(f'TripletDataset: {min(_MAX_SKIP, n)} consecutive unusable images from '
                               f'{self.paths[item % n]} on (see the warnings above)')
        key = path.stem
        t['params']['source'] = str(path)
        item = {'gt': _to_tensor(t['gt']), 'lq': _to_tensor(t['lq']),
                'labels': torch.tensor(t['labels'], dtype=torch.int64), 'prompt': t['prompt'],
                'caption': self.captions.get(key, ''), 'params': json.dumps(t['params']), 'key': key,
                'index': index}
        # targets of a perceptual / GAN loss, only when they differ from gt (degradation.*_gt_usm)
        usm = self.degradation.target_usm
        for name in ('percep', 'gan'):
            if usm[name] != usm['l1']:
                item[f'gt_{name}'] = _to_tensor(t[f'gt_{name}'])
        return item


@DATASET_REGISTRY.register()
class TripletFolderDataset(_SkipMixin, _torch_dataset_base()):
    """A triplet set written by ``scripts/generate_lq.py`` (``<root>/meta.jsonl``, ``gt/``, ``lq/``).

    Labels and prompt are recomputed from the stored params with this dataset's ``prompt``
    spec (so K or templates can change without regenerating). ``gt_size`` (optional) takes a
    paired random crop from stored images larger than it; ``use_hflip``/``use_rot`` augment.
    Missing or unreadable files are skipped (next sample, reason logged once).
    """

    def __init__(self, dataroot: str, gt_size: Optional[int] = None, scale: int = 4, use_hflip: bool = False,
                 use_rot: bool = False, prompt: Optional[Dict[str, Any]] = None, caption_file: Optional[str] = None,
                 seed: int = 0, length: Optional[int] = None, repeat: int = 1, phase: str = 'train'):
        self.root = Path(dataroot)
        meta = self.root / 'meta.jsonl'
        if not meta.is_file():
            raise FileNotFoundError(f"TripletFolderDataset: {meta} not found (write one with scripts/generate_lq.py)")
        self.records = [r for r in read_jsonl(meta) if isinstance(r, dict) and 'key' in r]
        if not self.records:
            raise ValueError(f"TripletFolderDataset: {meta} lists no samples")
        self.records.sort(key=lambda r: r['key'])
        self.gt_size = int(gt_size) if gt_size else None
        self.scale = int(scale)
        if self.gt_size is not None and self.gt_size % self.scale:
            raise ValueError(f"gt_size ({gt_size}) must be a multiple of scale ({scale})")
        self.use_hflip, self.use_rot = bool(use_hflip), bool(use_rot)
        self.spec = PromptSpec.from_opt(prompt)
        self.captions = load_caption_map(caption_file)
        self.seed = int(seed)
        self.length = int(length) if length else len(self.records) * max(1, int(repeat))
        self.phase = phase
        self._warned = set()

    def __len__(self) -> int:
        return self.length

    def _sample(self, rec: Dict[str, Any], rng: np.random.Generator):
        gt = read_image(self.root / rec['gt'])
        lq = read_image(self.root / rec['lq'])
        s = self.scale
        if gt.shape[0] != lq.shape[0] * s or gt.shape[1] != lq.shape[1] * s:
            raise SkipImage(f"gt {gt.shape[:2]} and lq {lq.shape[:2]} sizes do not match scale {s}")
        if self.gt_size and (gt.shape[0] > self.gt_size or gt.shape[1] > self.gt_size):
            ls = self.gt_size // s
            if lq.shape[0] < ls or lq.shape[1] < ls:
                raise SkipImage(f'smaller than the {self.gt_size} crop')
            top = int(rng.integers(0, lq.shape[0] - ls + 1))
            left = int(rng.integers(0, lq.shape[1] - ls + 1))
            lq = lq[top:top + ls, left:left + ls]
            gt = gt[top * s:(top + ls) * s, left * s:(left + ls) * s]
        flips = [bool(self.use_hflip and rng.uniform() < 0.5), bool(self.use_rot and rng.uniform() < 0.5),
                 bool(self.use_rot and rng.uniform() < 0.5)]
        for x_name in ('gt', 'lq'):
            x = gt if x_name == 'gt' else lq
            if flips[0]:
                x = x[:, ::-1]
            if flips[1]:
                x = x[::-1]
            if flips[2]:
                x = x.transpose(1, 0, 2)
            if x_name == 'gt':
                gt = x
            else:
                lq = x
        return gt, lq

    def __getitem__(self, index: int) -> Dict[str, Any]:
        import torch
        index = int(index)
        if index < 0:
            raise IndexError(f'index must be >= 0, got {index}')
        item = index % self.length
        n = len(self.records)
        rng = sample_rng(self.seed, index)
        for k in range(min(_MAX_SKIP, n)):
            rec = self.records[(item + k) % n]
            try:
                gt, lq = self._sample(rec, rng)
                break
            except (ImageReadError, SkipImage) as err:
                self._warn_once(rec['key'], str(err))
                rng = sample_rng(self.seed, index, k + 1)
        else:
            raise RuntimeError(f'TripletFolderDataset: {min(_MAX_SKIP, n)} consecutive unusable samples in {self.root}')
        params = rec.get('params') or {}
        labels = self.spec.labels(params) if 'order1' in params else [int(x) for x in rec['labels']]
        src = rec.get('source_key', rec['key'])
        caption = self.captions.get(src, self.captions.get(rec['key'], rec.get('caption', '') or ''))
        return {'gt': _to_tensor(gt), 'lq': _to_tensor(lq), 'labels': torch.tensor(labels, dtype=torch.int64),
                'prompt': self.spec.prompt(labels), 'caption': caption, 'params': json.dumps(params),
                'key': rec['key'], 'index': index}


# --------------------------------------------------------------------------------------------
# summary (used by scripts/demo.py and scripts/generate_lq.py)
# --------------------------------------------------------------------------------------------

def summarize_triplets(jsonl_or_dir: Union[str, os.PathLike], num_examples: int = 3,
                       prompt: Optional[Dict[str, Any]] = None) -> str:
    """Human-readable summary of a triplet set: sample count, label histogram per type
    (count and share of each interval), mean degree per type and a few example prompts.

    ``jsonl_or_dir``: a ``meta.jsonl`` or the folder holding it. Labels are recomputed from the
    stored params with ``prompt`` (a PromptSpec options dict; default: the paper's)."""
    p = Path(jsonl_or_dir)
    meta = p / 'meta.jsonl' if p.is_dir() else p
    if not meta.is_file():
        raise FileNotFoundError(f"no meta.jsonl at {p}")
    recs = [r for r in read_jsonl(meta) if isinstance(r, dict) and 'key' in r]
    spec = PromptSpec.from_opt(prompt)
    lines = [f'{len(recs)} triplets in {meta.parent}']
    if not recs:
        return lines[0]
    labels, degs = [], []
    for r in recs:
        params = r.get('params') or {}
        if 'order1' in params:
            d = spec.degrees(params)
            degs.append(d)
            labels.append(spec.labels_from_degrees(d))
        else:
            labels.append([int(x) for x in r['labels']])
    labels = np.array(labels)
    k = spec.num_intervals
    head = ' '.join(f'{spec.bounds(j)[0]:.2f}-{spec.bounds(j)[1]:.2f}'.rjust(11) for j in range(k))
    lines.append(f"label histogram (K={k} intervals of the degree){'':4s}{head}")
    for i, t in enumerate(spec.types):
        cnt = np.bincount(labels[:, i], minlength=k)
        cells = ' '.join(f'{c:5d} ({100 * c / len(labels):3.0f}%)' for c in cnt)
        mean = f'  mean degree {np.mean([d[t] for d in degs]):.2f}' if degs else ''
        lines.append(f'  {t:<8s}{"":30s}{cells}{mean}')
    combos = Counter(tuple(x) for x in labels.tolist())
    lines.append(f'distinct prompts: {len(combos)} of {k ** len(spec.types)} possible')
    lines.append('example prompts:')
    for r, lab in list(zip(recs, labels.tolist()))[:num_examples]:
        lines.append(f"  {r['key']}: {spec.prompt(lab)}")
    return '\n'.join(lines)
