"""Folder evaluation: score every SR image of a folder (against a GT folder), FID over the folders,
and write per_image.csv, summary.json, table.md and iqa.log (atomically; resumable)."""
from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import logging
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from dalpsr.metrics.metric_set import MetricSet, _Seeded
from dalpsr.metrics.pairing import DEFAULT_STRIP_SUFFIXES, Pair, list_images, pair_folders
from dalpsr.metrics.specs import METRIC_SPECS, IQAError, _logger, _one_line, _pyiqa_defaults
from dalpsr.utils.misc import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl

#: Names of the files written into ``out_dir`` by :func:`evaluate_folders`.
OUTPUT_FILES = ('per_image.csv', 'summary.json', 'table.md')
PARTIAL_FILE = '.iqa_partial.jsonl'
LOG_FILE = 'iqa.log'


def _read(path: str) -> Tuple[np.ndarray, bool]:
    """dalpsr.utils.img_io.read_image rules, plus whether the file is plain 8-bit 3-channel."""
    from dalpsr.utils.img_io import decode_file, to_rgb_float
    img = decode_file(path)
    plain = img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    return to_rgb_float(img, path), plain


def _prepare_out(out_dir: Optional[str], overwrite: bool, resume: bool) -> Optional[Path]:
    if out_dir is None:
        return None
    out = Path(out_dir)
    existing = [n for n in OUTPUT_FILES if (out / n).exists()]
    partial = out / PARTIAL_FILE
    if existing and not overwrite:
        raise IQAError(f"{out} already holds results ({', '.join(existing)}); refusing to overwrite them "
                       "(pass --overwrite, or choose another --out)")
    if partial.exists() and not (resume or overwrite):
        raise IQAError(f"{out} holds an interrupted run ({PARTIAL_FILE}); pass --resume to continue it "
                       "or --overwrite to start again")
    if partial.exists() and overwrite and not resume:
        partial.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _fingerprint(payload: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_partial(path: Path, fingerprint: str) -> Dict[str, Dict[str, Any]]:
    if not path.exists():
        return {}
    lines = read_jsonl(path)
    if not lines or lines[0].get('fingerprint') != fingerprint:
        raise IQAError(f"{path} was written with other folders/metrics/options; it cannot be resumed "
                       "(pass --overwrite to start again)")
    return {r['id']: r for r in lines[1:] if 'id' in r}


def _row_id(pair: Pair) -> str:
    return f"{pair.key}|{pair.sr_path or ''}|{pair.gt_path or ''}"


def _versions() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for pkg in ('pyiqa', 'torch', 'torchvision', 'open_clip_torch', 'numpy', 'opencv-python'):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = 'not installed'
    return out


def _fmt(v: Optional[float], fmt: str) -> str:
    return 'n/a' if v is None or not math.isfinite(v) else format(v, fmt)


def markdown_table(name: str, metric_info: Dict[str, Any], results: Dict[str, Any]) -> str:
    """``| Method | LPIPS↓ | ... |`` header, separator and the row of ``name`` (means)."""
    cols, cells = [], []
    for m, info in metric_info.items():
        arrow = '↓' if info.get('lower_better') else '↑'
        if info.get('lower_better') is None:
            spec = METRIC_SPECS.get(m)
            arrow = ''
            if spec and 'lower_better' in spec:
                arrow = '↓' if spec['lower_better'] else '↑'
            elif spec and spec.get('pyiqa_name'):
                try:
                    arrow = '↓' if _pyiqa_defaults(spec['pyiqa_name']).get('lower_better') else '↑'
                except Exception:  # noqa: BLE001
                    arrow = ''
        cols.append(f"{info['label']}{arrow}")
        fmt = METRIC_SPECS.get(m, {}).get('fmt', '.4f')
        cells.append(_fmt((results.get(m) or {}).get('mean'), fmt))
    head = '| Method | ' + ' | '.join(cols) + ' |'
    sep = '|' + '---|' * (len(cols) + 1)
    row = f'| {name} | ' + ' | '.join(cells) + ' |'
    return '\n'.join([head, sep, row]) + '\n'


def evaluate_folders(sr_dir: str, gt_dir: Optional[str] = None, metrics: Optional[Iterable[str]] = None,
                     out_dir: Optional[str] = None, *, name: Optional[str] = None, device: str = 'cpu',
                     weights_dir: Optional[str] = None,
                     strip_suffixes: Optional[Iterable[str]] = DEFAULT_STRIP_SUFFIXES,
                     recursive: bool = False, batch_size: int = 8, overwrite: bool = False,
                     resume: bool = False, progress: bool = True, metric_set: Optional[MetricSet] = None,
                     **metric_opts) -> Dict[str, Any]:
    """Score every SR image of ``sr_dir`` (against ``gt_dir``) and write the result files.

    Outputs in ``out_dir`` (none if ``out_dir`` is None): ``per_image.csv`` (one row per file,
    with ``status`` and ``reason`` columns), ``summary.json`` (mean/std/count per metric, every
    metric option, versions, folders, date), ``table.md`` (paper table row), ``iqa.log``.
    Existing results are never overwritten unless ``overwrite``; an interrupted run (its
    ``.iqa_partial.jsonl``) continues with ``resume``. ``metric_opts`` go to :class:`MetricSet`
    (crop_border, seed, options, ...). Returns the summary dict.
    """
    if not os.path.isdir(sr_dir):
        raise IQAError(f"SR folder not found: {sr_dir}")
    if gt_dir is not None and not os.path.isdir(gt_dir):
        raise IQAError(f"GT folder not found: {gt_dir}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise IQAError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    out = _prepare_out(out_dir, overwrite, resume)
    logger = _logger()
    handler = None
    if out is not None:
        handler = logging.FileHandler(out / LOG_FILE, mode='a', encoding='utf-8')
        handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s: %(message)s'))
        logger.addHandler(handler)
    try:
        return _evaluate(sr_dir, gt_dir, metrics, out, name, device, weights_dir, strip_suffixes, recursive,
                         batch_size, resume, progress, metric_set, metric_opts, logger)
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()


def _evaluate(sr_dir, gt_dir, metrics, out, name, device, weights_dir, strip_suffixes, recursive,
              batch_size, resume, progress, metric_set, metric_opts, logger) -> Dict[str, Any]:
    """The steps of :func:`evaluate_folders` (arguments checked, output folder prepared)."""
    if isinstance(strip_suffixes, str):
        strip_suffixes = strip_suffixes.replace(',', ' ').split()
    strip = [str(s) for s in (strip_suffixes or []) if s and str(s).lower() != 'none']
    logger.info(f'IQA: sr={sr_dir} gt={gt_dir} out={out}')
    ms = metric_set or MetricSet(metrics, device=device, weights_dir=weights_dir, logger=logger, **metric_opts)
    if gt_dir is None:
        for m in ms.metrics.values():
            if m.mode in ('FR', 'folder'):
                logger.warning(f'{m.name}: needs --gt; skipped')
    folder_metrics = [m for m in ms.folder_level() if gt_dir is not None]
    pairs = pair_folders(sr_dir, gt_dir, strip, recursive)
    if not pairs:
        raise IQAError(f"no images found in {sr_dir}" + ('' if gt_dir is None else f' or {gt_dir}'))
    metric_info = ms.describe()
    run_cfg = {'sr_dir': os.path.abspath(sr_dir), 'gt_dir': os.path.abspath(gt_dir) if gt_dir else None,
               'metrics': {k: v for k, v in metric_info.items()}, 'strip_suffixes': strip,
               'recursive': recursive, 'crop_border': ms.crop_border, 'seed': ms.seed}
    fingerprint = _fingerprint(run_cfg)
    done, partial = _open_partial(out, resume, fingerprint, logger)
    records = _score_pairs(pairs, done, ms, bool(folder_metrics), batch_size, partial, progress, logger)
    rows = [records[_row_id(p)] for p in pairs]
    folder_values, fid_counts = _score_folder_metrics(folder_metrics, rows, sr_dir, gt_dir, recursive, ms,
                                                      metric_info, logger)
    results = _aggregate(metric_info, ms, rows, folder_values, fid_counts, gt_dir)
    status_counts: Dict[str, int] = {}
    for r in rows:
        status_counts[r['status']] = status_counts.get(r['status'], 0) + 1
    table_name = name or Path(os.path.abspath(sr_dir)).name
    summary = OrderedDict([
        ('name', table_name),
        ('date', datetime.datetime.now().astimezone().isoformat(timespec='seconds')),
        ('sr_dir', os.path.abspath(sr_dir)), ('gt_dir', os.path.abspath(gt_dir) if gt_dir else None),
        ('results', results), ('metrics', metric_info),
        ('files', {'rows': len(rows), **status_counts}),
        ('settings', {'device': ms.device, 'weights_dir': str(ms.hub), 'strip_suffixes': strip,
                      'recursive': recursive, 'batch_size': batch_size, 'crop_border': ms.crop_border,
                      'crop_border_applies_to': [k for k, s in METRIC_SPECS.items() if s.get('crop')],
                      'seed': ms.seed, 'std': 'population (ddof=0)'}),
        ('versions', _versions()),
        ('fingerprint', fingerprint),
    ])
    summary['table_md'] = markdown_table(table_name, metric_info, results)
    for mname, res in results.items():
        logger.info(f"{mname}: mean={res['mean']} std={res['std']} count={res['count']} ({res['status']})")
    if out is not None:
        _write_results(out, rows, metric_info, summary, ms.crop_border)
        logger.info(f'results written to {out}')
    return summary


def _open_partial(out: Optional[Path], resume: bool, fingerprint: str, logger
                  ) -> Tuple[Dict[str, Dict[str, Any]], Optional[Path]]:
    """Rows already scored by an interrupted run (with ``resume``) and the partial file to append to."""
    done: Dict[str, Dict[str, Any]] = {}
    if out is None:
        return done, None
    partial = out / PARTIAL_FILE
    if resume:
        done = _load_partial(partial, fingerprint)
        if done:
            logger.info(f'resuming: {len(done)} rows already scored')
    if not partial.exists():
        append_jsonl(partial, {'fingerprint': fingerprint})
    return done, partial


def _load_pair(p: Pair, folder_metrics: bool, logger) -> Tuple[Dict[str, Any], Optional[np.ndarray],
                                                                Optional[np.ndarray]]:
    """The row record of one pair and its images (None where not scored per image)."""
    rec = {'id': _row_id(p), 'key': p.key, 'sr_path': p.sr_path, 'gt_path': p.gt_path,
           'status': p.status, 'reason': p.reason, 'width': None, 'height': None,
           'values': {}, 'readable': {}}
    sr_img = gt_img = None
    if p.status in ('ok', 'unpaired_sr', 'ambiguous_gt') or (p.status == 'duplicate' and folder_metrics):
        try:
            sr_img, plain = _read(p.sr_path)
            rec['readable'][p.sr_path] = plain
            rec['height'], rec['width'] = sr_img.shape[:2]
        except Exception as err:  # noqa: BLE001 - ImageReadError and anything odd in a file
            msg = f'SR unreadable: {_one_line(err)}'
            if p.status == 'duplicate':
                rec['reason'] = f"{rec['reason']}; {msg}"
            else:
                rec['status'], rec['reason'] = 'unreadable', msg
        if p.status == 'duplicate':  # read only so that FID counts it
            sr_img = None
    if p.gt_path:
        want_fr = rec['status'] == 'ok'
        if want_fr or folder_metrics:  # unpaired GT files are read only to be counted by FID
            try:
                gt_img, plain = _read(p.gt_path)
                rec['readable'][p.gt_path] = plain
            except Exception as err:  # noqa: BLE001
                gt_img = None
                msg = f'GT unreadable: {_one_line(err)}'
                if want_fr:
                    rec['status'], msg = 'unreadable', msg + '; full-reference metrics skipped'
                rec['reason'] = f"{rec['reason']}; {msg}" if rec['reason'] else msg
        if not want_fr:
            gt_img = None
    if sr_img is not None and gt_img is not None and sr_img.shape != gt_img.shape:
        rec['status'] = 'size_mismatch'
        rec['reason'] = (f'size mismatch: SR {sr_img.shape[1]}x{sr_img.shape[0]} vs GT '
                         f'{gt_img.shape[1]}x{gt_img.shape[0]} (WxH); full-reference metrics skipped')
        gt_img = None
    if rec['reason']:
        logger.warning(f"{p.key}: {rec['reason']}")
    return rec, sr_img, gt_img


def _score_loaded(loaded: List[Tuple[Dict[str, Any], Any, Any]], ms: MetricSet, logger) -> None:
    """Per-image metrics of loaded pairs into their records: same-size images (order kept within a
    group) are scored in one call."""
    groups: Dict[Any, List[int]] = OrderedDict()
    for i, (rec, sr_img, gt_img) in enumerate(loaded):
        if sr_img is None:
            continue
        groups.setdefault((sr_img.shape, gt_img is not None), []).append(i)
    for (_, has_gt), idx in groups.items():
        sr_t = torch.stack([torch.from_numpy(loaded[i][1].transpose(2, 0, 1).copy()) for i in idx])
        gt_t = torch.stack([torch.from_numpy(loaded[i][2].transpose(2, 0, 1).copy()) for i in idx]) \
            if has_gt else None
        values, errors = ms.score_batch(sr_t, gt_t)
        for j, i in enumerate(idx):
            rec = loaded[i][0]
            rec['values'] = {k: v[j] for k, v in values.items() if v[j] is not None}
            if errors[j]:
                msg = '; '.join(errors[j])
                rec['reason'] = f"{rec['reason']}; {msg}" if rec['reason'] else msg
                logger.warning(f"{rec['key']}: {msg}")


def _score_pairs(pairs: Sequence[Pair], done: Dict[str, Dict[str, Any]], ms: MetricSet, folder_metrics: bool,
                 batch_size: int, partial: Optional[Path], progress: bool, logger) -> Dict[str, Dict[str, Any]]:
    """Records of every pair by row id: those of ``done`` as they are, the others scored in chunks of
    ``batch_size`` and appended to ``partial`` as they finish."""
    from tqdm import tqdm
    records: Dict[str, Dict[str, Any]] = {_row_id(p): done[_row_id(p)] for p in pairs if _row_id(p) in done}
    todo = [p for p in pairs if _row_id(p) not in done]
    bar = tqdm(total=len(todo), desc='IQA', disable=not progress, unit='img')
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        loaded = [_load_pair(p, folder_metrics, logger) for p in chunk]
        _score_loaded(loaded, ms, logger)
        for rec, _, _ in loaded:
            records[rec['id']] = rec
            if partial is not None:
                append_jsonl(partial, rec)
        bar.update(len(chunk))
    bar.close()
    return records


def _score_folder_metrics(folder_metrics, rows, sr_dir, gt_dir, recursive, ms: MetricSet,
                          metric_info: Dict[str, Any], logger) -> Tuple[Dict[str, Optional[float]], Dict[str, int]]:
    """Folder metrics (FID) over every readable image of each folder: (values, image counts)."""
    folder_values: Dict[str, Optional[float]] = {}
    if not folder_metrics:
        return folder_values, {}
    readable: Dict[str, bool] = {}
    for r in rows:
        readable.update(r.get('readable', {}))
    sr_set = [(p, readable[p]) for p in (str(x) for x in list_images(sr_dir, recursive)) if p in readable]
    gt_set = [(p, readable[p]) for p in (str(x) for x in list_images(gt_dir, recursive)) if p in readable]
    for m in folder_metrics:
        try:
            logger.info(f'{m.name}: {len(sr_set)} SR vs {len(gt_set)} GT images')
            with _Seeded(ms.seed):
                folder_values[m.name] = m.score_folders(sr_set, gt_set)
        except Exception as err:  # noqa: BLE001
            msg = f'{m.name}: failed: {_one_line(err)}'
            ms.failed[m.name] = msg
            metric_info[m.name]['status'], metric_info[m.name]['error'] = 'failed', msg
            logger.warning(msg)
            folder_values[m.name] = None
    return folder_values, {'sr_images': len(sr_set), 'gt_images': len(gt_set)}


def _aggregate(metric_info, ms: MetricSet, rows, folder_values, fid_counts, gt_dir) -> Dict[str, Any]:
    """Mean / std (population) / count and status of each metric."""
    results: Dict[str, Any] = OrderedDict()
    for mname, info in metric_info.items():
        m = ms.metrics.get(mname)
        if m is None:
            results[mname] = {'mean': None, 'std': None, 'count': 0, 'status': 'failed'}
        elif m.mode == 'folder':
            v = folder_values.get(mname)
            results[mname] = {'mean': v, 'std': None, 'count': 1 if v is not None else 0,
                              'status': 'ok' if v is not None else ('skipped: needs GT' if gt_dir is None
                                                                     else 'failed'), **fid_counts}
        elif m.mode == 'FR' and gt_dir is None:
            results[mname] = {'mean': None, 'std': None, 'count': 0, 'status': 'skipped: needs GT'}
        else:
            vals = np.array([r['values'][mname] for r in rows if mname in r['values']], dtype=np.float64)
            results[mname] = {'mean': float(vals.mean()) if vals.size else None,
                              'std': float(vals.std()) if vals.size else None,
                              'count': int(vals.size), 'status': 'ok' if vals.size else 'no values'}
    return results


def _write_results(out: Path, rows, metric_info, summary, crop_border: int) -> None:
    """per_image.csv, summary.json and table.md, each written atomically; the partial file goes last."""
    metric_cols = [m for m in metric_info]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator='\n')
    w.writerow(['key', 'sr_file', 'gt_file', 'width', 'height'] + metric_cols + ['status', 'reason'])
    for r in rows:
        w.writerow([r['key'], r['sr_path'] or '', r['gt_path'] or '', r['width'] or '', r['height'] or '']
                   + [repr(r['values'][m]) if m in r['values'] else '' for m in metric_cols]
                   + [r['status'], r['reason']])
    atomic_write_text(out / 'per_image.csv', buf.getvalue())
    atomic_write_json(out / 'summary.json', summary)
    note = (f"\n<!-- dalpsr iqa: sr={summary['sr_dir']} gt={summary['gt_dir']} pyiqa {summary['versions']['pyiqa']} "
            f"crop_border={crop_border} ({summary['date']}); options in summary.json -->\n")
    atomic_write_text(out / 'table.md', summary['table_md'] + note)
    if (out / PARTIAL_FILE).exists():
        (out / PARTIAL_FILE).unlink()
