"""scripts/probe_degradation_encoder.py on a tiny learner export and the shipped photos: the
probe's numbers, the cache and the figure."""
import json

import torch

from tests.script_loader import load_script

REPO = __import__('pathlib').Path(__file__).resolve().parent.parent


def test_probe_script_scores_both_encoders_and_reuses_its_cache(tmp_path):
    from dalpsr.archs.deedsr_learner_arch import DegradationResNet, save_degradation_learner
    torch.manual_seed(0)
    save_degradation_learner(tmp_path / 'learner', DegradationResNet([1, 1, 1, 1], [4, 8, 8, 16], stem=4))
    probe = load_script('probe_degradation_encoder')
    args = ['--learner', str(tmp_path / 'learner'), '--opt', str(REPO / 'options/train/train_deedsr_stage1_tiny.yml'),
            '--fit-hr', 'sample:train', '--eval-hr', 'sample:val', '--num-fit', '24', '--num-eval', '12',
            '--l2', '0.01,1', '--cache', str(tmp_path / 'c.npz'), '--out', str(tmp_path / 'r.json'),
            '--fig', str(tmp_path / 'pca.png')]
    assert probe.main(args) == 0
    r = json.loads((tmp_path / 'r.json').read_text())
    for name in ('trained', 'random', 'majority'):
        assert set(r[name]) == {'blur', 'noise', 'jpeg'}
        assert all(0 <= v <= 1 and abs(v * 12 - round(v * 12)) < 1e-6 for v in r[name].values())
    assert sum(r['eval_label_counts']['blur']) == 12
    assert set(r['l2_chosen']['trained'].values()) <= {0.01, 1.0}
    assert (tmp_path / 'pca.png').stat().st_size > 1000 and (tmp_path / 'c.npz').is_file()
    # the cached sets give the same numbers
    assert probe.main(args) == 0
    r2 = json.loads((tmp_path / 'r.json').read_text())
    assert r2['trained'] == r['trained'] and r2['random'] == r['random']
    assert probe.main(['--learner', str(tmp_path / 'none')] + args[2:]) == 2
