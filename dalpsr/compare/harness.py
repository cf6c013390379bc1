"""The comparison run: every method x set through test.py's core, one metric set, the table, the figure.

:func:`compare` (``scripts/compare.py`` is its command line)::

    <results_root>/<name>/
      compare.json          fingerprint: per method and set, what the cell depends on (folder rule below)
      compare.log           what ran, what was skipped as done, every failure
      cells/<method>/<set>.json   done state of one cell: status ok|partial|failed, message, metrics,
                            s/img, peak memory, counts, its fingerprint (atomic)
      runs/<method>/<test name>/<set>/   test.py's result folder (SR images, records.jsonl, summary.json)
      iqa/<method>/<set>/   scripts/iqa.py's outputs (per_image.csv, summary.json, table.md) of the cell
      table.md, table.csv, table.json, figure.png

A cell is restored by :func:`dalpsr.inference.runner.test` (input rules, seeds, records, resume,
the method's own result-folder fingerprint) with the set as its only dataset and no metrics, then
scored by :func:`dalpsr.metrics.iqa.evaluate_folders` with one :class:`MetricSet` for every cell (the
code and defaults of ``scripts/iqa.py``). A cell whose record says ``ok`` with the same fingerprint
is not rerun; a cell that failed (an exception, or images that failed) is reported and retried by
the next run, and the other cells go on. Folder rule (dalpsr.utils.experiment): a new folder is
created; an existing one is resumed when every cell both runs define has the same fingerprint
(adding a method or a set is allowed), refused naming the changed keys otherwise, archived with
``force``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from dalpsr.compare.options import check_inputs
from dalpsr.compare.published import load_published, published_rows
from dalpsr.compare.table import write_tables
from dalpsr.utils.experiment import act_on_folder, plan_folder, read_record, write_record
from dalpsr.utils.misc import atomic_write_json, get_time_str, read_jsonl
from dalpsr.utils.options import OptionError, load_options

logger = logging.getLogger('dalpsr.compare')
RECORD = 'compare.json'
DONE = 'ok'


# ---------------------------------------------------------------------------------------------
# one cell
# ---------------------------------------------------------------------------------------------
def cell_test_options(opt: Dict[str, Any], mkey: str, skey: str) -> Dict[str, Any]:
    """The test options of method ``mkey`` on set ``skey``: its file with its overrides, results under
    ``runs/<method>``, the set as the only dataset, no metrics (the harness scores afterwards)."""
    m, s = opt['methods'][mkey], opt['sets'][skey]
    t = load_options(m['options'], m['set'], is_train=False)
    t['path'] = dict(t.get('path') or {}, results_root=str(compare_dir(opt) / 'runs' / mkey))
    if opt['device']:
        t['model'] = dict(t.get('model') or {}, device=opt['device'])
    t['metrics'] = dict(t.get('metrics') or {}, names=[])
    t['test'] = dict(t.get('test') or {}, progress_bar=bool(opt['progress']))
    t['datasets'] = {skey: {k: s[k] for k in ('name', 'dataroot_lq', 'dataroot_gt', 'caption_file',
                                               'restoration_file')}}
    return t


def cell_fingerprint(opt: Dict[str, Any], mkey: str, skey: str) -> Dict[str, Any]:
    """What a cell's result depends on: the method's test options (overrides applied), the set and
    the metric options. Options that do not load give ``{'error': message}`` (the cell then fails)."""
    try:
        t = cell_test_options(opt, mkey, skey)
    except (OptionError, OSError) as err:
        return {'error': str(err)}
    keep = {k: v for k, v in t.items() if not k.startswith('_') and k not in ('path', 'is_train', 'manual_seed')}
    keep['test'] = {k: v for k, v in keep.get('test', {}).items() if k != 'progress_bar'}
    return json.loads(json.dumps({'test_options': keep, 'metrics': opt['metrics']}, sort_keys=True, default=str))


def compare_dir(opt: Dict[str, Any]) -> Path:
    return Path(opt['path']['results_root']) / opt['name']


def _status_text() -> Dict[str, int]:
    try:
        text = Path('/proc/self/status').read_text()
        return {k: int(re.search(rf'{k}:\s+(\d+)', text).group(1)) for k in ('VmRSS', 'VmHWM')}
    except (OSError, AttributeError):
        return {}


class MemoryProbe:
    """Peak memory of what runs inside ``with``: on CPU the peak resident memory minus the resident
    memory before (the process's peak is reset through ``/proc/self/clear_refs``; without it the
    increase of the lifetime peak, a lower bound); on CUDA taken from the records (see the table)."""

    def __init__(self, device: str):
        self.device, self.mb, self.kind = str(device), None, None

    def __enter__(self):
        if self.device.startswith('cuda'):
            return self
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')
            self._base, self.kind = _status_text()['VmRSS'], 'cpu_peak_rss_increase'
        except (OSError, KeyError):
            import resource
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.kind = 'cpu_peak_rss_increase_lower_bound'
        return self

    def __exit__(self, *exc):
        if self.kind == 'cpu_peak_rss_increase':
            self.mb = max(0.0, (_status_text().get('VmHWM', 0) - self._base) / 1024.0)
        elif self.kind is not None:
            import resource
            self.mb = max(0.0, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._base) / 1024.0)
        return False


def _one_line(err: BaseException) -> str:
    text = ' '.join(str(err).split())
    return text if isinstance(err, (OptionError, FileNotFoundError, FileExistsError)) else \
        f'{type(err).__name__}: {text}'


def run_cell(opt: Dict[str, Any], mkey: str, skey: str, metrics: 'LazyMetricSet') -> Dict[str, Any]:
    """Restore and score one cell; never raises for a failing method (the record says why)."""
    from dalpsr.inference.options import device as resolve_device
    from dalpsr.inference.runner import test
    s = opt['sets'][skey]
    rec: Dict[str, Any] = {'method': mkey, 'set': skey, 'status': 'failed', 'message': '', 'started': get_time_str()}
    t0 = time.perf_counter()
    try:
        t = cell_test_options(opt, mkey, skey)
        dev = resolve_device((t.get('model') or {}).get('device', 'auto'))
        probe = MemoryProbe(dev)
        with probe:
            res = test(t, force=False)
        summary = res['sets'][s['name']]
    except Exception as err:  # noqa: BLE001 - a failing method is reported; the others go on
        rec.update(message=_one_line(err), wall_s=round(time.perf_counter() - t0, 3))
        return rec
    set_dir = Path(res['dir']) / s['name']
    recs = {r['key']: r for r in read_jsonl(set_dir / 'records.jsonl')} if (set_dir / 'records.jsonl').is_file() else {}
    ok = [r for r in recs.values() if r.get('status') == 'ok']
    secs = [r['seconds'] for r in ok if isinstance(r.get('seconds'), (int, float))]
    mem, kind = probe.mb, probe.kind
    if dev.startswith('cuda'):
        mems = [r['peak_mem_mb'] for r in ok if isinstance(r.get('peak_mem_mb'), (int, float))]
        mem, kind = (max(mems) if mems else None), 'cuda_max_allocated'
    problems = summary.get('problems') or []
    rec.update(images=summary['images'], ok=summary['ok'], failed=summary['failed'], skipped=summary['skipped'],
               resumed=summary.get('resumed', 0), sr_dir=str(set_dir), device=dev,
               s_per_img=statistics.median(secs) if secs else None,
               s_per_img_mean=(sum(secs) / len(secs)) if secs else None,
               peak_mem_mb=None if mem is None else round(mem, 1), peak_mem_kind=kind,
               message=problems[0]['message'] if problems else '')
    if summary['ok'] == 0:
        rec['message'] = rec['message'] or 'no image was restored'
        rec['wall_s'] = round(time.perf_counter() - t0, 3)
        return rec
    try:
        iqa = metrics.evaluate(set_dir, s['dataroot_gt'], compare_dir(opt) / 'iqa' / mkey / s['name'],
                               opt['methods'][mkey]['label'])
    except Exception as err:  # noqa: BLE001
        rec.update(status='failed', message=f'metrics: {_one_line(err)}', wall_s=round(time.perf_counter() - t0, 3))
        return rec
    rec.update(values={k: v['mean'] for k, v in iqa['results'].items()},
               counts={k: v['count'] for k, v in iqa['results'].items()},
               metric_info=iqa['metrics'], iqa_dir=str(compare_dir(opt) / 'iqa' / mkey / s['name']),
               status='ok' if summary['failed'] == 0 else 'partial', wall_s=round(time.perf_counter() - t0, 3))
    return rec


class LazyMetricSet:
    """One MetricSet for every cell of a run (built at the first cell that needs it)."""

    def __init__(self, mt: Dict[str, Any]):
        self.mt, self.ms = mt, None

    def evaluate(self, sr_dir: Path, gt_dir: Optional[str], out_dir: Path, name: str) -> Dict[str, Any]:
        from dalpsr.metrics.iqa import MetricSet, evaluate_folders
        from dalpsr.metrics.pairing import DEFAULT_STRIP_SUFFIXES
        mt = self.mt
        if self.ms is None:
            self.ms = MetricSet(mt['names'], device=mt['device'], weights_dir=mt['weights_dir'],
                                crop_border=mt['crop_border'], seed=mt['seed'], options=mt['options'])
        strip = DEFAULT_STRIP_SUFFIXES if mt['strip_suffixes'] is None else mt['strip_suffixes']
        # the cell is not done, so its iqa folder holds an unfinished attempt of this harness: replace it
        return evaluate_folders(str(sr_dir), gt_dir, out_dir=str(out_dir), name=name, overwrite=True,
                                progress=False, metric_set=self.ms, batch_size=int(mt['batch_size']),
                                strip_suffixes=strip)


# ---------------------------------------------------------------------------------------------
# the whole comparison
# ---------------------------------------------------------------------------------------------
def _prepare_folder(root: Path, fingerprint: Dict[str, Any], force: bool) -> str:
    """The folder rule over the cells both runs define (new methods / sets may be added)."""
    stored = (read_record(root / RECORD) or {}).get('fingerprint')
    new, old = fingerprint, stored
    if isinstance(stored, dict):
        new = {m: {s: v for s, v in cells.items() if s in stored.get(m, {})}
               for m, cells in fingerprint.items() if m in stored}
        old = {m: {s: stored[m][s] for s in cells} for m, cells in new.items()}
    action = plan_folder(root, new, old, force, content='comparison results', record=RECORD)
    act_on_folder(root, action)
    merged = {m: dict(cells) for m, cells in (stored or {}).items()} if action == 'resume' else {}
    for m, cells in fingerprint.items():
        merged.setdefault(m, {}).update(cells)
    write_record(root / RECORD, {'fingerprint': merged, 'updated': get_time_str()})
    return action


def hardware() -> str:
    """One line: the CPU (model, cores, torch threads) and any CUDA device."""
    import torch
    cpu = 'CPU'
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    text = f'{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)'
    if torch.cuda.is_available():
        text += f'; GPU {torch.cuda.get_device_name(0)}'
    return text


def compare(opt: Dict[str, Any], force: bool = False) -> Dict[str, Any]:
    """Run the comparison ``opt`` (resolved by :func:`dalpsr.compare.options.load_compare_options`).
    Returns ``{'dir', 'ran', 'done_before', 'failed', 'doc', 'figure'}``. Raises OptionError /
    FileNotFoundError / FileExistsError (one line) before touching anything for bad inputs."""
    import dalpsr.inference.runner  # noqa: F401 - heavy imports before any memory probe
    import dalpsr.restorers  # noqa: F401
    check_inputs(opt)
    published = load_published(opt['published']) if opt['published'] else None
    root = compare_dir(opt)
    cells = {m: {s: cell_fingerprint(opt, m, s) for s in opt['sets']} for m in opt['methods']}
    _prepare_folder(root, cells, force)
    handler = logging.FileHandler(root / 'compare.log', mode='a', encoding='utf-8')
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s: %(message)s'))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    ran, before, failed = [], [], []
    try:
        metrics = LazyMetricSet(opt['metrics'])
        records: Dict[str, Dict[str, Dict[str, Any]]] = {}
        for mkey in opt['methods']:
            for skey in opt['sets']:
                path = root / 'cells' / mkey / f"{opt['sets'][skey]['name']}.json"
                old = read_record(path)
                if old and old.get('status') == DONE and old.get('fingerprint') == cells[mkey][skey]:
                    logger.info(f'[{mkey} x {skey}] done before: not rerun')
                    before.append((mkey, skey))
                    records.setdefault(mkey, {})[skey] = old
                    continue
                logger.info(f'[{mkey} x {skey}] running')
                rec = run_cell(opt, mkey, skey, metrics)
                rec['fingerprint'] = cells[mkey][skey]
                rec['finished'] = get_time_str()
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(path, rec)
                records.setdefault(mkey, {})[skey] = rec
                ran.append((mkey, skey))
                if rec['status'] != DONE:
                    failed.append((mkey, skey))
                    logger.warning(f"[{mkey} x {skey}] {rec['status']}: {rec['message']}")
                else:
                    logger.info(f"[{mkey} x {skey}] ok: " + ', '.join(
                        f'{k} {v:.4f}' for k, v in rec['values'].items() if v is not None))
        doc = build_document(opt, records, published)
        write_tables(root, doc)
        fig = _figure(opt, records, root)
        doc['figure'] = fig
        if fig:
            write_tables(root, doc)
    finally:
        logger.removeHandler(handler)
        handler.close()
    return {'dir': root, 'ran': ran, 'done_before': before, 'failed': failed, 'doc': doc, 'figure': fig}


def build_document(opt: Dict[str, Any], records: Dict[str, Dict[str, Dict[str, Any]]],
                   published: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The table document: columns, sets, our rows with the published rows beside them."""
    from dalpsr.compare.table import metric_columns
    info: Dict[str, Any] = {}
    for cells in records.values():
        for rec in cells.values():
            for k, v in (rec.get('metric_info') or {}).items():
                info.setdefault(k, v)
    info = {n: info.get(n, {'label': n.upper()}) for n in _metric_order(opt, info)}
    protocols = (published or {}).get('protocols', {})
    rows: List[Dict[str, Any]] = []
    for skey, s in opt['sets'].items():
        for mkey, m in opt['methods'].items():
            rec = records.get(mkey, {}).get(skey, {})
            rows.append({'kind': 'ours', 'set': skey, 'protocol': s['protocol'], 'method': mkey, 'label': m['label'],
                         'stand_in': m['stand_in'], 'status': rec.get('status', 'failed'),
                         'message': rec.get('message', ''), 'values': dict(rec.get('values') or {}),
                         'counts': rec.get('counts', {}), 's_per_img': rec.get('s_per_img'),
                         'peak_mem_mb': rec.get('peak_mem_mb'), 'peak_mem_kind': rec.get('peak_mem_kind'),
                         'images': rec.get('images', 0), 'ok': rec.get('ok', 0), 'failed': rec.get('failed', 0),
                         'skipped': rec.get('skipped', 0), 'device': rec.get('device'), 'sr_dir': rec.get('sr_dir'),
                         'iqa_dir': rec.get('iqa_dir'), 'wall_s': rec.get('wall_s')})
            for e in published_rows(published, m['published'], s):
                rows.append(dict(e, kind='published', set=skey, method=mkey, method_published=e['method'],
                                 label=f"published {e['method']}", values=dict(e['values'])))
    return {'name': opt['name'], 'created': get_time_str(), 'hardware': hardware(), 'options': opt['_source'],
            'metrics': opt['metrics'], 'columns': metric_columns(info, opt['metrics']['crop_border']),
            'metric_info': info,
            'sets': [{'key': k, 'name': s['name'], 'protocol': s['protocol'],
                      'protocol_text': protocols.get(s['protocol'], ''), 'dataroot_lq': s['dataroot_lq'],
                      'dataroot_gt': s['dataroot_gt'], 'published_as': s['published_as']}
                     for k, s in opt['sets'].items()],
            'rows': rows}


