"""The comparison table: our rows (per method and set: every metric, s/img, peak memory, status) with
the published rows beside them, written as markdown, CSV and JSON (each atomically).

Rows are dicts; ``kind`` is ``'ours'`` or ``'published'``. Our row: ``set, method, label, stand_in,
status, message, values {metric: mean}, counts, s_per_img, peak_mem_mb, peak_mem_kind, images, ok,
failed, skipped``. A published row: the entry of options/compare/published.yml plus
``protocol_match`` / ``protocol_note`` (dalpsr.compare.published).
"""
from __future__ import annotations

import csv
import io
import math
from typing import Any, Dict, List, Optional

from dalpsr.utils.misc import atomic_write_json, atomic_write_text

#: what the peak memory of a row measured
MEMORY_KINDS = {
    'cpu_peak_rss_increase': 'CPU: peak resident memory (VmHWM) of the process during the cell minus its '
                             'resident memory before it (MiB)',
    'cpu_peak_rss_increase_lower_bound': "CPU: increase of the process's lifetime peak RSS during the cell "
                                         '(a lower bound: /proc/self/clear_refs was not available) (MiB)',
    'cuda_max_allocated': 'CUDA: torch.cuda.max_memory_allocated over the batches of the cell (MiB)',
}
_MEM_SHORT = {'cpu_peak_rss_increase': 'RSS', 'cpu_peak_rss_increase_lower_bound': 'RSS>=',
              'cuda_max_allocated': 'CUDA'}
FILES = ('table.md', 'table.csv', 'table.json')


def _fmt(v: Optional[float], fmt: str = '.4f') -> str:
    return '' if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def metric_columns(metric_info: Dict[str, Any], crop_border: int) -> List[Dict[str, Any]]:
    """[{name, header, fmt}] in the order of the metric set (arrows: ↑ higher is better, ↓ lower)."""
    from dalpsr.metrics.specs import METRIC_SPECS
    cols = []
    for name, info in metric_info.items():
        spec = METRIC_SPECS.get(name, {})
        low = info.get('lower_better')
        if low is None:
            low = spec.get('lower_better')
        arrow = '' if low is None else ('↓' if low else '↑')
        extra = f' (Y, crop {crop_border})' if spec.get('crop') else ''
        cols.append({'name': name, 'header': f"{info.get('label', name.upper())}{arrow}{extra}",
                     'fmt': spec.get('fmt', '.4f')})
    return cols


def _status(row: Dict[str, Any]) -> str:
    if row['kind'] == 'published':
        return 'published'
    text = f"{row['status']} {row.get('ok', 0)}/{row.get('images', 0)}"
    if row['status'] != 'ok' and row.get('message'):
        text += f": {row['message']}"
    return text.replace('|', '/')


def _memory(row: Dict[str, Any], uniform: Optional[str]) -> str:
    v = row.get('peak_mem_mb')
    if v is None:
        return ''
    return f'{v:.0f}' if uniform else f"{v:.0f} ({_MEM_SHORT.get(row.get('peak_mem_kind'), row.get('peak_mem_kind'))})"


def _label(row: Dict[str, Any]) -> str:
    if row['kind'] == 'published':
        hw = f"; speed on {row['hardware']}" if row.get('hardware') and row.get('s_per_img') is not None else ''
        return (f"↳ published {row['method_published']} ({row['paper']}, {row['table']}) "
                f"[{row['protocol_note']}{hw}]").replace('|', '/')
    mark = ' — TINY RANDOM STAND-IN' if row.get('stand_in') else ''
    return f"{row['label']}{mark}"


