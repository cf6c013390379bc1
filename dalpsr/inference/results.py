"""Result folders: the run folder rule, one test set's records and summary, progress, memory.

``<results_root>/<name>/`` holds ``run.json`` (the fingerprint: options that change output pixels),
``options.yml``, ``test.log``, ``summary.json`` and one folder per test set with the SR images,
``records.jsonl`` (one JSON line per image and attempt; the latest line of a key counts),
``captions.jsonl`` / ``restoration.jsonl`` (prompt caches) and ``summary.json``.
The folder rule is :func:`dalpsr.utils.experiment.prepare_folder` (resume when the fingerprint
matches, refuse naming the changed keys, archive with ``--force``).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from dalpsr.inference.inputs import InputRejected, gt_index, list_set_images, load_lr
from dalpsr.utils.experiment import prepare_folder
from dalpsr.utils.misc import append_jsonl, atomic_write_json, get_time_str, read_jsonl

logger = logging.getLogger('dalpsr')
RUN_FILE = 'run.json'
RECORDS = 'records.jsonl'


def prepare_results(opt: Dict[str, Any], payload: Dict[str, Any], force: bool) -> Path:
    """Create or reuse ``results/<name>`` (the one folder rule of dalpsr.utils.experiment)."""
    out = Path(opt['path']['results_root']) / opt['name']
    prepare_folder(out, payload, force, record=RUN_FILE, extra={'created': get_time_str()},
                   content='results', advice='')
    return out


class TestSet:
    """State of one test set: its images, records and caches."""

    def __init__(self, key: str, block: Dict[str, Any], out_root: Path, opt: Dict[str, Any]):
        self.key, self.block, self.opt = key, block, opt
        self.name = block['name']
        self.dir = out_root / self.name
        lq = Path(block['dataroot_lq'])
        if not lq.is_dir():
            raise FileNotFoundError(f"datasets.{key}.dataroot_lq: folder not found: {lq}")
        if block['dataroot_gt'] and not Path(block['dataroot_gt']).is_dir():
            raise FileNotFoundError(f"datasets.{key}.dataroot_gt: folder not found: {block['dataroot_gt']}")
        for k in ('caption_file', 'restoration_file'):
            if block[k] and not Path(block[k]).is_file():
                raise FileNotFoundError(f'datasets.{key}.{k}: file not found: {block[k]}')
        recursive = bool(opt['test']['recursive'])
        self.images, self.ignored = list_set_images(lq, recursive)
        self.gt = gt_index(block['dataroot_gt'], recursive)
        self.dir.mkdir(parents=True, exist_ok=True)
        set_file = self.dir / 'set.json'
        desc = {k: (str(v) if v is not None else None) for k, v in block.items()}
        if set_file.is_file():
            old = json.loads(set_file.read_text(encoding='utf-8'))
            if {k: old.get(k) for k in ('dataroot_lq', 'caption_file', 'restoration_file')} != \
                    {k: desc[k] for k in ('dataroot_lq', 'caption_file', 'restoration_file')}:
                raise FileExistsError(f'{self.dir} holds results of other inputs ({old}); refusing to mix them. '
                                      'Use --force to archive the run folder, or give the set another name')
        atomic_write_json(set_file, desc)
        self.records_file = self.dir / RECORDS
        self.records: Dict[str, Dict[str, Any]] = {}
        if self.records_file.is_file():
            for r in read_jsonl(self.records_file):
                self.records[r['key']] = r
        ext = opt['test']['ext']
        self.todo: List[Tuple[str, Path]] = []
        self.resumed = 0
        for k, p in self.images:
            r = self.records.get(k)
            if r is not None and r.get('status') == 'ok' and (self.dir / f'{k}.{ext}').is_file():
                self.resumed += 1
            else:
                self.todo.append((k, p))
        self.captions: Dict[str, str] = {}
        self.restoration: Dict[str, str] = {}
        self.notes: Dict[str, List[str]] = {}
        self.shapes: Dict[str, Tuple[int, ...]] = {}  # LR shape (H, W, C) of the images checked
        self.units: List[List[Tuple[str, Path]]] = []  # batches of todo (dalpsr.inference.sharded.units)

    def output_path(self, key: str) -> Path:
        return self.dir / f"{key}.{self.opt['test']['ext']}"

    def record(self, rec: Dict[str, Any]) -> None:
        append_jsonl(self.records_file, rec)
        self.records[rec['key']] = rec


def progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit='img', dynamic_ncols=True, disable=not enabled or total == 0)


def reject(ts: TestSet, key: str, path: Path, err: InputRejected) -> None:
    logger.warning(f'[{ts.name}] {err.status}: {err}')
    ts.record({'key': key, 'lr_path': str(path), 'status': err.status, 'message': str(err), 'time': get_time_str()})


def check_inputs(ts: TestSet, rules: Dict[str, Any]) -> None:
    """Apply the input rules to every image still to do; rejected ones are recorded and dropped."""
    keep = []
    for key, path in ts.todo:
        try:
            img, notes = load_lr(path, rules)
        except InputRejected as err:
            reject(ts, key, path, err)
            continue
        ts.notes[key] = notes
        ts.shapes[key] = tuple(img.shape)
        keep.append((key, path))
    ts.todo = keep


def summarize_set(ts: TestSet, metric_info: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Counts, mean metrics, timing and memory over the latest record of every image of the set."""
    keys = [k for k, _ in ts.images]
    recs = [ts.records[k] for k in keys if k in ts.records]
    ok = [r for r in recs if r.get('status') == 'ok']
    metrics: Dict[str, Any] = {}
    for r in ok:
        for name, v in (r.get('metrics') or {}).items():
            metrics.setdefault(name, []).append(float(v))
    secs = [r['seconds'] for r in ok if r.get('seconds') is not None]
    mems = [r['peak_mem_mb'] for r in ok if r.get('peak_mem_mb') is not None and math.isfinite(r['peak_mem_mb'])]
    return {
        'set': ts.name, 'dataroot_lq': ts.block['dataroot_lq'], 'dataroot_gt': ts.block['dataroot_gt'],
        'images': len(keys), 'ok': len(ok),
        'skipped': sum(r.get('status') == 'skipped' for r in recs),
        'failed': sum(r.get('status') == 'failed' for r in recs),
        'not_done': len(keys) - len(recs), 'resumed': ts.resumed, 'ignored_non_image_files': ts.ignored,
        'metrics': {k: {'mean': float(np.mean(v)), 'std': float(np.std(v)), 'count': len(v)}
                    for k, v in metrics.items()},
        'metric_info': metric_info or {},
        'seconds_per_image': {'mean': float(np.mean(secs)), 'max': float(np.max(secs))} if secs else None,
        'peak_mem_mb_max': float(np.max(mems)) if mems else None,
        'problems': [{'key': r['key'], 'status': r['status'], 'message': r.get('message', '')}
                     for r in recs if r.get('status') != 'ok'],
    }


def peak_memory(device: str) -> Tuple[float, str]:
    """(MiB, kind): CUDA peak allocated since the last reset, else the process's peak RSS."""
    import torch
    if device.startswith('cuda') and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20, 'cuda_max_allocated'
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 'process_peak_rss'
    except ImportError:  # pragma: no cover - not on Linux
        return float('nan'), 'unknown'