def _metric_order(opt: Dict[str, Any], info: Dict[str, Any]) -> List[str]:
    from dalpsr.metrics.specs import expand_metric_names
    names = expand_metric_names(opt['metrics']['names'])
    return names + [n for n in info if n not in names]


def _figure(opt: Dict[str, Any], records, root: Path) -> Optional[str]:
    """figure.png: crops of LR, every method with output and HR for the chosen images of one set."""
    from dalpsr.compare.figure import crops_figure
    from dalpsr.inference.inputs import list_set_images
    fig = opt['figure']
    skey = fig['set'] or next(iter(opt['sets']))
    s = opt['sets'][skey]
    methods = [(opt['methods'][m]['label'], records[m][skey]['sr_dir']) for m in opt['methods']
               if records.get(m, {}).get(skey, {}).get('status') in ('ok', 'partial')]
    if not methods:
        logger.warning('figure: no method restored the images of set %s', skey)
        return None
    stems = list(fig['images'] or [k for k, _ in list_set_images(Path(s['dataroot_lq']), False)[0]]
                 [:int(fig['max_images'])])
    try:
        return crops_figure(s['dataroot_lq'], s['dataroot_gt'], methods, stems, str(root / 'figure.png'),
                            crop=int(fig['crop']), at=fig['at'])
    except (FileNotFoundError, ValueError) as err:
        logger.warning('figure: %s', _one_line(err))
        return None
