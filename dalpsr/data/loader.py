"""Deterministic, resumable, process-sharded data loading for the training loop.

The training stream is a fixed sequence of dataset indices that depends only on the seed
and the dataset length::

    stream[g] = epoch * N + perm_epoch[j]      with  g = epoch * N + j,  0 <= j < N
    perm_epoch = np.random.default_rng([seed, epoch]).permutation(N)

A dataset's ``__getitem__(i)`` uses ``i % N`` as the item and ``sample_rng(seed, i)`` for its
random choices, so a sample is the same whichever worker, process or resume point asks for
it (and differs between epochs, since ``i`` grows with the epoch).

Micro-step ``k`` (one forward/backward on each process) consumes the global positions
``[k * B * W, (k + 1) * B * W)`` (B = per-process batch size, W = number of processes);
process ``r`` takes ``[k * B * W + r * B, k * B * W + (r + 1) * B)``. The processes therefore
see disjoint samples, and together exactly the samples one process would see with batch
size ``B * W``. Resuming at micro-step ``k`` starts the stream at ``k * B * W``.
"""
from __future__ import annotations

import random
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler


class InfiniteSampler(Sampler):
    """Endless deterministic index stream for one process (see the module docstring).

    Args:
        dataset_len: N, the number of items of the dataset (> 0).
        batch_size: B, samples per process per micro-step.
        seed: seeds the per-epoch permutations.
        num_replicas: W, number of processes.
        rank: this process, 0 <= rank < W.
        start_micro_step: first micro-step to yield (resume point).
        shuffle: False gives ``perm_epoch = arange(N)`` (ordered, still epoch-offset indices).

    Yields ints ``>= 0`` (dataset indices before ``% N``), B per micro-step, forever.
    """

    def __init__(self, dataset_len: int, batch_size: int, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0, start_micro_step: int = 0, shuffle: bool = True):
        if dataset_len <= 0:
            raise ValueError('the training dataset is empty (0 items); check its folder / meta file')
        if batch_size <= 0:
            raise ValueError(f'batch_size must be >= 1, got {batch_size}')
        if not 0 <= rank < num_replicas:
            raise ValueError(f'rank {rank} outside [0, {num_replicas})')
        self.n = int(dataset_len)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.start_micro_step = int(start_micro_step)
        self.shuffle = shuffle
        self._perm_cache = {}

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perm_cache.get(epoch)
        if perm is None:
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            else:
                perm = np.arange(self.n)
            self._perm_cache = {epoch: perm}  # keep one epoch only
        return perm

    def global_index(self, g: int) -> int:
        """The dataset index at global stream position ``g``."""
        epoch, j = divmod(int(g), self.n)
        return epoch * self.n + int(self._perm(epoch)[j])

    def micro_step_indices(self, k: int) -> list:
        """The B indices this process gets at micro-step ``k``."""
        base = k * self.batch_size * self.num_replicas + self.rank * self.batch_size
        return [self.global_index(base + b) for b in range(self.batch_size)]

    def __iter__(self) -> Iterator[int]:
        k = self.start_micro_step
        while True:
            yield from self.micro_step_indices(k)
            k += 1

    def __len__(self) -> int:  # DataLoader only needs it for len(loader); the stream is endless
        return 2 ** 62


def _seed_worker(worker_id: int) -> None:
    """Seed python/numpy in a DataLoader worker from torch's per-worker seed (which comes from
    the loader's own generator, so it is reproducible). Datasets should still draw their
    randomness from ``sample_rng(seed, index)``."""
    s = torch.initial_seed() % (2 ** 32)
    np.random.seed(s)
    random.seed(s)


def build_train_loader(dataset, batch_size: int, seed: int = 0, num_workers: int = 0,
                       num_replicas: int = 1, rank: int = 0, start_micro_step: int = 0,
                       pin_memory: bool = False, prefetch_factor: Optional[int] = None,
                       persistent_workers: bool = True, shuffle: bool = True,
                       collate_fn=None) -> DataLoader:
    """An endless DataLoader over ``dataset`` following :class:`InfiniteSampler`.

    The loader gets its own ``torch.Generator`` (seeded from ``seed`` and ``rank``) so creating
    an iterator never consumes the global torch RNG, which training randomness (noise,
    dropout) uses and checkpoints restore. Batches are whatever ``collate_fn`` (default
    collate) makes of B items.
    """
    sampler = InfiniteSampler(len(dataset), batch_size, seed=seed, num_replicas=num_replicas,
                              rank=rank, start_micro_step=start_micro_step, shuffle=shuffle)
    gen = torch.Generator()
    gen.manual_seed((int(seed) * 1000003 + int(rank)) % (2 ** 63))
    kwargs = {}
    if num_workers > 0:
        kwargs['persistent_workers'] = persistent_workers
        if prefetch_factor is not None:
            kwargs['prefetch_factor'] = prefetch_factor
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=False, worker_init_fn=_seed_worker,
                      generator=gen, collate_fn=collate_fn, **kwargs)


def build_eval_loader(dataset, batch_size: int = 1, num_workers: int = 0,
                      pin_memory: bool = False, collate_fn=None) -> DataLoader:
    """A finite, ordered loader over every item once (validation / testing)."""
    gen = torch.Generator()
    gen.manual_seed(0)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=False, worker_init_fn=_seed_worker,
                      generator=gen, collate_fn=collate_fn)
