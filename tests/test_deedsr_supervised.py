"""SupervisedDegradationModel (the labelled ceiling of the DeeDSR stage-1 learner): labels follow
their patches, it trains and resumes in the loop, and exports in the learner format."""
import copy

import pytest
import torch

from dalpsr.archs.deedsr_learner_arch import load_degradation_learner

TINY_NET = {'type': 'DegradationResNet', 'layers': [1, 1, 1, 1], 'widths': [4, 8, 8, 16], 'stem': 4,
            'norm': 'bn', 'bn_splits': 2}


def _opt(root, hr, **train):
    t = dict(total_iter=6, batch_size=4, num_workers=0, checkpoint_freq=3, val_freq=0, print_freq=1,
             optimizer={'type': 'SGD', 'lr': 0.05, 'momentum': 0.9}, scheduler={'type': 'constant', 'warmup_iter': 0},
             max_grad_norm=None, tensorboard=False, progress_bar=False, handle_signals=False)
    t.update(train)
    return {'name': 'sup', 'seed': 3, 'path': {'experiments_root': str(root)}, '_source': 'test',
            '_args': {'resume': 'auto', 'force': False},
            'model': {'type': 'SupervisedDegradationModel', 'network': dict(TINY_NET), 'num_types': 3,
                      'num_intervals': 4},
            'datasets': {'train': {'type': 'DeeDSRDataset', 'dataroot_gt': str(hr), 'gt_size': 64,
                                   'patch_size': 8, 'patch_pairs': 2,
                                   'prompt': {'types': ['blur', 'noise', 'jpeg'], 'num_intervals': 4}}},
            'train': t}


def test_labels_follow_their_patches():
    """A toy where type 0's label is the patch brightness: the classifier learns it only if every
    patch is scored against the labels of its own LR."""
    from dalpsr.models.deedsr_supervised_model import SupervisedDegradationModel
    torch.manual_seed(0)   # the network's init: independent of the tests run before
    m = SupervisedDegradationModel({'model': {'type': 'SupervisedDegradationModel', 'network': dict(TINY_NET),
                                              'num_types': 2, 'num_intervals': 4}, 'seed': 0})
    opt = torch.optim.Adam(m.net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)

    def batch(n=16):
        y = torch.randint(0, 4, (n, 2), generator=g)
        level = (y[:, 0].float() + 0.5) / 4
        patches = level.view(n, 1, 1, 1, 1) + 0.02 * torch.randn(n, 4, 3, 8, 8, generator=g)
        return {'patches': patches, 'labels': y}

    for step in range(200):
        loss = m.training_step(batch(), step)['loss']
        opt.zero_grad()
        loss.backward()
        opt.step()
    b = batch(64)
    x, y = m._patches_and_labels(b)
    m.net.eval()
    with torch.no_grad():
        pred = m.net(x).argmax(-1)
    assert x.shape == (256, 3, 8, 8) and y.shape == (256, 2)
    assert (pred[:, 0] == y[:, 0]).float().mean() > 0.9           # brightness -> label 0 learned
    assert (pred[:, 1] == y[:, 1]).float().mean() < 0.5           # label 1 is noise: not learnable
    with pytest.raises(ValueError, match='labels'):
        m._patches_and_labels({'patches': b['patches'], 'labels': b['labels'][:, :1]})


def test_supervised_learner_trains_resumes_and_exports(tmp_path, hr_folder):
    from dalpsr.train import train
    from dalpsr.utils.options import OptionError
    full = train(copy.deepcopy(_opt(tmp_path / 'a', hr_folder)))
    train(copy.deepcopy(_opt(tmp_path / 'b', hr_folder, stop_after_iter=4)))
    resumed = train(copy.deepcopy(_opt(tmp_path / 'b', hr_folder)))
    assert resumed['losses'] == full['losses'][4:]
    a, b = full['model'].net.state_dict(), resumed['model'].net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    net = load_degradation_learner(full['exp_dir'])
    assert not any('heads' in k for k in net.state_dict())
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(net(x), full['model'].net.encoder.eval()(x), atol=1e-6)
    bad = _opt(tmp_path / 'c', hr_folder)
    bad['model']['num_intervals'] = 1
    with pytest.raises(OptionError, match='num_intervals'):
        train(bad)
