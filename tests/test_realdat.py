"""RealDAT (DePLSR stage 2): paired data, tiny training through train.py (loss falls), exact resume,
export/load, the unconditioned baseline switch, and the test.py restorer."""
import copy

import numpy as np
import pytest
import torch

from dalpsr.models.realdat_model import load_realdat, psnr_y
from dalpsr.restorers import build_restorer
from dalpsr.restorers.realdat import tile_starts

NET = {'type': 'RealDAT', 'upscale': 2, 'embed_dim': 32, 'depth': [2], 'num_heads': [2], 'split_size': [2, 4],
       'expansion_factor': 2, 'upsampler': 'pixelshuffledirect', 'cond_dim': 16, 'fusion_num_heads': 2}
LITE = {'type': 'SRCLIPLite', 'embed_dim': 16, 'channels': [8, 16], 'text_width': 16, 'text_layers': 1,
        'text_heads': 2, 'context_length': 40}


@pytest.fixture(scope='module')
def srclip_dir(tmp_path_factory):
    """A tiny SRCLIP-CPU export (random weights: conditioning wiring only)."""
    from dalpsr.archs.srclip_arch import SRCLIPLite
    from dalpsr.models.srclip_model import save_srclip
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp('srclip')
    cfg = dict(LITE)
    cfg.pop('type')
    save_srclip(SRCLIPLite(**cfg), str(d))
    return str(d)


def _opt(tmp_path, srclip, conditioning='srclip', **train):
    return {
        'name': 'realdat_tiny', 'seed': 0, 'path': {'experiments_root': str(tmp_path / 'exp')},
        'model': {'type': 'RealDATModel', 'network': dict(NET), 'conditioning': conditioning,
                  'srclip': srclip if conditioning == 'srclip' else None, 'crop_border': 2},
        'datasets': {
            'train': {'type': 'DegradedPairDataset', 'hr': 'sample:train', 'gt_size': 32, 'num_samples': 24,
                      'seed': 1, 'degradation': {'scale': 2}, 'cache_file': str(tmp_path / 'pairs.npz')},
            'val': {'type': 'DegradedPairDataset', 'hr': 'sample:val', 'gt_size': 32, 'num_samples': 4, 'seed': 3,
                    'degradation': {'scale': 2}, 'augment': False, 'batch_size': 4}},
        'train': dict({'total_iter': 30, 'batch_size': 4, 'num_workers': 0, 'progress_bar': False,
                       'optimizer': {'type': 'Adam', 'lr': 2e-3, 'betas': [0.9, 0.99]},
                       'scheduler': {'type': 'multistep', 'milestones': [20], 'gamma': 0.5},
                       'checkpoint_freq': 10, 'val_freq': 30, 'print_freq': 10, 'tensorboard': False}, **train)}


def _run(opt, **args):
    from dalpsr.train import train
    opt = copy.deepcopy(opt)
    opt['_args'] = {'resume': 'auto', 'force': False, **args}
    return train(opt)


def test_paired_dataset_cache_and_augment(tmp_path):
    from dalpsr.data.deplsr_datasets import DegradedPairDataset
    kw = dict(hr='sample:train', gt_size=32, num_samples=6, seed=1, degradation={'scale': 4})
    fly = DegradedPairDataset(**kw, augment=False)
    cached = DegradedPairDataset(**kw, augment=False, cache_file=str(tmp_path / 'p.npz'))
    again = DegradedPairDataset(**kw, augment=False, cache_file=str(tmp_path / 'p.npz'))  # read back
    for i in range(6):
        a, b, c = fly[i], cached[i], again[i]
        assert a['gt'].shape == (3, 32, 32) and a['lq'].shape == (3, 8, 8)
        assert torch.equal(a['lq'], b['lq']) and torch.equal(b['gt'], c['gt'])
    aug = DegradedPairDataset(**kw, augment=True)
    it = aug[2]
    # the same flip/rotation on both: LR and GT stay aligned (bicubic-down GT correlates with LR)
    import torch.nn.functional as F
    down = F.interpolate(it['gt'][None], size=(8, 8), mode='area')[0]
    assert torch.corrcoef(torch.stack([down.flatten(), it['lq'].flatten()]))[0, 1] > 0.5
    with pytest.raises(ValueError, match='other options'):
        DegradedPairDataset(**dict(kw, seed=2), cache_file=str(tmp_path / 'p.npz'))


