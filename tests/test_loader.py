"""The deterministic training stream (dalpsr/data/loader.py)."""
import numpy as np
import pytest
import torch

from dalpsr.data.loader import InfiniteSampler, build_train_loader
from tests.toy_plugin import ToyRegression


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_epochs_are_permutations_with_epoch_offsets():
    s = InfiniteSampler(10, batch_size=5, seed=3)
    idx = _take(iter(s), 30)
    for e in range(3):
        chunk = idx[10 * e:10 * (e + 1)]
        assert sorted(i - 10 * e for i in chunk) == list(range(10))
    assert idx[:10] != idx[10:20] and [i % 10 for i in idx[:10]] != [i % 10 for i in idx[10:20]]
    assert _take(iter(InfiniteSampler(10, 5, seed=3)), 30) == idx          # same seed, same stream
    assert _take(iter(InfiniteSampler(10, 5, seed=4)), 30) != idx          # seed matters
    assert _take(iter(InfiniteSampler(10, 5, seed=3, shuffle=False)), 12) == list(range(12))


def test_shards_are_disjoint_and_merge_to_the_single_stream():
    single = InfiniteSampler(7, batch_size=6, seed=1)
    ranks = [InfiniteSampler(7, batch_size=3, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    streams = [_take(iter(s), 3 * 8) for s in ranks]
    merged = [i for k in range(8) for r in (0, 1) for i in streams[r][3 * k:3 * k + 3]]
    assert merged == _take(iter(single), 6 * 8)
    assert not set(streams[0]) & set(streams[1])


def test_resume_position():
    full = _take(iter(InfiniteSampler(9, batch_size=4, seed=2, num_replicas=2, rank=1)), 4 * 10)
    tail = _take(iter(InfiniteSampler(9, batch_size=4, seed=2, num_replicas=2, rank=1, start_micro_step=6)), 16)
    assert tail == full[24:]
    with pytest.raises(ValueError, match='empty'):
        InfiniteSampler(0, 2)


def test_loader_batches_do_not_depend_on_workers_or_global_rng():
    ds = ToyRegression(length=11, seed=5)
    batches = {}
    for w in (0, 2):
        torch.manual_seed(w)  # the global RNG must not matter
        it = iter(build_train_loader(ds, 4, seed=9, num_workers=w, persistent_workers=False))
        batches[w] = [next(it) for _ in range(5)]
    for a, b in zip(batches[0], batches[2]):
        assert torch.equal(a['x'], b['x']) and torch.equal(a['index'], b['index'])
    # creating and using a loader leaves the global torch RNG alone
    torch.manual_seed(0)
    ref = torch.rand(3)
    torch.manual_seed(0)
    it = iter(build_train_loader(ds, 4, seed=9, num_workers=2, persistent_workers=False))
    next(it)
    assert torch.equal(torch.rand(3), ref)
    # the first 11 samples are the 11 items once each
    first = np.concatenate([b['index'].numpy() for b in batches[0]])[:11]
    assert sorted(first.tolist()) == list(range(11))
