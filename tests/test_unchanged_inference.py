"""Behaviour unchanged: tiny-model SR outputs equal those recorded before the inference refactor.

The reference values in tests/data/unchanged_inference/ were written by tests/unchanged_reference.py
run against commit 3297236 (see its docstring). Both the sampler cases (every start mode, every
offered scheduler family, CFG on/off, latent + VAE tiling, image condition, a 2-chunk prompt, a
batch of 2) and the demo (scripts/demo_sr.py --tiny through dalpsr/test.py) must be bit-identical.

One deliberate change since (issue 13.5): the LR-embedded start is now noised to the level of the
first timestep run; ``start_noise: start_step`` keeps the earlier level (t = start_step), and with
it the outputs must still be bit-identical (tests/test_start_noise.py covers the new default).
The demo's stand-in is built in the layout of that time (``--tiny-layout sd``; the default
``fast`` layout is another random model, dalpsr/inference/tiny.py).

Bit-identical holds on the CPU that recorded them, not across CPUs: float32 kernels round
differently on another processor (measured 2026-12-02 on a new CI machine, same pinned packages:
the sampler cases differ by at most 7.4e-6, 3 of the demo's 49,152 pixels by one 8-bit level).
So the comparison allows 1e-4 on the float cases and one level on at most 0.1 % of the demo
pixels; a behavioural change is far above that (the start-noise change of issue 13.5 moves the
LR-start cases by 0.067 to 0.23).
"""
import json
from pathlib import Path

import numpy as np
import pytest

from tests import unchanged_reference as ref

DATA = Path(__file__).parent / 'data' / 'unchanged_inference'


@pytest.fixture(scope='module')
def summary():
    return json.loads((DATA / 'summary.json').read_text())


FLOAT_ATOL = 1e-4        # float32 outputs in [0, 1] (module doc)
UINT8_MAX_FRACTION = 1e-3  # share of 8-bit pixels allowed to differ, by one level at most


def _same(name, got, want):
    assert got.shape == want.shape, f'{name}: shape {got.shape} != recorded {want.shape}'
    d = np.abs(got.astype(np.float64) - want.astype(np.float64))
    if want.dtype == np.uint8:
        assert d.max() <= 1 and (d > 0).mean() <= UINT8_MAX_FRACTION, \
            f'{name}: max difference {d.max()} levels on {(d > 0).mean():.2%} of the pixels from the recorded output'
    else:
        assert d.max() <= FLOAT_ATOL, f'{name}: max abs difference {d.max()} from the recorded output'


def test_sampler_cases_equal_to_recorded(summary):
    from dalpsr.pipelines import DaLPSRSampler
    want = np.load(DATA / 'cases.npz')
    def make(comps, cn):
        sampler = DaLPSRSampler(comps, cn, device='cpu')
        return lambda lq, **kw: sampler(lq, start_noise='start_step', **kw)
    got = ref.run_cases(make)
    assert sorted(got) == sorted(want.files) == sorted(summary['cases'])
    for name in want.files:
        _same(name, got[name], want[name])


def test_demo_images_equal_to_recorded(tmp_path, summary):
    want = np.load(DATA / 'demo.npz')
    got = ref.run_demo(tmp_path, {'start_noise': 'start_step'}, ['--tiny-layout', 'sd'])
    assert sorted(got) == sorted(want.files) and len(got) == 2
    for name in want.files:
        _same(name, got[name], want[name])