def test_tiny_realdat_trains_resumes_exactly_and_restores(tmp_path, srclip_dir):
    full = _run(_opt(tmp_path / 'a', srclip_dir))
    losses = full['losses']
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert {'psnr_y', 'psnr_y_bicubic'} <= set(full['val'])
    # exact resume: stopped at step 12, resumed to 30 -> the same weights and losses
    _run(_opt(tmp_path / 'b', srclip_dir, stop_after_iter=12))
    resumed = _run(_opt(tmp_path / 'b', srclip_dir))
    assert resumed['losses'] == losses[12:]
    a = full['model'].unwrap(full['model'].net).state_dict()
    b = resumed['model'].unwrap(resumed['model'].net).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # export: self-contained (the encoder is copied in) and loads back
    net, enc, meta = load_realdat(str(full['export']))
    assert meta['arch'] == 'RealDAT' and enc is not None and (full['export'] / 'srclip' / 'srclip.json').is_file()
    # the encoder copy leaves the text tower out (inference never uses it) and says so
    import os
    assert os.path.getsize(full['export'] / 'srclip' / 'srclip.safetensors') < \
        0.5 * os.path.getsize(os.path.join(srclip_dir, 'srclip.safetensors'))
    with pytest.raises(RuntimeError, match='image encoder only'):
        enc.encode_text(torch.zeros(1, 40, dtype=torch.long))
    lq = torch.rand(2, 3, 11, 17)
    r = build_restorer({'type': 'RealDATRestorer', 'weights': str(full['export']), 'tile': 0})
    sr = r.restore(lq, seeds=[0, 1])
    with torch.no_grad():
        emb = enc.encode_image(lq)
        want = net(lq, emb['content'][:, None], emb['fine']).clamp(0, 1)
    assert sr.shape == (2, 3, 22, 34) and torch.allclose(sr, want, atol=1e-6)
    # pieces: every output pixel covered, close to the whole-image result, same size
    tiled = build_restorer({'type': 'RealDATRestorer', 'weights': str(full['export']), 'tile': 8,
                            'tile_overlap': 2}).restore(lq, seeds=[0, 1])
    assert tiled.shape == sr.shape and (tiled - sr).abs().mean() < 0.05
    assert r.describe()['srclip'] is True


def test_unconditioned_baseline_is_plain_dat(tmp_path, srclip_dir):
    res = _run(_opt(tmp_path, None, conditioning='none', total_iter=4, val_freq=0))
    net = res['model'].unwrap(res['model'].net)
    assert type(net).__name__ == 'DAT' and res['model'].encoder is None
    loaded, enc, meta = load_realdat(str(res['export']))
    assert enc is None and meta['conditioning'] == 'none'
    from dalpsr.utils.options import OptionError
    bad = _opt(tmp_path / 'x', srclip_dir)
    bad['model']['network']['cond_dim'] = 32
    with pytest.raises(OptionError, match='cond_dim'):
        _run(bad)
    with pytest.raises(FileNotFoundError, match='realdat.safetensors'):
        build_restorer({'type': 'RealDATRestorer', 'weights': str(tmp_path / 'nothing')})


def test_train_crop_is_aligned_and_step_seeded(srclip_dir, tmp_path):
    from dalpsr.models.realdat_model import RealDATModel
    opt = _opt(tmp_path, srclip_dir)
    opt['model']['train_crop'] = 4
    m = RealDATModel(opt)
    gt = torch.rand(3, 3, 16, 16)
    lq = F_down(gt)
    a_lq, a_gt = m._crop(lq, gt, step=5)
    b_lq, b_gt = m._crop(lq, gt, step=5)
    c_lq, _ = m._crop(lq, gt, step=6)
    assert a_lq.shape == (3, 3, 4, 4) and a_gt.shape == (3, 3, 8, 8)
    assert torch.equal(a_lq, b_lq) and not torch.equal(a_lq, c_lq)
    assert torch.allclose(F_down(a_gt), a_lq, atol=1e-6)   # the GT crop is the LR crop's HR


