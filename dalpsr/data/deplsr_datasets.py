"""DePLSR's two training sets: degraded images with captions (SRCLIP) and HR/LR pairs (RealDAT).

Both draw sample ``i`` from ``sample_rng(seed, i)`` only (HR photo, random crop of ``gt_size``
— reflect-padded when the photo is smaller —, flip/rot90, every degradation choice), exactly as
:func:`dalpsr.data.lr_cache.sample_gt`, so a sample does not depend on workers or resume point.
With ``cache_file`` the ``num_samples`` samples are degraded once into one ``.npz`` (written
atomically; reused when it exists and was built with the same options, refused otherwise) and
served from memory; without it every item is degraded when it is read (``num_samples`` items).

* :class:`DegradedPairDataset` (RealDAT): Real-ESRGAN degradation of our pipeline
  (``degradation:`` = kwargs of :class:`~dalpsr.data.degradations.RealESRGANDegradation`).
  Items ``{'gt': [3, G, G], 'lq': [3, G/s, G/s]}`` float32 in [0, 1], ``'key'``; with
  ``degrees: true`` also ``'degrees'`` float32 [4]: the degree in [0, 1] of each type of
  :data:`~dalpsr.data.prompt_labels.DEGREE_TYPES` (blur, noise, jpeg, resize) from the recorded
  parameters, for the known-degradation upper bound (``RealDATModel`` ``conditioning: oracle``).
* :class:`SRCLIPCaptionDataset` (SRCLIP): DePLSR's pipeline
  (``degradation:`` = kwargs of :class:`~dalpsr.data.deplsr_degradation.DePLSRDegradation`).
  Items ``{'lq': [3, s, s], 'caption': str, 'degradation': str, 'fine': [5 str], 'values':
  float32 [5], 'key'}``; ``caption`` is the content caption from ``caption_file`` (JSONL,
  ``{"key": image stem, "caption": ...}``) or ``''`` when none is given.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import numpy as np

from dalpsr.utils.registry import DATASET_REGISTRY

__all__ = ['DegradedPairDataset', 'SRCLIPCaptionDataset']


def _dihedral(img: np.ndarray, code: int) -> np.ndarray:
    from dalpsr.data.lr_cache import _dihedral as d
    return d(img, code)


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


class _DegradedSet:
    """Shared machinery: sample generation, the cache file, augmentation."""

    KIND = ''

    def __init__(self, hr: Any, gt_size: int, num_samples: int, seed: int, degradation: Optional[Dict[str, Any]],
                 cache_file: Optional[str], augment: bool, workers: int = 1):
        from dalpsr.data.lr_cache import resolve_hr_paths
        if int(num_samples) < 1:
            raise ValueError(f'num_samples must be >= 1, got {num_samples}')
        self.paths = resolve_hr_paths(hr)
        self.gt_size, self.num_samples, self.seed = int(gt_size), int(num_samples), int(seed)
        self.degradation = dict(degradation or {})
        self.augment = bool(augment)
        self.deg = self._make_degradation()
        self._images: Dict[int, np.ndarray] = {}
        self.meta = {'kind': self.KIND, 'hr': [os.path.basename(p) for p in self.paths], 'gt_size': self.gt_size,
                     'num_samples': self.num_samples, 'seed': self.seed, 'degradation': self.degradation}
        self.data = None
        if cache_file:
            self.data = self._load_or_build(cache_file, int(workers))

    def _make_degradation(self):
        raise NotImplementedError

    def _sample(self, i: int) -> Dict[str, Any]:
        """Sample ``i``: uint8 arrays and JSON-able extras."""
        raise NotImplementedError

    def _gt(self, i: int):
        from dalpsr.data.lr_cache import sample_gt
        j, gt, rng = sample_gt(self.paths, self.gt_size, self.seed, i, self._images)
        return j, gt, rng

    def _load_or_build(self, cache_file: str, workers: int) -> Dict[str, np.ndarray]:
        from dalpsr.utils.misc import atomic_path
        if os.path.isfile(cache_file):
            try:
                with np.load(cache_file, allow_pickle=False) as z:
                    data = {k: z[k] for k in z.files}
                meta = json.loads(str(data.pop('meta')))
            except Exception as err:  # noqa: BLE001 - any unreadable file gets one answer
                raise ValueError(f'{cache_file}: not a {self.KIND} cache ({type(err).__name__})') from None
            diff = [k for k in self.meta if meta.get(k) != self.meta[k]]
            if diff:
                raise ValueError(f"{cache_file} was built with other options ({', '.join(diff)}); delete it or point "
                                 f"cache_file elsewhere")
            return data
        os.makedirs(os.path.dirname(os.path.abspath(cache_file)), exist_ok=True)
        samples = self._build(workers)
        data = {k: np.stack([s[k] for s in samples]) if isinstance(samples[0][k], np.ndarray)
                else np.asarray([s[k] for s in samples]) for k in samples[0]}
        with atomic_path(cache_file) as tmp:
            with open(tmp, 'wb') as f:
                np.savez(f, meta=np.asarray(json.dumps(self.meta)), **data)
        return data

    def _build(self, workers: int) -> List[Dict[str, Any]]:
        n = self.num_samples
        if workers > 1:
            from dalpsr.data.triplet_writer import worker_pool
            out: List[Any] = [None] * n
            with worker_pool(workers, _init_worker, (self,), threads=1) as pool:
                for i, s in pool.imap_unordered(_work, range(n), chunksize=32):
                    out[i] = s
            return out
        return [self._sample(i) for i in range(n)]

    def __len__(self) -> int:
        return self.num_samples

    def _item_arrays(self, i: int) -> Dict[str, Any]:
        if self.data is not None:
            return {k: v[i] for k, v in self.data.items()}
        return self._sample(i)

    def _aug_code(self, i: int) -> int:
        from dalpsr.utils.misc import sample_rng
        return int(sample_rng(self.seed, 7919, int(i)).integers(0, 8)) if self.augment else 0


_W: Dict[str, Any] = {}


def _init_worker(ds):
    _W['ds'] = ds


def _work(i):
    return i, _W['ds']._sample(i)


def _chw(img: np.ndarray):
    import torch
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)


@DATASET_REGISTRY.register()
class DegradedPairDataset(_DegradedSet):
    """HR/LR pairs from the Real-ESRGAN degradation (module doc).

    Args: ``hr`` (folder, file list, 'sample:train'), ``gt_size`` (HR crop, multiple of the scale),
    ``num_samples``, ``seed``, ``degradation`` (RealESRGANDegradation kwargs, e.g. ``scale``),
    ``cache_file`` (optional ``.npz``), ``augment`` (flip/rot90 of each read, same for GT and LR),
    ``workers`` (processes that build the cache; the result does not depend on it), ``degrees``
    (also serve each pair's degradation degrees, module doc).
    """

    KIND = 'deplsr-pairs'

    def __init__(self, hr: Any = 'sample:train', gt_size: int = 128, num_samples: int = 1000, seed: int = 0,
                 degradation: Optional[Dict[str, Any]] = None, cache_file: Optional[str] = None,
                 augment: bool = True, workers: int = 1, degrees: bool = False):
        self.with_degrees = bool(degrees)
        super().__init__(hr, gt_size, num_samples, seed, degradation, cache_file, augment, workers)

    def _make_degradation(self):
        from dalpsr.data.degradations import RealESRGANDegradation
        deg = RealESRGANDegradation(**self.degradation)
        if self.gt_size % deg.scale:
            raise ValueError(f'gt_size {self.gt_size} is not a multiple of the scale {deg.scale}')
        return deg

    def _sample(self, i: int) -> Dict[str, Any]:
        j, gt, rng = self._gt(i)
        out = self.deg(gt, rng)
        s = {'gt': _u8(out['gt']), 'lq': _u8(out['lq']),
             'key': f'{os.path.splitext(os.path.basename(self.paths[j]))[0]}_{i:07d}'}
        if self.with_degrees:
            from dalpsr.data.prompt_labels import DEGREE_TYPES, degrees
            d = degrees(out['params'])
            s['degrees'] = np.asarray([d[t] for t in DEGREE_TYPES], dtype=np.float32)
        return s

    def _load_or_build(self, cache_file: str, workers: int) -> Dict[str, np.ndarray]:
        if self.with_degrees:  # only then in the cache's options: caches built without it stay valid
            self.meta['degrees'] = True
        return super()._load_or_build(cache_file, workers)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        import torch
        idx = int(i) % self.num_samples
        s = self._item_arrays(idx)
        code = self._aug_code(i)
        item = {'gt': _chw(_dihedral(s['gt'], code)), 'lq': _chw(_dihedral(s['lq'], code)), 'key': str(s['key'])}
        if self.with_degrees:
            item['degrees'] = torch.as_tensor(np.asarray(s['degrees'], dtype=np.float32))
        return item


@DATASET_REGISTRY.register()
class SRCLIPCaptionDataset(_DegradedSet):
    """Degraded images with DePLSR captions (module doc).

    Args as :class:`DegradedPairDataset`, with ``degradation`` = DePLSRDegradation kwargs (``lq_size``
    224 in the paper; or ``scale``) and ``caption_file`` (optional JSONL of content captions).
    """

    KIND = 'deplsr-srclip'

    def __init__(self, hr: Any = 'sample:train', gt_size: int = 256, num_samples: int = 1000, seed: int = 0,
                 degradation: Optional[Dict[str, Any]] = None, cache_file: Optional[str] = None,
                 augment: bool = False, workers: int = 1, caption_file: Optional[str] = None):
        super().__init__(hr, gt_size, num_samples, seed, degradation, cache_file, augment, workers)
        self.content = {}
        if caption_file:
            if not os.path.isfile(caption_file):
                raise FileNotFoundError(f'caption_file not found: {caption_file}')
            with open(caption_file, encoding='utf-8') as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rec = json.loads(line)
                            self.content[str(rec['key'])] = str(rec['caption'])
                        except (ValueError, KeyError, TypeError):
                            raise ValueError(f'{caption_file}:{n}: expected {{"key": ..., "caption": ...}}') from None

    def _make_degradation(self):
        from dalpsr.data.deplsr_degradation import DePLSRDegradation
        return DePLSRDegradation(**self.degradation)

    def _sample(self, i: int) -> Dict[str, Any]:
        from dalpsr.data.deplsr_degradation import TYPES, values_from_params
        j, gt, rng = self._gt(i)
        out = self.deg(gt, rng)
        v = values_from_params(out['params'])
        return {'lq': _u8(out['lq']), 'degradation': out['captions']['full'],
                'fine': np.asarray(out['captions']['fine']), 'values': np.asarray([v[t] for t in TYPES], np.float32),
                'stem': os.path.splitext(os.path.basename(self.paths[j]))[0], 'key': f'{i:07d}'}

    def __getitem__(self, i: int) -> Dict[str, Any]:
        import torch
        idx = int(i) % self.num_samples
        s = self._item_arrays(idx)
        stem = str(s['stem'])
        return {'lq': _chw(_dihedral(s['lq'], self._aug_code(i))), 'caption': self.content.get(stem, ''),
                'degradation': str(s['degradation']), 'fine': [str(x) for x in s['fine']],
                'values': torch.from_numpy(np.asarray(s['values'], np.float32).copy()), 'key': f'{stem}_{s["key"]}'}
