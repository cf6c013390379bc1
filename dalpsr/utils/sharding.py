"""Split a script's work across the processes of ``accelerate launch`` (GPUs, machines).

Under ``accelerate launch`` (``WORLD_SIZE`` > 1 in the environment) :func:`current_shard`
joins the process group (NCCL on GPUs, gloo on CPUs) and returns this process's
:class:`Shard`; a plain ``python script.py`` gets the single shard (rank 0 of 1, no group).
The scripts that use it (``scripts/generate_lq.py``, ``scripts/caption.py``; docs/scaling.md)
follow one rule so that the result does not depend on the number of processes:

* the work list is computed identically in every process (sorted, minus what is finished);
* process ``r`` of ``n`` takes the units ``r, r + n, r + 2n, ...`` (:meth:`Shard.take`) where a unit
  is already what one process would do in one go (a group of samples, a caption batch);
* each process appends finished records to its own part file (:meth:`Shard.part_path`), flushed
  and fsynced per record, so a kill loses only unfinished work;
* the main process merges the part files into the one output (sorted as a single process would
  write it) at the start of a run (leftovers of a killed run, whatever its process count) and at
  the end, after a barrier; merging is atomic (temp file + rename) and idempotent.

Trap (REFERENCE.md section 2): ``accelerate launch --multi_gpu`` on a machine without GPUs starts
independent one-process runs unless the CPU switch is set; :func:`current_shard` passes
``cpu=True`` when CUDA is unavailable and refuses a group whose size differs from ``WORLD_SIZE``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

__all__ = ['Shard', 'current_shard']


@dataclass
class Shard:
    """This process's place among ``world_size`` processes (rank 0 is the main one)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: Optional[str] = None  # the accelerator of this process ('cuda:N'), None on CPU / single process
    _barrier: Optional[Callable[[], Any]] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait until every process gets here (no-op for a single process)."""
        if self._barrier is not None and self.world_size > 1:
            self._barrier()

    def take(self, units: Sequence[Any]) -> List[Any]:
        """This process's units: ``units[rank::world_size]`` (deterministic, disjoint, complete)."""
        return list(units)[self.rank::self.world_size]

    def part_path(self, path: os.PathLike) -> Path:
        """Where this process appends its records of the output ``path``: ``path`` itself for a single
        process, else ``.<name>.part<rank>`` next to it (merged by the main process)."""
        p = Path(path)
        return p if self.world_size == 1 else p.with_name(f'.{p.name}.part{self.rank}')

    @staticmethod
    def part_files(path: os.PathLike) -> List[Path]:
        """Part files of ``path`` left by any process count, sorted by rank."""
        p = Path(path)
        if not p.parent.is_dir():
            return []
        parts = [q for q in p.parent.glob(f'.{p.name}.part*') if q.name[len(p.name) + 6:].isdigit()]
        return sorted(parts, key=lambda q: int(q.name[len(p.name) + 6:]))


def current_shard() -> Shard:
    """This process's :class:`Shard` (joins the process group under ``accelerate launch``)."""
    world = int(os.environ.get('WORLD_SIZE', '1') or 1)
    if world <= 1:
        return Shard()
    import torch
    from accelerate import PartialState
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes != world:
        raise RuntimeError(f'accelerate started {state.num_processes} process group(s) of 1 for WORLD_SIZE={world} '
                           '(on CPUs launch with --multi_gpu and no --cpu; see docs/scaling.md)')
    device = str(state.device) if state.device.type != 'cpu' else None
    return Shard(state.process_index, state.num_processes, state.local_process_index, device,
                 state.wait_for_everyone)
