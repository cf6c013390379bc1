"""``dalpsr/test.py`` under ``accelerate launch``: the test-run side of :mod:`dalpsr.utils.sharding`.

The run follows the rule of dalpsr/utils/sharding.py (docs/scaling.md):

* the main process alone prepares (resumes / refuses / archives) the result folder, folds the
  record part files of a killed run into each set's ``records.jsonl``, applies the input rules and
  prepares the prompts (captioner / IRPAD, cached once in the set folder); it then sends every
  process the list of images to do with their prompts and notes (:func:`share`);
* the images to do are cut into the batches one process would make (:func:`units`: consecutive
  images of one LR size, ``batch_size`` at most; the same for any process count, so batches and
  therefore outputs do not depend on it); process
  ``r`` of ``n`` restores units ``r, r + n, ...`` and appends its records to its own part file
  ``.records.jsonl.part<r>`` (flushed and fsynced per record; images are written atomically);
* after a barrier the main process merges the part files into ``records.jsonl`` in image order
  (:func:`merge_records`: atomic rewrite, then the parts are deleted; idempotent) and writes the
  summaries. A killed run is resumed by the same command with any number of processes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from dalpsr.utils.misc import atomic_write_text, read_jsonl
from dalpsr.utils.sharding import Shard

__all__ = ['local_device', 'merge_records', 'share', 'units']


def local_device(device: str, shard: Shard) -> str:
    """A CUDA device of the options -> this process's own GPU under ``accelerate launch``."""
    if shard.device is not None and device.startswith('cuda'):
        return shard.device
    return device


def units(todo: Sequence[Tuple[str, Path]], size: int,
          shapes: Optional[Dict[str, Tuple[int, ...]]] = None) -> List[List[Tuple[str, Path]]]:
    """The batches one process would make of ``todo``: runs of consecutive images of one LR shape
    (``shapes[key]``; unknown shapes count as one), at most ``size`` long. A unit is what one
    process of ``accelerate launch`` takes, so batches do not depend on the process count."""
    size, shapes = max(1, int(size)), shapes or {}
    out: List[List[Tuple[str, Path]]] = []
    for item in todo:
        if out and len(out[-1]) < size and shapes.get(out[-1][0][0]) == shapes.get(item[0]):
            out[-1].append(item)
        else:
            out.append([item])
    return out


def share(shard: Shard, obj: Any) -> Any:
    """``obj`` of the main process, in every process (a broadcast; ``obj`` itself for one process)."""
    if not shard.distributed:
        return obj
    import torch.distributed as dist
    box = [obj if shard.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def merge_records(records_file: Path, order: Optional[Sequence[str]] = None) -> int:
    """Fold the part files of ``records_file`` (any process count) into it; returns the lines added.

    New lines are appended after the existing ones sorted by their key's position in ``order``
    (the set's image order; unknown keys last, by name), as one process would have written them.
    A line already in the file is not repeated; a truncated last line of a part is dropped."""
    import json
    parts = Shard.part_files(records_file)
    if not parts:
        return 0
    old = records_file.read_text(encoding='utf-8') if records_file.is_file() else ''
    if old and not old.endswith('\n'):  # a truncated last line of the file itself
        old = old[:old.rfind('\n') + 1]
    seen = set(old.splitlines())
    pos = {k: i for i, k in enumerate(order or ())}
    new = []
    for p in parts:
        for rec in read_jsonl(p):
            line = json.dumps(rec, ensure_ascii=False)
            if line not in seen:
                seen.add(line)
                new.append((pos.get(rec.get('key'), len(pos)), str(rec.get('key')), line))
    new.sort(key=lambda t: (t[0], t[1]))  # stable: attempts of one key keep their order
    if new:
        atomic_write_text(records_file, old + ''.join(line + '\n' for _, _, line in new))
    for p in parts:
        os.remove(p)
    return len(new)
