"""RealDAT's known-degradation upper bound (``conditioning: oracle``): the true degrees served by
DegradedPairDataset, the fixed tokens they become, training through train.py, and the restorer's
refusal of such an export."""
import copy

import numpy as np
import pytest
import torch

from dalpsr.data.deplsr_datasets import DegradedPairDataset
from dalpsr.models.realdat_model import load_realdat, oracle_tokens
from dalpsr.restorers import build_restorer

NET = {'type': 'RealDAT', 'upscale': 2, 'embed_dim': 32, 'depth': [2], 'num_heads': [2], 'split_size': [2, 4],
       'expansion_factor': 2, 'upsampler': 'pixelshuffledirect', 'cond_dim': 16, 'fusion_num_heads': 2}


def test_oracle_tokens_encode_each_type_apart():
    d = torch.tensor([[0.1, 0.5, 0.9, 0.3], [0.1, 0.8, 0.9, 0.3]])
    xi, xd = oracle_tokens(d, 64)
    assert xi.shape == (2, 1, 64) and xd.shape == (2, 4, 64)
    # only the token of the changed type (noise, index 1) moves; the summary token moves too
    moved = (xd[0] - xd[1]).abs().amax(-1)
    assert moved[1] > 0.1 and torch.all(moved[[0, 2, 3]] < 1e-6)
    assert (xi[0] - xi[1]).abs().max() > 0.1
    # equal degrees of two types still give two different tokens (the type code)
    same, _ = oracle_tokens(torch.full((1, 4), 0.5), 64)[1], None
    assert (same[0, 0] - same[0, 1]).abs().max() > 0.5
    with pytest.raises(ValueError, match='too small'):
        oracle_tokens(d, 5)
    with pytest.raises(ValueError, match=r'\[B, T\]'):
        oracle_tokens(d[0], 64)


def test_pair_dataset_serves_true_degrees(tmp_path):
    kw = dict(hr='sample:train', gt_size=32, num_samples=8, seed=1, augment=True)
    mild = {'scale': 4, 'jpeg_range': [95, 95], 'jpeg_range2': [95, 95]}
    harsh = {'scale': 4, 'jpeg_range': [30, 30], 'jpeg_range2': [30, 30]}
    a = DegradedPairDataset(**kw, degradation=mild, degrees=True)
    b = DegradedPairDataset(**kw, degradation=harsh, degrees=True, cache_file=str(tmp_path / 'h.npz'))
    again = DegradedPairDataset(**kw, degradation=harsh, degrees=True, cache_file=str(tmp_path / 'h.npz'))
    for i in range(8):
        da, db = a[i]['degrees'], b[i]['degrees']
        assert da.shape == (4,) and torch.all((da >= 0) & (da <= 1))
        assert db[2] > da[2] + 0.3             # JPEG q 30 is a higher JPEG degree than q 95
        assert torch.equal(db, again[i]['degrees'])
        assert torch.equal(db, b[i + 8]['degrees'])   # another flip/rotation of the same pair: same degrees
    assert 'degrees' not in DegradedPairDataset(**kw, degradation=mild)[0]
    # a cache built without degrees cannot serve them; one built with them serves plain pairs too
    DegradedPairDataset(**kw, degradation=mild, cache_file=str(tmp_path / 'm.npz'))
    with pytest.raises(ValueError, match='degrees'):
        DegradedPairDataset(**kw, degradation=mild, degrees=True, cache_file=str(tmp_path / 'm.npz'))
    plain = DegradedPairDataset(**kw, degradation=harsh, cache_file=str(tmp_path / 'h.npz'))
    assert torch.equal(plain[3]['lq'], b[3]['lq'])


def _opt(tmp_path, **train):
    data = {'type': 'DegradedPairDataset', 'gt_size': 32, 'degradation': {'scale': 2}, 'degrees': True}
    return {
        'name': 'oracle_tiny', 'seed': 0, 'path': {'experiments_root': str(tmp_path / 'exp')},
        'model': {'type': 'RealDATModel', 'network': dict(NET), 'conditioning': 'oracle', 'crop_border': 2},
        'datasets': {'train': dict(data, hr='sample:train', num_samples=24, seed=1),
                     'val': dict(data, hr='sample:val', num_samples=4, seed=3, augment=False, batch_size=4)},
        'train': dict({'total_iter': 30, 'batch_size': 4, 'num_workers': 0, 'progress_bar': False,
                       'optimizer': {'type': 'Adam', 'lr': 2e-3, 'betas': [0.9, 0.99]},
                       'checkpoint_freq': 10, 'val_freq': 30, 'print_freq': 10, 'tensorboard': False}, **train)}


def _run(opt):
    from dalpsr.train import train
    opt = copy.deepcopy(opt)
    opt['_args'] = {'resume': 'auto', 'force': False}
    return train(opt)


