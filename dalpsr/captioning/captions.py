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
from typing import Any, Dict, Iterable, List, Optional

# the reader lives in dalpsr.data (datasets read caption files without the captioning models)
from dalpsr.data.captions import latest_records, load_captions, read_caption_records  # noqa: F401

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
