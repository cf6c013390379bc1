"""DeeDSR stage 1: the degradation learner arch, the DeeDSR dataset and MoCoDegradationModel in
the training loop (exact resume of key encoder and queue)."""
import copy
import json

import numpy as np
import pytest
import torch

from dalpsr.archs.deedsr_learner_arch import (DegradationResNet, SplitBatchNorm2d, count_parameters,
                                              load_degradation_learner)

TINY_NET = {'type': 'DegradationResNet', 'layers': [1, 1, 1, 1], 'widths': [4, 8, 8, 16], 'stem': 4,
            'norm': 'bn', 'bn_splits': 2}


def test_full_learner_size_and_output_on_meta():
    """The code's learner: BasicBlock [3, 4, 6, 3], widths 128..1024 -> d [B, 1024], 85.0 M parameters."""
    with torch.device('meta'):
        net = DegradationResNet()
        d = net(torch.empty(2, 3, 128, 128))
    assert d.shape == (2, 1024)
    n = count_parameters(net)
    assert abs(n - 85.01e6) / 85.01e6 < 0.002, n
    assert [len(s) for s in net.layers] == [3, 4, 6, 3]


def test_split_batchnorm_is_per_group_bn_and_plain_bn_in_eval():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    sbn = SplitBatchNorm2d(3, splits=2)
    ref = torch.nn.BatchNorm2d(3)
    out = sbn(x)
    expect = torch.empty_like(x)
    for j in range(2):  # group j = samples j, j + 2, ...
        expect[j::2] = torch.nn.functional.batch_norm(x[j::2], None, None, training=True)
    assert torch.allclose(out, expect, atol=1e-5)
    assert not torch.allclose(out, ref(x), atol=1e-3)  # statistics of the whole batch differ
    # running stats: mean over the groups' updates
    rm = 0.1 * torch.stack([x[0::2].mean((0, 2, 3)), x[1::2].mean((0, 2, 3))]).mean(0)
    assert torch.allclose(sbn.running_mean, rm, atol=1e-5)
    ref.load_state_dict(sbn.state_dict())
    sbn.eval(), ref.eval()
    assert torch.allclose(sbn(x), ref(x))


def test_dataset_no_degradation_and_patches(hr_folder):
    from dalpsr.data.deedsr_dataset import DeeDSRDataset, bicubic_down
    kw = dict(dataroot_gt=str(hr_folder), gt_size=64, patch_size=8, patch_pairs=3, seed=5,
              prompt={'types': ['blur', 'noise', 'jpeg'], 'num_intervals': 4})
    always = DeeDSRDataset(no_degradation_prob=1.0, **kw)
    it = always[2]
    assert it['degraded'] is False and json.loads(it['params'])['no_degradation'] is True
    expect = bicubic_down(it['gt'].numpy().transpose(1, 2, 0), 4).transpose(2, 0, 1)
    assert np.allclose(it['lq'].numpy(), expect)
    assert it['labels'].tolist() == [0, 0, 0]
    assert it['patches'].shape == (6, 3, 8, 8)
    # each patch is a crop of the LR; the two patches of a pair are at different places
    lq = it['lq']
    for p in it['patches']:
        hits = [(t, l) for t in range(9) for l in range(9) if torch.equal(lq[:, t:t + 8, l:l + 8], p)]
        assert hits
    assert not torch.equal(it['patches'][0], it['patches'][1])
    never = DeeDSRDataset(no_degradation_prob=0.0, **kw)
    it2 = never[2]
    assert it2['degraded'] is True and torch.equal(it2['gt'], it['gt'])  # same crop, other LR
    assert not torch.allclose(it2['lq'], it['lq'])
    assert torch.equal(never[2]['patches'], it2['patches'])  # deterministic per index
    some = DeeDSRDataset(no_degradation_prob=0.3, **kw)
    flags = [some[i]['degraded'] for i in range(30)]
    assert 2 <= flags.count(False) <= 18
    with pytest.raises(ValueError, match='no_degradation_prob'):
        DeeDSRDataset(no_degradation_prob=1.5, **kw)
    with pytest.raises(ValueError, match='larger than the LR crop'):
        DeeDSRDataset(**dict(kw, patch_size=32))


