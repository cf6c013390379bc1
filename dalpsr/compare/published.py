"""Published numbers (options/compare/published.yml): loading, checks and the rows shown beside ours.

The file has two blocks::

    protocols: {id: what the protocol is}            # our ids: realsr-stablesr, div2k-val-3k-seesr, ...
    entries:                                         # one per method x published dataset
      - {method, paper, table, dataset, protocol, hardware, s_per_img, metric_settings, values, source}

``values`` uses our metric names (dalpsr.metrics.specs.METRIC_SPECS). Every entry names its source.
A published entry is shown beside our row of a method when the method's ``published`` name equals
the entry's ``method`` and the set lists the entry's ``dataset`` in ``published_as``; it is marked
``same protocol`` only when the entry's protocol id equals the set's, otherwise ``OTHER protocol``
(never compared silently).
"""
from __future__ import annotations

from typing import Any, Dict, List

from dalpsr.utils.options import OptionError, load_yaml

ENTRY_KEYS = ('method', 'paper', 'table', 'dataset', 'protocol', 'hardware', 's_per_img', 'metric_settings',
              'values', 'source')
REQUIRED = ('method', 'paper', 'table', 'dataset', 'protocol', 'values', 'source')


def load_published(path: str) -> Dict[str, Any]:
    """``{'protocols': {...}, 'entries': [...]}`` of ``path``, checked (one-line OptionError)."""
    from dalpsr.metrics.specs import METRIC_SPECS
    data = load_yaml(path)
    if not isinstance(data, dict) or set(data) - {'protocols', 'entries'}:
        raise OptionError(f"{path}: expected the blocks 'protocols' and 'entries' only")
    protocols = data.get('protocols') or {}
    entries = data.get('entries') or []
    if not isinstance(protocols, dict) or not isinstance(entries, list):
        raise OptionError(f"{path}: 'protocols' must be a mapping and 'entries' a list")
    out = []
    for i, e in enumerate(entries):
        where = f'entries[{i}] of {path}'
        if not isinstance(e, dict):
            raise OptionError(f'{where} must be a mapping')
        unknown = sorted(set(e) - set(ENTRY_KEYS))
        if unknown:
            raise OptionError(f"unknown key '{unknown[0]}' in {where} (known: {', '.join(ENTRY_KEYS)})")
        missing = [k for k in REQUIRED if not e.get(k)]
        if missing:
            raise OptionError(f"missing required key '{missing[0]}' in {where} (every published number is sourced)")
        if e['protocol'] not in protocols:
            raise OptionError(f"{where}: protocol '{e['protocol']}' is not described under 'protocols'")
        if not isinstance(e['values'], dict):
            raise OptionError(f"{where}: 'values' must map metric names to numbers")
        for m, v in e['values'].items():
            if m not in METRIC_SPECS:
                raise OptionError(f"{where}: '{m}' is not a metric name of dalpsr.metrics (docs/metrics.md)")
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise OptionError(f'{where}: values.{m} must be a number, got {v!r}')
        out.append({k: e.get(k) for k in ENTRY_KEYS})
    return {'protocols': dict(protocols), 'entries': out}


def published_rows(published: Dict[str, Any], method_name: str, set_opt: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Entries of ``method_name`` for the datasets the set lists in ``published_as``, each with
    ``protocol_match`` (True only for the set's own protocol id) and ``protocol_note``."""
    if not method_name or not published:
        return []
    rows = []
    for e in published['entries']:
        if e['method'] != method_name or e['dataset'] not in set_opt['published_as']:
            continue
        same = e['protocol'] == set_opt['protocol']
        note = (f"same protocol ({e['protocol']})" if same else
                f"OTHER protocol: {e['protocol']} (ours: {set_opt['protocol']}); not comparable")
        rows.append(dict(e, protocol_match=same, protocol_note=note,
                         protocol_text=published['protocols'].get(e['protocol'], '')))
    return rows
