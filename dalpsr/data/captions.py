"""Reading caption files (written by ``scripts/caption.py``, format in
:mod:`dalpsr.captioning.captions`): the datasets and test-time prompt code read them here, without
importing the captioning models.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List

from dalpsr.utils.misc import read_jsonl

__all__ = ['read_caption_records', 'latest_records', 'load_captions']


def read_caption_records(path) -> List[dict]:
    """All records of a caption JSONL file in file order (a truncated last line is ignored)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f'caption file not found: {p} (write one with scripts/caption.py)')
    recs = read_jsonl(p)
    for i, r in enumerate(recs):
        if not isinstance(r, dict) or 'key' not in r or 'description' not in r:
            raise ValueError(f"{p}: record {i + 1} lacks 'key'/'description' (not a dalpsr caption file?)")
    return recs


def latest_records(records: Iterable[dict]) -> Dict[str, dict]:
    """key -> the last record for that key."""
    out: Dict[str, dict] = {}
    for r in records:
        out[r['key']] = r
    return out


def load_captions(path) -> Dict[str, str]:
    """Caption lookup for datasets: ``{key: description}`` plus ``{sha1: description}``.

    Only successful records count (``error`` is null); for a key captioned several times the
    last successful record wins. Keys and SHA-1 hex digests (40 hex chars) share one dict.
    """
    out: Dict[str, str] = {}
    for r in read_caption_records(path):
        if r.get('error') is not None:
            continue
        desc = r.get('description') or ''
        out[r['key']] = desc
        if r.get('sha1'):
            out[r['sha1']] = desc
    return out
