"""Pairing SR outputs with ground-truth images by file stem.

Rules (documented in docs/metrics.md):

* Images are files whose suffix (case-insensitive) is in ``dalpsr.utils.misc.IMG_EXTENSIONS``;
  names starting with '.' are ignored. With ``recursive=True`` sub-folders are scanned and the
  key keeps the relative folder (``sub/0801``).
* The key of a file is its stem with every suffix of ``strip_suffixes`` removed from the end,
  repeatedly and case-insensitively (``0801_x4_SR`` -> ``0801``), for SR and GT alike.
* A key that two SR files share is ambiguous: both rows are reported (``status='duplicate'``)
  and skipped. A key two GT files share leaves its SR files without GT (``'ambiguous_gt'``).
* SR files without GT are ``'unpaired_sr'`` (no-reference metrics still run); GT files without
  SR are ``'unpaired_gt'`` (reported, no metric).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from dalpsr.utils.misc import IMG_EXTENSIONS

#: Default suffixes removed from stems before pairing (case-insensitive): common SR-output
#: and dataset naming (RealSR ``_LR4``/``_HR``, DRealSR ``_x1``/``_x4``, ``_out``, ``_SR``).
DEFAULT_STRIP_SUFFIXES = ('_out', '_sr', '_x1', '_x2', '_x3', '_x4', '_x8', '_lr2', '_lr3', '_lr4',
                          '_hr', '_gt')


@dataclass
class Pair:
    """One row of the evaluation: ``status`` is ok / unpaired_sr / unpaired_gt / duplicate /
    ambiguous_gt; ``reason`` explains anything that is not ok."""
    key: str
    sr_path: Optional[str]
    gt_path: Optional[str]
    status: str = 'ok'
    reason: str = ''
    extra: Dict = field(default_factory=dict)


def strip_key(stem: str, suffixes: Sequence[str]) -> str:
    """Remove any of ``suffixes`` from the end of ``stem`` repeatedly (case-insensitive).
    A suffix is never stripped if that would leave an empty key."""
    low = [s.lower() for s in suffixes if s]
    changed = True
    while changed:
        changed = False
        for suf in low:
            if stem.lower().endswith(suf) and len(stem) > len(suf):
                stem = stem[: -len(suf)]
                changed = True
    return stem


def list_images(folder: str, recursive: bool = False) -> List[Path]:
    """Sorted image files of ``folder`` (suffix check only; content is checked when read)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    it = root.rglob('*') if recursive else root.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS
                  and not p.name.startswith('.'))


def _key(path: Path, root: Path, suffixes: Sequence[str]) -> str:
    rel = path.relative_to(root)
    stem = strip_key(rel.stem, suffixes)
    parent = rel.parent.as_posix()
    return stem if parent in ('', '.') else f'{parent}/{stem}'


def pair_folders(sr_dir: str, gt_dir: Optional[str] = None,
                 strip_suffixes: Iterable[str] = DEFAULT_STRIP_SUFFIXES,
                 recursive: bool = False) -> List[Pair]:
    """Pair images of ``sr_dir`` with ``gt_dir`` by key; rows sorted by key (SR rows first)."""
    suffixes = tuple(strip_suffixes or ())
    sr_root = Path(sr_dir)
    sr_files = list_images(sr_dir, recursive)
    by_key: Dict[str, List[Path]] = {}
    for p in sr_files:
        by_key.setdefault(_key(p, sr_root, suffixes), []).append(p)
    gt_by_key: Dict[str, List[Path]] = {}
    if gt_dir is not None:
        gt_root = Path(gt_dir)
        for p in list_images(gt_dir, recursive):
            gt_by_key.setdefault(_key(p, gt_root, suffixes), []).append(p)
    rows: List[Pair] = []
    for key in sorted(by_key):
        srs = by_key[key]
        if len(srs) > 1:
            names = ', '.join(p.name for p in srs)
            for p in srs:
                rows.append(Pair(key, str(p), None, 'duplicate',
                                 f'{len(srs)} SR files share the key {key!r} ({names}); skipped'))
            continue
        sr = str(srs[0])
        if gt_dir is None:
            rows.append(Pair(key, sr, None, 'ok'))
            continue
        gts = gt_by_key.get(key, [])
        if not gts:
            rows.append(Pair(key, sr, None, 'unpaired_sr',
                             f'no GT image with key {key!r} in {gt_dir}; full-reference metrics skipped'))
        elif len(gts) > 1:
            names = ', '.join(p.name for p in gts)
            rows.append(Pair(key, sr, None, 'ambiguous_gt',
                             f'{len(gts)} GT files share the key {key!r} ({names}); full-reference metrics skipped'))
        else:
            rows.append(Pair(key, sr, str(gts[0]), 'ok'))
    for key in sorted(set(gt_by_key) - set(by_key)):
        for p in gt_by_key[key]:
            rows.append(Pair(key, None, str(p), 'unpaired_gt', f'no SR image with key {key!r} in {sr_dir}'))
    return rows