def F_down(x):
    import torch.nn.functional as F
    return F.avg_pool2d(x, 2)


def test_restore_folder_and_crop_figure(tmp_path, srclip_dir):
    from dalpsr.utils.img_io import write_image
    from tests.script_loader import load_script
    lr, gt = tmp_path / 'LR', tmp_path / 'GT'
    lr.mkdir()
    gt.mkdir()
    rng = np.random.default_rng(0)
    for name in ('a', 'b'):
        write_image(gt / f'{name}.png', rng.random((32, 32, 3)).astype(np.float32))
        write_image(lr / f'{name}.png', rng.random((8, 8, 3)).astype(np.float32))
    (lr / 'broken.png').write_bytes(b'not an image')
    rf = load_script('restore_folder')
    out = tmp_path / 'bic'
    assert rf.main(['--lr', str(lr), '--out', str(out), '--method', '{type: Bicubic, scale: 4}']) == 0
    assert sorted(p.name for p in out.iterdir()) == ['a.png', 'b.png']   # the corrupt file is skipped
    assert rf.main(['--lr', str(lr), '--out', str(out), '--method', 'not yaml: [']) == 2
    fig = load_script('plot_sr_crops')
    png = tmp_path / 'fig.png'
    assert fig.main(['--lr', str(lr), '--gt', str(gt), '--sr', f'bicubic={out}', '--images', 'a', 'b',
                     '--crop', '16', '--out', str(png)]) == 0
    assert png.stat().st_size > 1000
    assert fig.main(['--lr', str(lr), '--gt', str(gt), '--sr', f'bicubic={out}', '--images', 'zzz',
                     '--out', str(png)]) == 2


def test_tile_starts_and_psnr():
    assert tile_starts(10, 0, 0) == [0] and tile_starts(10, 20, 4) == [0]
    s = tile_starts(50, 20, 4)
    assert s[0] == 0 and s[-1] == 30 and all(b - a <= 16 for a, b in zip(s, s[1:]))
    x = torch.rand(1, 3, 16, 16)
    assert psnr_y(x, x).item() > 100
    noisy = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    assert 15 < psnr_y(noisy, x, crop_border=2).item() < 30


def _collapsed_embeddings(n, d, tokens, spread, seed):
    """Unit-norm embeddings that all point nearly one way: a common direction + ``spread`` noise."""
    g = torch.Generator().manual_seed(seed)
    common = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    xi = torch.nn.functional.normalize(common + spread * torch.randn(n, 1, d, generator=g), dim=-1)
    xd = torch.nn.functional.normalize(common + spread * torch.randn(n, tokens, d, generator=g), dim=-1)
    return xi, xd


def test_cond_standardize_lets_nearly_equal_embeddings_through():
    """With embeddings that differ between images by ~1e-5 (a collapsed unit-norm encoder), the
    paper's adapter sees the same input for every image; cond_standardize (BatchNorm, no affine)
    gives the fusion blocks inputs that differ, keeps its statistics in the state dict, and is
    absent from older configs."""
    from dalpsr.archs.realdat_arch import RealDAT
    cfg = {k: v for k, v in NET.items() if k != 'type'}
    torch.manual_seed(0)
    plain = RealDAT(**cfg).eval()
    torch.manual_seed(0)
    std = RealDAT(cond_standardize=True, **cfg)
    assert 'cond_standardize' not in plain.config and std.config['cond_standardize'] is True
    assert not any(k.startswith('cond_norm') for k in plain.state_dict())
    xi, xd = _collapsed_embeddings(16, 16, 5, 1e-5, 0)
    std.train()
    for _ in range(3):                       # cumulative statistics: exact after any number of batches
        std(torch.rand(16, 3, 8, 8), xi, xd)
    std.eval()
    assert torch.allclose(std.state_dict()['cond_norm_i.running_mean'], xi.mean(0)[0], atol=1e-6)
    lq = torch.rand(1, 3, 8, 8).expand(2, 3, 8, 8).contiguous()

    def fusion_inputs(net):
        """(xi, xd) as the first fusion block receives them, for two images."""
        seen = {}
        h = net.fusion_blocks[0].register_forward_pre_hook(lambda m, args: seen.update(args=args))
        with torch.no_grad():
            net(lq, xi[:2], xd[:2])
        h.remove()
        return seen['args'][1:]

    def rel_diff(a):  # difference between the two images relative to the size of the input
        return float((a[0] - a[1]).abs().max() / a.abs().max())
    assert max(rel_diff(t) for t in fusion_inputs(plain)) < 1e-3
    assert min(rel_diff(t) for t in fusion_inputs(std)) > 0.05
    # the statistics travel with the weights (export / resume)
    again = RealDAT(cond_standardize=True, **cfg).eval()
    again.load_state_dict(std.state_dict())
    with torch.no_grad():
        assert torch.equal(again(lq, xi[:2], xd[:2]), std(lq, xi[:2], xd[:2]))
    with pytest.raises(ValueError, match='cond_standardize expects'):
        std(lq, xi[:2], xd[:2, :3])