def test_dataset_same_degradation_positives(hr_folder):
    """positives=same_degradation: the query patches are crops of the item's LR, the key patches
    crops of another photo degraded with the same parameters (another noise seed); same_lr keeps
    the paper's pairs and its random draws."""
    from dalpsr.data.deedsr_dataset import DeeDSRDataset
    kw = dict(dataroot_gt=str(hr_folder), gt_size=64, patch_size=8, patch_pairs=2, seed=5,
              prompt={'types': ['blur', 'noise', 'jpeg'], 'num_intervals': 4})
    paper = DeeDSRDataset(**kw)
    ds = DeeDSRDataset(positives='same_degradation', **kw)

    def crops_of(img, patch):
        return any(torch.equal(img[:, t:t + 8, l:l + 8], patch) for t in range(9) for l in range(9))

    for i in range(3):
        a, b = paper[i], ds[i]
        assert torch.equal(a['lq'], b['lq']) and a['params'] == b['params']
        assert torch.equal(a['patches'][0], b['patches'][0])  # same query draw as the paper's pairs
        q, k = b['patches'][0::2], b['patches'][1::2]
        assert all(crops_of(b['lq'], p) for p in q)
        assert not any(crops_of(b['lq'], p) for p in k)
        assert torch.equal(ds[i]['patches'], b['patches'])  # deterministic per index
    # the key LR is the item's degradation replayed on another photo's crop
    params = json.loads(ds[1]['params'])
    key_lq = ds._same_degradation_lq(1, params)
    assert key_lq.shape == ds[1]['lq'].shape and not torch.allclose(key_lq, ds[1]['lq'])
    assert all(crops_of(key_lq, p) for p in ds[1]['patches'][1::2])
    def with_noise(sigma):
        n = {'kind': 'gaussian', 'sigma': sigma, 'gray': False}
        return dict(params, order1=dict(params['order1'], noise=n), order2=dict(params['order2'], noise=n))

    noisy, clean = ds._same_degradation_lq(1, with_noise(30.0)), ds._same_degradation_lq(1, with_noise(0.0))
    assert (noisy - clean).abs().mean() > 0.02  # same photo and crop: the replay follows the parameters
    assert torch.equal(ds._same_degradation_lq(1, with_noise(0.0)), clean)
    with pytest.raises(ValueError, match='positives'):
        DeeDSRDataset(positives='same_photo', **kw)



def test_dataset_disjoint_positives(hr_folder):
    """positives=same_lr_disjoint: query and key are crops of the item's LR that share no pixel,
    at positions that vary; the LR is the paper's; too small an LR is refused."""
    from dalpsr.data.deedsr_dataset import DeeDSRDataset, two_patches
    kw = dict(dataroot_gt=str(hr_folder), gt_size=64, patch_size=8, patch_pairs=3, seed=5,
              prompt={'types': ['blur', 'noise', 'jpeg'], 'num_intervals': 4})
    paper, ds = DeeDSRDataset(**kw), DeeDSRDataset(positives='same_lr_disjoint', **kw)

    def where(img, patch):
        return [(t, l) for t in range(img.shape[1] - 7) for l in range(img.shape[2] - 7)
                if torch.equal(img[:, t:t + 8, l:l + 8], patch)]

    overlaps, seen = [], set()
    for i in range(4):
        b = ds[i]
        assert torch.equal(b['lq'], paper[i]['lq'])
        assert torch.equal(ds[i]['patches'], b['patches'])  # deterministic per index
        for q, k in zip(b['patches'][0::2], b['patches'][1::2]):
            (tq, lq_), (tk, lk) = where(b['lq'], q)[0], where(b['lq'], k)[0]
            assert abs(tq - tk) >= 8 or abs(lq_ - lk) >= 8  # no shared pixel
            seen.add((tq, lq_))
        for q, k in zip(paper[i]['patches'][0::2], paper[i]['patches'][1::2]):
            (tq, lq_), (tk, lk) = where(paper[i]['lq'], q)[0], where(paper[i]['lq'], k)[0]
            overlaps.append(max(0, 8 - abs(tq - tk)) * max(0, 8 - abs(lq_ - lk)))
    assert len(seen) > 6 and max(overlaps) > 0  # the paper's pairs do overlap; these vary in place
    rng = np.random.default_rng(0)
    wide = torch.rand(3, 8, 20)                             # room only along the width
    for _ in range(20):
        a, b = two_patches(wide, 8, rng, disjoint=True)
        la, lb = where(wide, a)[0][1], where(wide, b)[0][1]
        assert abs(la - lb) >= 8
    with pytest.raises(ValueError, match='at least 16'):
        two_patches(torch.rand(3, 12, 12), 8, rng, disjoint=True)
    with pytest.raises(ValueError, match='side by side'):
        DeeDSRDataset(positives='same_lr_disjoint', **dict(kw, patch_size=10))


