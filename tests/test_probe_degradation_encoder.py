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
    assert r['noise_label'] == 'params'
    for t in ('blur', 'noise', 'jpeg'):
        d = r['trained_minus_random'][t]
        assert abs(d['diff'] - (r['trained'][t] - r['random'][t])) < 1e-3 and d['lo'] <= d['diff'] <= d['hi']
    assert (tmp_path / 'pca.png').stat().st_size > 1000 and (tmp_path / 'c.npz').is_file()
    # the cached sets give the same numbers
    assert probe.main(args) == 0
    r2 = json.loads((tmp_path / 'r.json').read_text())
    assert r2['trained'] == r['trained'] and r2['random'] == r['random']
    assert probe.main(['--learner', str(tmp_path / 'none')] + args[2:]) == 2
    bad = list(args)
    bad[bad.index('--fit-hr') + 1] = str(tmp_path / 'no_photos')
    bad[bad.index('--cache') + 1] = str(tmp_path / 'other.npz')
    assert probe.main(bad) == 2 and not (tmp_path / 'other.npz').exists()


def test_paired_bootstrap_interval():
    probe = load_script('probe_degradation_encoder')
    n = 400
    right, wrong = torch.ones(n, 3, dtype=torch.bool), torch.zeros(n, 3, dtype=torch.bool)
    assert probe.paired_bootstrap(right, wrong)['blur'] == {'diff': 1.0, 'lo': 1.0, 'hi': 1.0}
    g = torch.Generator().manual_seed(0)
    a = torch.rand(n, 3, generator=g) < 0.6
    same = probe.paired_bootstrap(a, a)
    assert all(v == {'diff': 0.0, 'lo': 0.0, 'hi': 0.0} for v in same.values())
    # a better on one type by 0.1 (b = a with 40 right answers turned wrong): interval above 0
    b = a.clone()
    b[torch.nonzero(a[:, 0])[:40, 0], 0] = False
    r = probe.paired_bootstrap(a, b)
    assert r['blur']['diff'] == 0.1 and 0 < r['blur']['lo'] < 0.1 < r['blur']['hi']
    # independent coin flips of the same rate: the interval holds 0
    c = torch.rand(n, 3, generator=g) < 0.6
    r = probe.paired_bootstrap(a, c)
    assert all(v['lo'] < v['diff'] < v['hi'] and v['hi'] - v['lo'] > 0.05 for v in r.values())


def test_probe_measured_noise_labels_follow_the_lr_noise(tmp_path):
    """--noise-label measured labels noise by the noise left in each LR (another cache key)."""
    from dalpsr.archs.deedsr_learner_arch import DegradationResNet, save_degradation_learner
    torch.manual_seed(0)
    save_degradation_learner(tmp_path / 'learner', DegradationResNet([1, 1, 1, 1], [4, 8, 8, 16], stem=4))
    probe = load_script('probe_degradation_encoder')
    opt = str(REPO / 'options/train/train_deedsr_stage1_tiny.yml')
    import yaml
    block = yaml.safe_load(open(opt))['datasets']['train']
    lqs, y_meas, _ = probe.build_set(block, 'sample:train', 16, 5, noise_label='measured')
    lqs2, y_par, _ = probe.build_set(block, 'sample:train', 16, 5, noise_label='params')
    assert all(torch.equal(a, b) for a, b in zip(lqs, lqs2))            # same LRs
    assert torch.equal(y_meas[:, [0, 2]], y_par[:, [0, 2]])               # blur and JPEG labels unchanged
    # the measured noise interval rises with the high-frequency energy left in the LR
    hf = torch.stack([(x - torch.nn.functional.avg_pool2d(x[None], 3, 1, 1)[0]).abs().mean() for x in lqs])
    lo, hi = hf[y_meas[:, 1] == y_meas[:, 1].min()].mean(), hf[y_meas[:, 1] == y_meas[:, 1].max()].mean()
    assert y_meas[:, 1].max() > y_meas[:, 1].min() and hi > lo
    args = ['--learner', str(tmp_path / 'learner'), '--opt', opt, '--fit-hr', 'sample:train', '--eval-hr',
            'sample:val', '--num-fit', '16', '--num-eval', '8', '--l2', '0.1', '--cache', str(tmp_path / 'c.npz'),
            '--out', str(tmp_path / 'r.json')]
    assert probe.main(args) == 0
    assert probe.main(args + ['--noise-label', 'measured']) == 0
    r = json.loads((tmp_path / 'r.json').read_text())
    assert r['noise_label'] == 'measured'
    import numpy as np
    assert json.loads(str(np.load(tmp_path / 'c.npz')['key']))['noise_label'] == 'measured'
