"""scripts/irpad_label_ceiling.py: reproduces cached samples exactly and measures the noise that
survives in the LR."""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts'))
import irpad_label_ceiling as ceiling  # noqa: E402


def test_ceiling_accuracy_ranks_against_the_label_histogram():
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    assert ceiling.ceiling_accuracy(np.arange(8.0), labels, 4) == 1.0
    assert ceiling.ceiling_accuracy(-np.arange(8.0), labels, 4) == 0.0
    assert ceiling.spearman(np.arange(8.0), np.arange(8.0) ** 3) == pytest.approx(1.0)


def test_script_reproduces_the_cache_and_rejects_a_foreign_one(tmp_path):
    from dalpsr.data.lr_cache import build_lr_cache
    cache = build_lr_cache(str(tmp_path / 'c.npz'), 'sample:val', num_samples=16, gt_size=128, seed=5,
                           progress=False)
    out = tmp_path / 'ceiling.json'
    assert ceiling.main(['--data', cache, '--hr', 'sample:val', '--num', '16', '--json', str(out)]) == 0
    res = json.loads(out.read_text())['types']['noise']
    assert 0.0 <= res['ceiling_acc'] <= 1.0
    assert res['spearman'] > 0.5        # the noise degree does track the noise left in the LR
    assert res['visible_rms_quantiles'][-1] > res['visible_rms_quantiles'][0] >= 0.0
    # a cache from other photos, or a changed LR, is refused rather than analysed
    assert ceiling.main(['--data', cache, '--hr', 'sample:train', '--num', '4']) == 2
    assert ceiling.main(['--data', cache, '--hr', str(tmp_path / 'no_such_folder'), '--num', '4']) == 2
    z = dict(np.load(cache))
    z['lq'] = z['lq'].copy()
    z['lq'][0] ^= 1
    bad = str(tmp_path / 'bad.npz')
    np.savez(bad, **z)
    assert ceiling.main(['--data', bad, '--hr', 'sample:val', '--num', '2']) == 2