def render_markdown(doc: Dict[str, Any]) -> str:
    """The markdown table of :func:`write_tables`' document."""
    cols = doc['columns']
    kinds = sorted({r['peak_mem_kind'] for r in doc['rows'] if r['kind'] == 'ours' and r.get('peak_mem_kind')})
    uniform = kinds[0] if len(kinds) == 1 else None
    mem_head = f"peak MiB ({_MEM_SHORT.get(uniform, uniform)})" if uniform else 'peak MiB (kind)'
    lines = [f"# Comparison `{doc['name']}`", '',
             f"Metrics: {', '.join(c['header'] for c in cols)} from `dalpsr.metrics` (the code of `scripts/iqa.py`) "
             f"on the saved SR images against the GT; means over the images. s/img: median over the images of "
             f"the restore time per image (batch time / batch size; the first batch also loads the weights). "
             f"Hardware: {doc['hardware']}.", '']
    for kind in kinds:
        lines.append(f'Peak memory ({_MEM_SHORT.get(kind, kind)}): {MEMORY_KINDS.get(kind, kind)}.')
    lines.append('Published rows are shown beside ours, marked `same protocol` only when they were measured on '
                 'the protocol of our set; their speed is on their hardware.')
    for s in doc['sets']:
        lines += ['', f"## {s['name']} — protocol `{s['protocol']}`"
                  f"{': ' + s['protocol_text'] if s.get('protocol_text') else ''}", '',
                  '| method | ' + ' | '.join(c['header'] for c in cols) + f' | s/img | {mem_head} | status |',
                  '|' + '---|' * (len(cols) + 4)]
        for r in (r for r in doc['rows'] if r['set'] == s['key']):
            cells = [_fmt(r['values'].get(c['name']), c['fmt']) for c in cols]
            sec = _fmt(r.get('s_per_img'), '.3f')
            lines.append(f'| {_label(r)} | ' + ' | '.join(cells) + f' | {sec} | {_memory(r, uniform)} | {_status(r)} |')
    notes = [r for r in doc['rows'] if r['kind'] == 'published' and r.get('metric_settings')]
    if notes:
        lines += ['', 'Metric settings of published rows:']
        for n in {(r['method_published'], r['metric_settings']) for r in notes}:
            lines.append(f'- {n[0]}: {n[1]}')
    return '\n'.join(lines) + '\n'


def render_csv(doc: Dict[str, Any]) -> str:
    cols = [c['name'] for c in doc['columns']]
    head = ['set', 'protocol', 'row', 'method', 'label', 'stand_in', 'status', 'message'] + cols + [
        's_per_img', 'peak_mem_mb', 'peak_mem_kind', 'images', 'ok', 'failed', 'hardware', 'protocol_match',
        'protocol_note', 'paper', 'table', 'source']
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator='\n')
    w.writerow(head)
    for r in doc['rows']:
        pub = r['kind'] == 'published'
        w.writerow([r['set'], r['protocol'], r['kind'], r['method'], _label(r), r.get('stand_in', False),
                    'published' if pub else r['status'], r.get('message', '')]
                   + [repr(r['values'][c]) if r['values'].get(c) is not None else '' for c in cols]
                   + [r.get('s_per_img') if r.get('s_per_img') is not None else '',
                      r.get('peak_mem_mb') if r.get('peak_mem_mb') is not None else '', r.get('peak_mem_kind', ''),
                      r.get('images', ''), r.get('ok', ''), r.get('failed', ''),
                      r.get('hardware') or (doc['hardware'] if not pub else ''),
                      r.get('protocol_match', ''), r.get('protocol_note', ''), r.get('paper', ''),
                      r.get('table', ''), r.get('source', '')])
    return buf.getvalue()


def write_tables(out_dir, doc: Dict[str, Any]) -> Dict[str, str]:
    """table.md, table.csv and table.json of ``doc`` in ``out_dir`` (atomic writes); returns the paths."""
    from pathlib import Path
    out = Path(out_dir)
    atomic_write_text(out / 'table.md', render_markdown(doc))
    atomic_write_text(out / 'table.csv', render_csv(doc))
    atomic_write_json(out / 'table.json', doc)
    return {f: str(out / f) for f in FILES}
