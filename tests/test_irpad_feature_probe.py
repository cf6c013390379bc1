"""scripts/irpad_feature_probe.py: the probe fits what it is given, and refuses other labels."""
import json

import numpy as np

from tests.script_loader import load_script


def test_probe_fits_its_training_cache_and_reports_per_photo(tmp_path, capsys):
    from dalpsr.data.lr_cache import build_lr_cache, load_lr_cache
    probe = load_script('irpad_feature_probe')
    a = build_lr_cache(str(tmp_path / 'a.npz'), 'sample:val', num_samples=48, gt_size=64, seed=1, progress=False)
    out = str(tmp_path / 'probe.json')
    # evaluated on its own training samples, the probe must (nearly) memorise the labels
    assert probe.main(['--eval', a, '--train', a, '--num-train', '48', '--num-eval', '48', '--epochs', '150',
                       '--json', out]) == 0
    res = json.load(open(out))['train'][a]
    keys = load_lr_cache(a)['keys']
    photos = np.array([str(k).rsplit('_', 1)[0] for k in keys])
    for t in ('blur', 'noise', 'jpeg'):
        assert res['acc'][t] >= 0.9, (t, res['acc'][t])
        weighted = sum(acc * (photos == s).sum() for s, acc in res['per_photo'][t].items()) / len(photos)
        assert abs(weighted - res['acc'][t]) < 1e-9
    assert 'noise' in capsys.readouterr().out
    other = build_lr_cache(str(tmp_path / 'k3.npz'), 'sample:val', num_samples=4, gt_size=32, seed=0,
                           prompt={'num_intervals': 3}, progress=False)
    assert probe.main(['--eval', a, '--train', other]) == 2
    assert 'another prompt spec' in capsys.readouterr().err
    assert probe.main(['--eval', str(tmp_path / 'none.npz'), '--train', a]) == 2
    junk = tmp_path / 'junk.npz'
    junk.write_bytes(b'PK\x03\x04 truncated')
    assert probe.main(['--eval', a, '--train', str(junk)]) == 2
    assert 'junk.npz: not an LR cache' in capsys.readouterr().err


def test_probe_v2_features_and_crop_scoring(tmp_path):
    import torch
    from dalpsr.archs.degradation_stats import num_features
    from dalpsr.data.lr_cache import build_lr_cache, load_lr_cache
    probe = load_script('irpad_feature_probe')
    a = build_lr_cache(str(tmp_path / 'a.npz'), 'sample:val', num_samples=6, gt_size=128, seed=1, progress=False)
    lq = load_lr_cache(a)['lq']                       # 32 x 32 LRs
    whole = probe.statistics(lq, features='v2')
    crops = probe.statistics(lq, features='v2', crop=16)
    assert whole.shape == (6, num_features('v2')) and crops.shape == (6, 4, num_features('v2'))
    from dalpsr.archs.degradation_stats import degradation_statistics
    x = torch.from_numpy(lq[:, 16:32, 0:16]).permute(0, 3, 1, 2).float() / 255.0
    assert torch.allclose(crops[:, 2], degradation_statistics(x, 'v2'))   # crop (y 16, x 0)
    out = str(tmp_path / 'p.json')
    assert probe.main(['--eval', a, '--train', a, '--features', 'v2', '--crop', '16', '--epochs', '5',
                       '--json', out]) == 0
    res = json.load(open(out))
    assert res['features'] == 'v2' and res['crop'] == 16 and set(res['train'][a]['acc']) == {'blur', 'noise', 'jpeg'}