def test_oracle_realdat_trains_on_degrees_and_is_not_a_restorer(tmp_path):
    res = _run(_opt(tmp_path))
    losses = res['losses']
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]) and 'psnr_y' in res['val']
    net, enc, meta = load_realdat(str(res['export']))
    assert meta['arch'] == 'RealDAT' and meta['conditioning'] == 'oracle' and enc is None
    with pytest.raises(ValueError, match='oracle'):
        build_restorer({'type': 'RealDATRestorer', 'weights': str(res['export'])})
    # without the degrees in the batch: one clear error naming the dataset option
    bad = _opt(tmp_path / 'b', total_iter=2, val_freq=0)
    bad['datasets']['train']['degrees'] = False
    with pytest.raises(KeyError, match='degrees: true'):
        _run(bad)


def test_only_the_query_residual_lets_the_conditioning_values_reach_the_image():
    """The paper's fusion block passes the embeddings on only as attention queries over image
    tokens (xi' = CrossAttn(q=xi, kv=x)): at init the SR hardly depends on them. With
    ``fusion_query_residual`` they reach the keys/values x attends to."""
    from dalpsr.archs.realdat_arch import RealDAT
    cfg = {k: v for k, v in NET.items() if k != 'type'}
    lq = torch.rand(2, 3, 12, 12)
    moved = {}
    for qr in (False, True):
        torch.manual_seed(0)
        net = RealDAT(**cfg, fusion_query_residual=qr).eval()
        with torch.no_grad():
            lo = net(lq, *oracle_tokens(torch.zeros(2, 4), 16))
            hi = net(lq, *oracle_tokens(torch.ones(2, 4), 16))
        moved[qr] = float((lo - hi).abs().mean())
        assert ('fusion_query_residual' in net.config) == qr   # older exports load unchanged
    assert moved[True] > 1e-4 and moved[True] > 100 * moved[False]


def test_eval_realdat_pairs_script(tmp_path):
    """scripts/eval_realdat_pairs.py: every export run as trained on the same pairs, paired
    differences to the first; a model against its own copy differs by exactly 0."""
    import json
    import shutil
    import sys
    import yaml
    sys.path.insert(0, 'scripts')
    import eval_realdat_pairs as ev
    oracle = _run(_opt(tmp_path / 'o', total_iter=6, val_freq=0))['export']
    plain_opt = _opt(tmp_path / 'd', total_iter=6, val_freq=0)
    plain_opt['model']['conditioning'] = 'none'
    plain = _run(plain_opt)['export']
    twin = tmp_path / 'twin'
    shutil.copytree(plain, twin)
    opt_file = tmp_path / 'pairs.yml'
    opt_file.write_text(yaml.safe_dump({'name': 'pairs', 'datasets': {'val': _opt(tmp_path)['datasets']['val']}}))
    out = tmp_path / 'res.json'
    rc = ev.main(['--opt', str(opt_file), '--models', f'dat={plain}', f'oracle={oracle}', f'twin={twin}',
                  '--out', str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res['num_pairs'] == 4 and res['reference'] == 'dat' and list(res['rows']) == ['bicubic', 'dat', 'oracle', 'twin']
    assert res['rows']['twin']['minus_dat'] == {'diff': 0.0, 'lo': 0.0, 'hi': 0.0}
    assert 'minus_dat' not in res['rows']['dat']
    # bicubic row as computed by hand
    from dalpsr.models.realdat_model import psnr_y
    ds = DegradedPairDataset(**{k: v for k, v in _opt(tmp_path)['datasets']['val'].items()
                                if k not in ('type', 'batch_size')})
    lq, gt = torch.stack([ds[i]['lq'] for i in range(4)]), torch.stack([ds[i]['gt'] for i in range(4)])
    bic = torch.nn.functional.interpolate(lq, size=gt.shape[-2:], mode='bicubic', align_corners=False)
    assert abs(res['rows']['bicubic']['psnr_y'] - float(psnr_y(bic.clamp(0, 1), gt, 2).mean())) < 1e-3
    d = res['rows']['oracle']['minus_dat']
    assert d['lo'] <= d['diff'] <= d['hi'] and d['diff'] != 0
    # bad input: one line, exit 2, nothing written
    out.unlink()
    assert ev.main(['--opt', str(opt_file), '--models', f'dat={plain}', 'oracle', '--out', str(out)]) == 2
    assert ev.main(['--opt', str(opt_file), '--models', f'dat={tmp_path / "none"}']) == 2
    assert ev.main(['--opt', str(opt_file), '--set', 'datasets.val.degrees=false', '--models', f'o={oracle}']) == 2
    broken = tmp_path / 'broken'
    broken.mkdir()
    (broken / 'x.png').write_bytes(b'not a png')
    assert ev.main(['--opt', str(opt_file), '--set', f'datasets.val.hr={broken}', '--models', f'dat={plain}']) == 2
    assert not out.exists()
