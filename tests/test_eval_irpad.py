"""scripts/eval_irpad.py: numbers agree with the predictor on the cache, outputs, refusals."""
import json
import os

import numpy as np
import pytest
import torch

from tests.script_loader import load_script


def test_eval_irpad_metrics_outputs_and_refusals(tmp_path, capsys):
    from dalpsr.archs.irpad_arch import IRPAD
    from dalpsr.data.lr_cache import build_lr_cache, load_lr_cache
    from dalpsr.data.prompt_labels import PromptSpec
    from dalpsr.models.irpad_model import IRPADPredictor, save_irpad
    spec = PromptSpec()
    torch.manual_seed(0)
    net = IRPAD(3, 4, spec.candidates(), image_encoder={'type': 'conv', 'channels': [8, 16]}, embed_dim=16,
                num_heads=2)
    model_dir = str(tmp_path / 'irpad_x' / 'export')
    save_irpad(net, spec.to_opt(), model_dir)
    data = str(tmp_path / 'held.npz')
    out = str(tmp_path / 'out')
    eval_irpad = load_script('eval_irpad')
    # builds the held-out cache on first use (val photos, given seed), then evaluates
    rc = eval_irpad.main(['--model', model_dir, '--data', data, '--num', '12', '--gt-size', '64', '--seed', '2',
                          '--out', out, '--batch-size', '5'])
    assert rc == 0 and os.path.isfile(data)
    res = json.load(open(os.path.join(out, 'metrics.json')))
    for t in ('blur', 'noise', 'jpeg'):
        assert os.path.getsize(os.path.join(out, f'confusion_{t}.png')) > 1000
    cache = load_lr_cache(data)
    assert cache['meta']['seed'] == 2 and cache['meta']['hr'] == ['retina.jpg', 'ihc.png', 'grace_hopper.jpg']
    lq = torch.from_numpy(cache['lq']).permute(0, 3, 1, 2).float() / 255
    pred = IRPADPredictor.from_pretrained(model_dir).predict_labels(lq).numpy()
    lab = cache['labels']
    for i, t in enumerate(('blur', 'noise', 'jpeg')):
        assert res['metrics'][f'acc/{t}'] == pytest.approx(float((pred[:, i] == lab[:, i]).mean()))
        assert np.array_equal(np.array(res['confusion'][t]).sum(1), np.bincount(lab[:, i], minlength=4))
        assert res['metrics'][f'within1/{t}'] == pytest.approx(float((abs(pred[:, i] - lab[:, i]) <= 1).mean()))
    # accuracy split by another type's interval, checked for one cell
    k = int(lab[0, 2])
    m = lab[:, 2] == k
    assert res['accuracy_by_other_interval']['noise']['jpeg'][k] == pytest.approx(float((pred[m, 1] == lab[m, 1]).mean()))
    assert res['num_samples'] == 12 and res['lr_size'] == [16, 16]
    saved = np.load(os.path.join(out, 'predictions.npz'))
    assert np.array_equal(saved['pred'], pred) and np.array_equal(saved['labels'], lab)
    assert saved['keys'].tolist() == cache['keys'].tolist()
    assert 'acc' in capsys.readouterr().out
    # the error analysis groups those predictions by the recorded params
    ana = load_script('irpad_error_analysis')
    assert ana.main(['--eval', out, '--data', data, '--json', str(tmp_path / 'ana.json')]) == 0
    table = json.load(open(tmp_path / 'ana.json'))
    kinds = [json.loads(str(q))['order2']['noise']['kind'] for q in cache['params']]
    for kind, row in table['last noise kind'].items():
        m = np.array(kinds) == kind
        assert row['n'] == int(m.sum())
        assert row['acc/noise'] == pytest.approx(float((pred[m, 1] == lab[m, 1]).mean()))
        assert row['bias/noise'] == pytest.approx(float((pred[m, 1] - lab[m, 1]).mean()))
    assert sum(r['n'] for r in table['photo'].values()) == 12
    assert ana.main(['--eval', str(tmp_path), '--data', data]) == 2
    capsys.readouterr()
    # an existing result is refused, then archived with --overwrite
    assert eval_irpad.main(['--model', model_dir, '--data', data, '--out', out]) == 2
    assert 'exists' in capsys.readouterr().err
    assert eval_irpad.main(['--model', model_dir, '--data', data, '--out', out, '--overwrite']) == 0
    assert len([d for d in os.listdir(tmp_path) if d.startswith('out')]) == 2
    # --crop / --tta reach the predictor and are recorded with the result
    res = json.load(open(os.path.join(out, 'metrics.json')))
    assert res['predictor'] == {'crop': 0, 'tta': False, 'stats_only': False}
    assert eval_irpad.main(['--model', model_dir, '--data', data, '--out', str(tmp_path / 'tta'),
                            '--crop', '8', '--tta']) == 0
    assert json.load(open(tmp_path / 'tta' / 'metrics.json'))['predictor'] == {'crop': 8, 'tta': True, 'stats_only': False}
    # a cache labelled with another spec is refused with one line
    other = str(tmp_path / 'k3.npz')
    build_lr_cache(other, 'sample:val', num_samples=2, gt_size=32, seed=0, prompt={'num_intervals': 3},
                   progress=False)
    assert eval_irpad.main(['--model', model_dir, '--data', other, '--out', str(tmp_path / 'o3')]) == 2
    assert '3 intervals' in capsys.readouterr().err
    measured = str(tmp_path / 'measured.npz')
    build_lr_cache(measured, 'sample:val', num_samples=2, gt_size=32, seed=0, prompt={'noise_severity': 'measured'},
                   progress=False)
    assert eval_irpad.main(['--model', model_dir, '--data', measured, '--out', str(tmp_path / 'om')]) == 2
    assert 'noise severity: measured' in capsys.readouterr().err
    assert eval_irpad.main(['--model', str(tmp_path / 'none'), '--data', data]) == 2
    assert 'irpad.json not found' in capsys.readouterr().err
