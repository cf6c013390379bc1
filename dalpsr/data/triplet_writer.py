"""Write a triplet dataset to disk (used by ``scripts/generate_lq.py``).

Sample ``i`` of the written set is exactly ``TripletDataset(...)[i]`` with the same options
(same HR image ``i % len``, same crop, flips and degradation, all from ``sample_rng(seed, i)``),
so the output does not depend on the number of worker processes, and an interrupted run that
is started again produces the same files.

Layout (read by :class:`~dalpsr.data.triplet_dataset.TripletFolderDataset`)::

    <out>/generate.json     options that define the set (checked on resume)
    <out>/meta.jsonl        one line per finished sample (sorted by index once the run completes)
    <out>/gt/<key>.png      HR crop, 8-bit RGB          (--testset: GT/<key>.png)
    <out>/lq/<key>.png      LR, 8-bit RGB (exact: the degradation ends on the 8-bit grid)
                            (--testset: LR/<key>.png)
    <out>/generate.log      start / resume / skipped-input lines

``key = f'{index:06d}_{image stem}'``. A ``meta.jsonl`` line::

    {"key": ..., "index": i, "gt": "gt/<key>.png", "lq": "lq/<key>.png", "source_key": stem,
     "labels": [..], "prompt": "Deblur with sigma ...", "degrees": {"blur": ..}, "caption": "",
     "params": {...every random choice, plus "crop" and "source"...}}

Finished = both image files written (atomically, so complete) *and* its JSONL line appended
(flushed and fsynced after the files). On a rerun with the same options the finished samples
are kept, a truncated last line or a line whose files are missing is dropped, and the rest is
generated. A non-empty output folder that is not such a set (or was made with other options)
is refused unless ``overwrite=True``, which archives it (renamed with a timestamp, never deleted).

16-bit inputs are stored as 8-bit PNG (the HR crop is rounded; the LR is already 8-bit).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from dalpsr.data.triplet_dataset import TripletDataset
from dalpsr.utils.img_io import write_image
from dalpsr.utils.misc import append_jsonl, atomic_write_json, atomic_write_text, mkdir_and_rename, read_jsonl
from dalpsr.utils.workers import worker_pool

__all__ = ['write_triplets', 'GENERATE_FILE', 'META_FILE']

GENERATE_FILE = 'generate.json'
META_FILE = 'meta.jsonl'
LOG_FILE = 'generate.log'
_VERSION = 2  # 2: x4plus USM defaults and F.interpolate resizing (issue 13); a version-1 set is not resumed

#: keys of generate.json that define the samples (a resume must match them all)
_IDENTITY_KEYS = ('version', 'mode', 'hr', 'meta_info', 'hr_files', 'hr_list_sha1', 'seed', 'gt_size', 'scale',
                  'use_hflip', 'use_rot', 'degradation', 'prompt', 'small_image', 'caption_file')


def _dirs(mode: str):
    return ('GT', 'LR') if mode == 'test' else ('gt', 'lq')


class _Log:
    """Lines to ``<out>/generate.log`` and the console (through tqdm so bars stay intact)."""

    def __init__(self, path: Path, verbose: bool = True):
        self.path, self.verbose = path, verbose

    def __call__(self, msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        with open(self.path, 'a', encoding='utf-8') as f:
            f.write(line + '\n')
        if self.verbose:
            from tqdm import tqdm
            tqdm.write(msg)


# ---------------------------------------------------------------------------------- workers

_W: Dict[str, Any] = {}


def _make_dataset(ds_kwargs: Dict[str, Any]):
    class _Recording(TripletDataset):
        """TripletDataset that collects skip reasons instead of logging them."""

        def _warn_once(self, key, reason):
            if key not in self._warned:
                self._warned.add(key)
                self.skipped.append((key, reason))

        def _load(self, path):
            # the last decoded image is kept: the writer hands a worker the samples of one image
            # in a row, and decoding a 2K PNG costs about as much as degrading a 512 crop
            if self._last[0] != path:
                self._last = (None, None)
                self._last = (path, super()._load(path))
            return self._last[1]

    ds = _Recording(**ds_kwargs)
    ds.skipped = []
    ds._last = (None, None)
    return ds


def _init_worker(ds_kwargs: Dict[str, Any], out_dir: str, mode: str) -> None:
    """Per-process state of the writer."""
    _W.update(ds=_make_dataset(ds_kwargs), out=Path(out_dir), mode=mode)


def _hwc(t) -> np.ndarray:
    return t.numpy().transpose(1, 2, 0)


def _make_sample(i: int):
    """Degrade sample ``i``, write its two images atomically, return (record, new skip reasons)."""
    ds, out = _W['ds'], _W['out']
    item = ds[i]
    gdir, ldir = _dirs(_W['mode'])
    key = f'{i:06d}_{item["key"]}'
    params = json.loads(item['params'])
    write_image(out / gdir / f'{key}.png', _hwc(item['gt']))
    write_image(out / ldir / f'{key}.png', _hwc(item['lq']))
    deg = ds.spec.degrees(params)
    rec = {'key': key, 'index': i, 'gt': f'{gdir}/{key}.png', 'lq': f'{ldir}/{key}.png', 'source_key': item['key'],
           'labels': item['labels'].tolist(), 'prompt': item['prompt'],
           'degrees': {t: round(deg[t], 6) for t in ds.spec.types}, 'caption': item['caption'], 'params': params}
    skipped, ds.skipped = ds.skipped, []
    return rec, skipped


def _make_samples(indices: Sequence[int]):
    return [_make_sample(i) for i in indices]


def _groups(todo: Sequence[int], num_images: int, size: int = 16) -> List[List[int]]:
    """Indices grouped by HR image (sample i uses image i % num_images), at most ``size`` each."""
    by_image: Dict[int, List[int]] = {}
    for i in todo:
        by_image.setdefault(i % num_images, []).append(i)
    return [idx[k:k + size] for _, idx in sorted(by_image.items()) for k in range(0, len(idx), size)]


# ---------------------------------------------------------------------------------- resume

def _finished(out: Path) -> Dict[int, Dict[str, Any]]:
    """Finished samples of an existing set: lines with both files present (first one per index),
    from ``meta.jsonl`` and the part files of processes of a sharded run (dalpsr.utils.sharding)."""
    from dalpsr.utils.sharding import Shard
    done: Dict[int, Dict[str, Any]] = {}
    for meta in [out / META_FILE] + Shard.part_files(out / META_FILE):
        if not meta.is_file():
            continue
        for r in read_jsonl(meta):  # a truncated last line is dropped by read_jsonl
            if not isinstance(r, dict) or 'index' not in r or int(r['index']) in done:
                continue
            if (out / r['gt']).is_file() and (out / r['lq']).is_file():
                done[int(r['index'])] = r
    return done


def _merge_parts(out: Path) -> Dict[int, Dict[str, Any]]:
    """Fold the part files into ``meta.jsonl`` (atomic rewrite, then the parts are removed)."""
    from dalpsr.utils.sharding import Shard
    done = _finished(out)
    _rewrite_meta(out, list(done.values()))
    for part in Shard.part_files(out / META_FILE):
        part.unlink()
    return done


def _rewrite_meta(out: Path, records: Sequence[Dict[str, Any]]) -> None:
    text = ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in sorted(records, key=lambda r: r['index']))
    atomic_write_text(out / META_FILE, text)


def _remove_stale_temps(out: Path, mode: str) -> int:
    """Temporary files of atomic writes left by a killed run (``.<stem>.<random>.tmp.png``)."""
    n = 0
    for d in _dirs(mode) + ('.',):
        folder = out / d
        if folder.is_dir():
            for p in folder.iterdir():
                if p.name.startswith('.') and '.tmp' in p.name and p.is_file():
                    p.unlink()
                    n += 1
    return n


# ---------------------------------------------------------------------------------- main entry

def _prepare(out: Path, config: Dict[str, Any], n: int, mode: str, testset: bool, num_images: int,
             overwrite: bool, verbose: bool):
    """Check / archive / resume the output folder and write generate.json (main process only).
    Returns ``(resumed, finished samples)``."""
    done: Dict[int, Dict[str, Any]] = {}
    resumed = False
    if out.exists() and not out.is_dir():
        raise FileExistsError(f'{out} exists and is not a folder')
    if out.is_dir() and any(out.iterdir()):
        old = None
        gen = out / GENERATE_FILE
        if gen.is_file():
            try:
                old = json.loads(gen.read_text(encoding='utf-8'))
            except (OSError, ValueError):
                old = None
        diff = [k for k in _IDENTITY_KEYS if old is None or old.get(k) != config.get(k)]
        if overwrite:
            mkdir_and_rename(out, rename=True)
        elif old is None:
            raise FileExistsError(f'{out} is not empty and is not a generate_lq output; refusing to overwrite it '
                                  '(use --overwrite to archive it with a timestamp, or pick another --out)')
        elif diff:
            raise FileExistsError(f'{out} holds a set made with other options (differs in: {", ".join(diff)}); '
                                  'refusing to mix them (use --overwrite to archive it, or pick another --out)')
        else:
            resumed = True
    out.mkdir(parents=True, exist_ok=True)
    for d in _dirs(mode):
        (out / d).mkdir(exist_ok=True)
    log = _Log(out / LOG_FILE, verbose)
    if resumed:
        stale = _remove_stale_temps(out, mode)
        done = _merge_parts(out)  # drop truncated / orphaned lines (and fold part files) before appending
        log(f'resuming {out}: {len(done)} finished sample(s) kept'
            + (f', {stale} temporary file(s) of an interrupted write removed' if stale else ''))
    else:
        log(f'writing {n} {"test" if testset else "training"} triplets from {num_images} HR image(s) to {out}')
    atomic_write_json(out / GENERATE_FILE, dict(config, num=max(n, int((done and max(done) + 1) or 0))))

    return resumed, done


def write_triplets(out_dir: Union[str, os.PathLike], hr: Union[str, Sequence[str]] = 'sample:train',
                   num: Optional[int] = None, seed: int = 0, gt_size: Optional[int] = 512, scale: int = 4,
                   testset: bool = False, use_hflip: Optional[bool] = None, use_rot: Optional[bool] = None,
                   degradation: Optional[Dict[str, Any]] = None, prompt: Optional[Dict[str, Any]] = None,
                   small_image: str = 'pad', caption_file: Optional[str] = None, meta_info: Optional[str] = None,
                   workers: int = 1, threads: int = 1, overwrite: bool = False, progress: bool = True,
                   verbose: bool = True, shard=None) -> Dict[str, Any]:
    """Write ``num`` triplets to ``out_dir`` (layout and resume rules in the module doc).

    Args:
        hr: HR images: a folder, an image file, ``'sample:train'`` / ``'sample:val'``, or a list;
            with ``meta_info`` the folder the listed paths are relative to.
        num: number of samples (default: one per HR image). Sample ``i`` uses image ``i % len``.
        gt_size: HR crop size (LR = gt_size / scale); ``None`` or 0 keeps whole images.
        testset: synthetic test set the papers' way: random crops without flips/rotations,
            written to ``GT/`` and ``LR/`` (same file names) for ``dalpsr/test.py`` and ``scripts/iqa.py``.
        use_hflip, use_rot: augmentation (default: on for training sets, off for test sets).
        degradation, prompt, small_image, caption_file: as :class:`TripletDataset`.
        workers: processes (results do not depend on it); threads: OpenCV/torch threads per
            worker process when ``workers > 1`` (0 = library default).
        overwrite: start fresh: a non-empty ``out_dir`` is archived (renamed ``<out>_archived_<time>``).
        shard: a :class:`dalpsr.utils.sharding.Shard` (``accelerate launch``): the main process checks,
            archives and merges; process r writes every world_size-th group of samples (groups as
            for ``workers``) and its records to its own part file; the set is the same bytes
            whatever the number of processes (every call site passes the same arguments).

    Returns ``{'out_dir', 'num', 'generated', 'resumed', 'skipped_inputs', 'seconds'}``.
    Raises ``FileExistsError`` (refusal), ``FileNotFoundError`` / ``ValueError`` (bad inputs).
    """
    from tqdm import tqdm

    from dalpsr.utils.sharding import Shard
    shard = shard or Shard()
    out = Path(out_dir)
    mode = 'test' if testset else 'train'
    gt_size = int(gt_size) if gt_size else None
    ds_kwargs = dict(dataroot_gt=hr, meta_info=meta_info, gt_size=gt_size, scale=int(scale),
                     use_hflip=(not testset) if use_hflip is None else bool(use_hflip),
                     use_rot=(not testset) if use_rot is None else bool(use_rot),
                     degradation=dict(degradation or {}), prompt=prompt, small_image=small_image,
                     caption_file=caption_file, seed=int(seed))
    ds = _make_dataset(ds_kwargs)  # validates every option and lists the HR images (errors are one line)
    n = len(ds.paths) if num is None else int(num)
    if n < 1:
        raise ValueError(f'num must be >= 1, got {num}')
    hr_list = '\n'.join(str(p) for p in ds.paths)
    config = {'version': _VERSION, 'mode': mode, 'hr': hr if isinstance(hr, str) or hr is None else [str(h) for h in hr],
              'meta_info': meta_info, 'hr_files': len(ds.paths),
              'hr_list_sha1': hashlib.sha1(hr_list.encode('utf-8')).hexdigest(), 'seed': int(seed),
              'gt_size': gt_size, 'scale': int(scale), 'use_hflip': ds.use_hflip, 'use_rot': ds.use_rot,
              'degradation': ds_kwargs['degradation'], 'prompt': ds.spec.to_opt(), 'small_image': small_image,
              'caption_file': caption_file}
    config = json.loads(json.dumps(config))  # normalise tuples etc. for the comparison below

    done: Dict[int, Dict[str, Any]] = {}
    resumed = False
    failure = None
    if shard.is_main:
        try:
            resumed, done = _prepare(out, config, n, mode, testset, len(ds.paths), overwrite, verbose)
        except (FileExistsError, OSError) as err:
            failure = err
    shard.barrier()  # the other processes start once the folder is checked and generate.json written
    if failure is not None:
        raise failure
    log = _Log(out / LOG_FILE, verbose and shard.is_main)
    if not shard.is_main:
        try:
            ok = {k: v for k, v in json.loads((out / GENERATE_FILE).read_text(encoding='utf-8')).items()
                  if k in _IDENTITY_KEYS} == {k: config.get(k) for k in _IDENTITY_KEYS}
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise FileExistsError(f'{out}: the main process refused this folder (see its message)')
        done = _finished(out)

    todo = [i for i in range(n) if i not in done]
    skipped: Dict[str, str] = {}
    t0 = time.time()
    meta = shard.part_path(out / META_FILE)
    groups = shard.take(_groups(todo, len(ds.paths)))
    mine = sum(len(g) for g in groups)

    def _consume(group_results):
        with tqdm(total=mine, disable=not progress, desc=f'triplets -> {out.name}'
                  + (f' (process {shard.rank}/{shard.world_size})' if shard.distributed else ''), unit='sample') as bar:
            for results in group_results:
                for rec, sk in results:
                    for key, reason in sk:
                        if key not in skipped:
                            skipped[key] = reason
                            log(f'skipped input {reason if key in reason else f"{key}: {reason}"}')
                    append_jsonl(meta, rec)
                    done[rec['index']] = rec
                bar.update(len(results))

    args = (ds_kwargs, str(out), mode)
    if groups:
        if int(workers) > 1:
            with worker_pool(int(workers), _init_worker, args, int(threads)) as pool:
                _consume(pool.imap_unordered(_make_samples, groups, chunksize=1))
        else:  # in this process: leave its thread settings alone
            _init_worker(*args)
            _consume(_make_samples(g) for g in groups)
    if shard.distributed:
        log(f'process {shard.rank} of {shard.world_size}: {mine} sample(s) written')
        shard.barrier()  # every process has finished its groups
        if shard.is_main:
            done = _merge_parts(out)
    else:
        _rewrite_meta(out, list(done.values()))  # sorted by index: identical bytes whatever the workers
    dt = time.time() - t0
    if not shard.is_main:
        pass  # the main process reports for all
    elif todo:
        log(f'done: {len(todo)} sample(s) in {dt:.1f} s ({len(todo) / max(dt, 1e-9):.2f} samples/s, '
            f'{workers} worker(s)); {len(done)} in the set')
    else:
        log(f'nothing to do: all {n} sample(s) already in {out}')
    return {'out_dir': str(out), 'num': len(done), 'generated': len(todo), 'resumed': resumed,
            'skipped_inputs': skipped, 'seconds': dt}