def test_conditioning_ablation_script(tmp_path, srclip_dir):
    """scripts/realdat_conditioning_ablation.py: own / other / mean embeddings on a folder pair."""
    import json
    from tests.script_loader import load_script
    from dalpsr.utils.img_io import write_image
    res = _run(_opt(tmp_path, srclip_dir, total_iter=4, val_freq=0))
    lr_dir, gt_dir = tmp_path / 'LR', tmp_path / 'GT'
    lr_dir.mkdir()
    gt_dir.mkdir()
    g = np.random.default_rng(0)
    for i in range(3):
        gt = g.random((24, 20, 3)).astype(np.float32)
        write_image(gt_dir / f'im{i}.png', gt)
        write_image(lr_dir / f'im{i}.png', gt[::2, ::2])
    write_image(lr_dir / 'no_gt.png', g.random((12, 10, 3)).astype(np.float32))
    abl = load_script('realdat_conditioning_ablation')
    out = tmp_path / 'abl.json'
    assert abl.main(['--weights', str(res['export']), '--lr', str(lr_dir), '--gt', str(gt_dir), '--tile', '0',
                     '--out', str(out)]) == 0
    r = json.loads(out.read_text())
    assert r['num_images'] == 3 and set(r['per_image']) == {'im0', 'im1', 'im2'}
    for row in ('other', 'mean'):
        assert abs(r['own_minus'][row] - (r['mean']['own'] - r['mean'][row])) < 1e-3
    sp = r['embedding_spread']
    assert -1 <= sp['xi_min_cosine'] <= 1 and sp['xi_dim_std'] > 0 and sp['xd_dim_std'] > 0
    # 'own' is what the restorer gives
    r0 = build_restorer({'type': 'RealDATRestorer', 'weights': str(res['export']), 'tile': 0})
    from dalpsr.utils.img_io import read_image
    lq = torch.from_numpy(read_image(lr_dir / 'im0.png')).permute(2, 0, 1)[None]
    hr = torch.from_numpy(read_image(gt_dir / 'im0.png')).permute(2, 0, 1)[None]
    assert abs(float(psnr_y(r0.restore(lq, seeds=[0]), hr)[0]) - r['per_image']['im0']['own']) < 1e-3
    # an unconditioned export and a missing folder are refused with a message
    dat = _run(_opt(tmp_path / 'dat', None, conditioning='none', total_iter=2, val_freq=0))
    assert abl.main(['--weights', str(dat['export']), '--lr', str(lr_dir), '--gt', str(gt_dir)]) == 2
    assert abl.main(['--weights', str(res['export']), '--lr', str(tmp_path / 'none'), '--gt', str(gt_dir)]) == 2
    (lr_dir / 'im1.png').write_bytes(b'not a png')                 # a broken image: one-line error
    assert abl.main(['--weights', str(res['export']), '--lr', str(lr_dir), '--gt', str(gt_dir)]) == 2
