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


def _same(name, got, want):
    assert got.shape == want.shape, f'{name}: shape {got.shape} != recorded {want.shape}'
    diff = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
    assert diff == 0.0, f'{name}: max abs difference {diff} from the recorded output'


def test_sampler_cases_bit_identical_to_recorded(summary):
    from dalpsr.pipelines import DaLPSRSampler
    want = np.load(DATA / 'cases.npz')
    def make(comps, cn):
        sampler = DaLPSRSampler(comps, cn, device='cpu')
        return lambda lq, **kw: sampler(lq, start_noise='start_step', **kw)
    got = ref.run_cases(make)
    assert sorted(got) == sorted(want.files) == sorted(summary['cases'])
    for name in want.files:
        _same(name, got[name], want[name])
        assert ref.digest(got[name]) == summary['cases'][name]['sha256']


def test_demo_images_identical_to_recorded(tmp_path, summary):
    want = np.load(DATA / 'demo.npz')
    got = ref.run_demo(tmp_path, {'start_noise': 'start_step'}, ['--tiny-layout', 'sd'])
    assert sorted(got) == sorted(want.files) and len(got) == 2
    for name in want.files:
        _same(name, got[name], want[name])
