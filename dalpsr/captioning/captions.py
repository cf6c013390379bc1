"""Caption files (C6): one JSON line per image.

Line format::

    {"key": stem, "path": str, "sha1": hex of the image file's bytes, "tags": [str],
     "description": str, "models": {...}, "instruction": str, "error": null | str}

``key`` is the file stem (the name the datasets use); ``sha1`` identifies the image content, so
a renamed or copied image still finds its caption. A line with ``error`` set records a failure
and carries ``description: ""``. Later lines win over earlier ones for the same key, so a rerun
that retries a failed image simply appends.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

#: The DaLPSR instruction (paper Fig. 4); ``{tags}`` is replaced by the comma-separated tags.
DEFAULT_INSTRUCTION = ('Describe this image and its style in a very detailed manner around the following '
                       'tags: {tags}.')
#: Used when there are no tags (``--captioner llava`` or a tagger found nothing).
DEFAULT_INSTRUCTION_NO_TAGS = 'Describe this image and its style in a very detailed manner.'
FIELDS = ('key', 'path', 'sha1', 'tags', 'description', 'models', 'instruction', 'error')


def file_sha1(path) -> str:
    """Hex SHA-1 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha1()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def format_instruction(template: str, tags: Iterable[str], no_tags_template: str = DEFAULT_INSTRUCTION_NO_TAGS) -> str:
    """Fill ``{tags}`` with ``'tag1, tag2'``; without tags use ``no_tags_template``."""
    tags = [t for t in tags if t]
    if not tags and '{tags}' in template:
        return no_tags_template
    return template.replace('{tags}', ', '.join(tags))


def make_record(key: str, path: str, sha1: str, tags: Optional[List[str]] = None, description: str = '',
                models: Optional[Dict[str, Any]] = None, instruction: str = '', error: Optional[str] = None) -> dict:
    return {'key': key, 'path': str(path), 'sha1': sha1, 'tags': list(tags or []),
            'description': description if error is None else '', 'models': dict(models or {}),
            'instruction': instruction, 'error': error}


def read_caption_records(path) -> List[dict]:
    """All records of a caption JSONL file in file order (a truncated last line is ignored)."""
    from dalpsr.utils.misc import read_jsonl
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