def _opt(root, hr, **train):
    t = dict(total_iter=6, batch_size=4, num_workers=0, checkpoint_freq=3, val_freq=0, print_freq=1,
             optimizer={'type': 'SGD', 'lr': 0.05, 'momentum': 0.9, 'weight_decay': 1e-4},
             scheduler={'type': 'constant', 'warmup_iter': 0}, max_grad_norm=None, tensorboard=False,
             progress_bar=False, handle_signals=False)
    t.update(train)
    return {'name': 's1', 'seed': 3, 'path': {'experiments_root': str(root)}, '_source': 'test',
            '_args': {'resume': 'auto', 'force': False},
            'model': {'type': 'MoCoDegradationModel', 'network': dict(TINY_NET), 'head_dim': 8, 'queue_size': 20,
                      'momentum': 0.9, 'temperature': 0.07, 'shuffle_bn': True},
            'datasets': {'train': {'type': 'DeeDSRDataset', 'dataroot_gt': str(hr), 'gt_size': 64,
                                   'patch_size': 8, 'patch_pairs': 2, 'no_degradation_prob': 0.1,
                                   'prompt': {'types': ['blur', 'noise', 'jpeg'], 'num_intervals': 4}}},
            'train': t}


def _state(res):
    m = res['model']
    q = {k: v.clone() for k, v in m.unwrap(m.encoder_q).state_dict().items()}
    s = {k: v.clone() for k, v in m.moco.state_dict().items()}
    return q, s


def test_moco_trains_and_resumes_exactly(tmp_path, hr_folder):
    from dalpsr.train import train
    full = train(copy.deepcopy(_opt(tmp_path / 'a', hr_folder)))
    part = train(copy.deepcopy(_opt(tmp_path / 'b', hr_folder, stop_after_iter=4)))
    assert part['step'] == 4
    resumed = train(copy.deepcopy(_opt(tmp_path / 'b', hr_folder)))
    assert resumed['step'] == 6 and len(resumed['losses']) == 2
    assert resumed['losses'] == full['losses'][4:]
    qa, sa = _state(full)
    qb, sb = _state(resumed)
    for k in qa:
        assert torch.equal(qa[k], qb[k]), k
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    m = full['model']
    # 6 steps x 4 LRs x 2 pairs = 48 keys through a queue of 20: the pointer wrapped to 48 % 20
    assert int(m.moco.queue_ptr) == 48 % 20
    assert torch.allclose(m.moco.queue.norm(dim=0), torch.ones(20), atol=1e-5)
    # the key encoder is a momentum average: close to, but not equal to, the query encoder
    kq = dict(m.unwrap(m.encoder_q).named_parameters())
    kk = dict(m.moco.encoder_k.named_parameters())
    w = 'encoder.conv1.weight'
    assert not torch.equal(kq[w], kk[w])
    assert not any(p.requires_grad for p in m.moco.encoder_k.parameters())
    # export: the encoder alone (no head), loadable as a frozen plain-BN network
    net = load_degradation_learner(full['exp_dir'])
    assert not any('head' in k for k in net.state_dict())
    assert net.config['bn_splits'] == 1 and not net.training
    x = torch.rand(2, 3, 16, 16)
    ref = m.unwrap(m.encoder_q).encoder.eval()
    assert torch.allclose(net(x), ref(x), atol=1e-6)


def test_momentum_update_once_per_optimizer_step(tmp_path, hr_folder):
    """With gradient accumulation the key encoder moves once per step, not per micro-batch."""
    from dalpsr.train import train
    res = train(copy.deepcopy(_opt(tmp_path, hr_folder, total_iter=2, grad_accum=2, checkpoint_freq=0)))
    m = res['model']
    assert m.moco.micro_step.tolist() == [1, 2]
    # one more update by hand reproduces theta_k <- m theta_k + (1 - m) theta_q exactly
    before = {k: v.clone() for k, v in m.moco.encoder_k.named_parameters()}
    m._momentum_update()
    q = dict(m.unwrap(m.encoder_q).named_parameters())
    for k, v in m.moco.encoder_k.named_parameters():
        assert torch.allclose(v, 0.9 * before[k] + 0.1 * q[k].detach(), atol=1e-7)


def test_single_process_shuffle_unshuffles_keys():
    """In-batch Shuffle-BN returns each key in its own row: with GroupNorm (no batch statistics)
    shuffled and plain keys are equal; with split-batch BN they differ (other BN groups)."""
    from dalpsr.models.deedsr_moco_model import MoCoDegradationModel
    opt = {'seed': 1, 'model': {'type': 'MoCoDegradationModel', 'network': dict(TINY_NET, norm='gn'),
                                'head_dim': 8, 'queue_size': 16}}
    m = MoCoDegradationModel(opt)
    x = torch.rand(8, 3, 8, 8)
    plain = torch.nn.functional.normalize(m.moco.encoder_k(x), dim=1)
    assert torch.allclose(m._keys(x, 0, 0), plain, atol=1e-6)
    opt['model']['network'] = dict(TINY_NET, bn_splits=2)
    m = MoCoDegradationModel(opt)
    m.moco.encoder_k.train()
    plain = torch.nn.functional.normalize(m.moco.encoder_k(x), dim=1)
    assert not torch.allclose(m._keys(x, 0, 0), plain, atol=1e-4)


def _shuffle_worker(rank, port, out_dir):
    import torch.distributed as dist

    from dalpsr.models.deedsr_moco_model import MoCoDegradationModel
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # identical key encoders on both ranks
        m = MoCoDegradationModel({'seed': 1, 'model': {'type': 'MoCoDegradationModel',
                                                       'network': dict(TINY_NET, bn_splits=1),
                                                       'head_dim': 8, 'queue_size': 16}})
        m.world = 2
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.rand(4, 3, 8, 8, generator=g)
        k = m._keys(x, 3, 1)
        m._enqueue(k)
        torch.save({'x': x, 'k': k, 'queue': m.moco.queue.clone(), 'ptr': int(m.moco.queue_ptr),
                    'state': m.moco.encoder_k.state_dict()}, f'{out_dir}/rank{rank}.pth')
    finally:
        dist.destroy_process_group()


def test_shuffle_bn_across_processes(tmp_path):
    """Two gloo processes: each key is computed with the BatchNorm statistics of a *shuffled*
    slice of the global batch (permutation shared by the ranks), returned to its own row, and the
    queue receives the keys of both ranks in rank order."""
    import socket

    import torch.multiprocessing as mp

    from dalpsr.models.deedsr_moco_model import MoCoDegradationModel
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(_shuffle_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f'rank{k}.pth') for k in (0, 1)]
    torch.manual_seed(0)
    m = MoCoDegradationModel({'seed': 1, 'model': {'type': 'MoCoDegradationModel', 'network': dict(TINY_NET, bn_splits=1),
                                                   'head_dim': 8, 'queue_size': 16}})
    enc = m.moco.encoder_k.train()
    allx = torch.cat([r[0]['x'], r[1]['x']])
    perm = m._perm(8, 3, 1)
    with torch.no_grad():
        shuffled = torch.cat([enc(allx[perm[:4]]), enc(allx[perm[4:]])])    # each "GPU" its own BN batch
        expect = torch.nn.functional.normalize(shuffled[torch.argsort(perm)], dim=1)
        plain = torch.nn.functional.normalize(torch.cat([enc(allx[:4]), enc(allx[4:])]), dim=1)
    got = torch.cat([r[0]['k'], r[1]['k']])
    assert torch.allclose(got, expect, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)                       # the shuffle changed the statistics
    assert not torch.equal(perm, torch.arange(8))
    for k in (0, 1):
        assert r[k]['ptr'] == 8
        assert torch.allclose(r[k]['queue'][:, :8].T, got, atol=1e-6)      # both ranks enqueue all 8 keys


def test_small_patch_stem_and_highpass_input(tmp_path):
    """CPU-recipe options: stride-1 stem without max-pool keeps a 32^2 patch at full size into the
    first stage; highpass input ignores colour and constant offsets; both saved with the learner."""
    from dalpsr.archs.deedsr_learner_arch import save_degradation_learner
    torch.manual_seed(0)
    kw = dict(layers=[1, 1], widths=[8, 16], stem=4, norm='gn')
    code = DegradationResNet(**kw)
    small = DegradationResNet(stem_stride=1, stem_pool=False, highpass=8.0, **kw).eval()
    x = torch.rand(2, 3, 32, 32)
    assert code.forward_features(x)[0].shape == (2, 4 * 4, 16)       # 32 -> 16 (stem) -> 8 (pool) -> 8 -> 4
    assert small.forward_features(x)[0].shape == (2, 16 * 16, 16)    # 32 -> 32 (stem) -> 32 -> 16
    with torch.no_grad():
        shifted = (x + torch.tensor([0.2, -0.1, 0.05])[None, :, None, None])
        assert torch.allclose(small(x), small(shifted), atol=1e-4)     # a colour cast is not seen
        assert not torch.allclose(code.eval()(x), code(shifted), atol=1e-3)
    save_degradation_learner(tmp_path, small)
    back = load_degradation_learner(tmp_path)
    assert back.config['stem_stride'] == 1 and back.config['highpass'] == 8.0
    with torch.no_grad():
        assert torch.allclose(back(x), small(x), atol=1e-6)
    with pytest.raises(ValueError, match='stem_stride must be 1 or 2'):
        DegradationResNet(stem_stride=3, **kw)
