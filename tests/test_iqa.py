"""scripts/iqa.py and dalpsr.metrics.iqa: numbers against independent computations, missing
weights, pairing rules, result files, overwrite refusal, resume. Offline, small images."""
import csv
import json
import math
import os

import cv2
import numpy as np
import pytest
import torch

from dalpsr.metrics import iqa
from dalpsr.metrics.iqa import IQAError, MetricSet, evaluate_folders
from dalpsr.metrics.pairing import pair_folders, strip_key
from dalpsr.metrics.weights import MissingWeightsError, offline_weights, resolve_weights_dir
from dalpsr.utils.img_io import read_image, write_image
from tests.script_loader import load_script

H, W = 96, 112


def _crops(sample_paths, n=3):
    out = []
    for p in sample_paths['train'][:n]:
        out.append(read_image(p)[:H, :W].copy())
    return out


def _noisy(img, sigma, seed):
    rng = np.random.default_rng(seed)
    return np.clip(img + rng.normal(0, sigma, img.shape), 0, 1).astype(np.float32)


def _t(img):
    """(H, W, 3) float [0,1] -> (1, 3, H, W), quantised to 8 bit like a PNG round trip."""
    q = np.round(img * 255.0) / 255.0
    return torch.from_numpy(q.transpose(2, 0, 1).copy()).float()[None]


def _bgr_u8(img):
    return np.round(img[:, :, ::-1] * 255.0).astype(np.uint8)


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    return str(tmp_path_factory.mktemp('iqa_weights'))


@pytest.fixture(scope='module')
def psnr_ssim(weights):
    return MetricSet(['psnr', 'ssim'], weights_dir=weights, crop_border=4)


@pytest.fixture
def folders(tmp_path, sample_paths):
    """sr/ (noisy copies named <stem>_x4.png) and gt/ (<stem>.png), 3 pairs."""
    sr, gt = tmp_path / 'sr', tmp_path / 'gt'
    sr.mkdir(), gt.mkdir()
    for i, img in enumerate(_crops(sample_paths)):
        write_image(gt / f'img{i}.png', img)
        write_image(sr / f'img{i}_x4.png', _noisy(img, 0.03, i))
    return sr, gt


# ---- numbers ------------------------------------------------------------------------------------

def test_psnr_ssim_match_basicsr_on_y_channel_with_crop(psnr_ssim, sample_paths):
    from dalpsr.utils.basicsr_compat import import_basicsr
    bm = import_basicsr('metrics')
    pss, mu = import_basicsr('metrics.psnr_ssim'), import_basicsr('metrics.metric_util')
    for i, gt in enumerate(_crops(sample_paths)):
        sr = _noisy(gt, 0.03, i)
        sr_u8, gt_u8 = _bgr_u8(sr), _bgr_u8(gt)
        ours = psnr_ssim.compute(_t(sr), _t(gt))
        ref_psnr = bm.calculate_psnr(sr_u8, gt_u8, crop_border=4, input_order='HWC', test_y_channel=True)
        ref_ssim = bm.calculate_ssim(sr_u8, gt_u8, crop_border=4, input_order='HWC', test_y_channel=True)
        assert abs(ours['psnr'] - ref_psnr) < 1e-3
        # pyiqa rounds Y to integers before SSIM (as MATLAB's rgb2ycbcr on uint8 does); basicsr does not
        assert abs(ours['ssim'] - ref_ssim) < 3e-3
        y1 = mu.to_y_channel(sr_u8.astype(np.float64))[4:-4, 4:-4, 0].round()
        y2 = mu.to_y_channel(gt_u8.astype(np.float64))[4:-4, 4:-4, 0].round()
        assert abs(ours['ssim'] - float(pss._ssim(y1, y2))) < 1e-4


def test_crop_border_changes_only_the_border(weights):
    gt = torch.full((1, 3, 40, 48), 0.5)
    sr = gt.clone()
    sr[..., :4, :] += 0.2  # error only inside the 4-pixel top border
    no_crop = MetricSet(['psnr'], weights_dir=weights).compute(sr, gt)['psnr']
    cropped = MetricSet(['psnr'], weights_dir=weights, crop_border=4).compute(sr, gt)['psnr']
    assert no_crop < 40 and cropped > 70  # 80 dB = pyiqa's eps floor for identical images


def test_psnr_closed_form_constant_offset(weights):
    rng = np.random.default_rng(1)
    gt = torch.from_numpy(rng.uniform(0.2, 0.7, (2, 3, 32, 40))).float()
    c = 0.1
    sr = gt + c
    y = MetricSet(['psnr'], weights_dir=weights).compute(sr[:1], gt[:1])['psnr']
    # Y of YCbCr (BT.601, [0,1] scale): dY = c * (65.481 + 128.553 + 24.966) / 255
    assert y == pytest.approx(-20 * math.log10(c * 219.0 / 255.0), abs=1e-3)
    rgb = MetricSet(['psnr'], weights_dir=weights, psnr={'test_y_channel': False}).compute(sr[:1], gt[:1])['psnr']
    assert rgb == pytest.approx(20.0, abs=1e-3)
    # batched scores equal the per-image ones
    ms = MetricSet(['psnr', 'ssim'], weights_dir=weights)
    sr2 = torch.stack([sr[0], (gt[1] + 0.05 * torch.randn(3, 32, 40, generator=torch.Generator().manual_seed(0))
                               ).clamp(0, 1)])
    batch, errors = ms.score_batch(sr2, gt)
    assert errors == [[], []]
    for i in range(2):
        single = ms.compute(sr2[i:i + 1], gt[i:i + 1])
        for k in ('psnr', 'ssim'):
            assert batch[k][i] == pytest.approx(single[k], abs=1e-5)


def test_niqe_offline_matches_basicsr(weights, sample_paths):
    from dalpsr.utils.basicsr_compat import import_basicsr
    bm = import_basicsr('metrics')
    yiq = MetricSet(['niqe'], weights_dir=weights)
    ycbcr = MetricSet(['niqe'], weights_dir=weights, niqe={'color_space': 'ycbcr'})
    assert not yiq.failed and 'basicsr' in yiq.metrics['niqe'].options['params_source']
    for p in sample_paths['train'][:2]:
        img = read_image(p)[:192, :224]
        bgr = _bgr_u8(img).astype(np.float32)
        ours_gray = yiq.compute(_t(img))['niqe']
        ours_y = ycbcr.compute(_t(img))['niqe']
        ref_gray = float(bm.calculate_niqe(bgr, 0, input_order='HWC', convert_to='gray'))
        ref_y = float(bm.calculate_niqe(bgr, 0, input_order='HWC', convert_to='y'))
        # pyiqa's torch re-implementation differs from basicsr's numpy one by < 0.5 % (docs/metrics.md)
        assert ours_gray == pytest.approx(ref_gray, rel=5e-3, abs=0.02)
        assert ours_y == pytest.approx(ref_y, rel=5e-3, abs=0.02)
    # the derived parameter file holds basicsr's pristine model exactly
    import scipy.io
    npz = np.load(os.path.join(os.path.dirname(bm.__file__), 'niqe_pris_params.npz'))
    mat = scipy.io.loadmat(yiq.metrics['niqe'].options['pretrained_model_path'])
    np.testing.assert_array_equal(np.ravel(mat['mu_prisparam']), np.ravel(npz['mu_pris_param']))
    np.testing.assert_array_equal(mat['cov_prisparam'], npz['cov_pris_param'])


# ---- weights ---------------------------------------------------------------------------------

def test_missing_weights_fail_alone_with_one_line(tmp_path, weights):
    empty = tmp_path / 'no_weights'
    ms = MetricSet(['psnr', 'lpips', 'musiq', 'maniqa', 'fid'], weights_dir=str(empty))
    assert set(ms.failed) == {'lpips', 'musiq', 'maniqa', 'fid'}
    for name, msg in ms.failed.items():
        assert '\n' not in msg and msg.startswith(name)
        assert str(empty) in msg and 'https://' in msg
    assert 'LPIPS_v0.1_alex-df73285e.pth' in ms.failed['lpips'] and 'alexnet-owt-7be5be79.pth' in ms.failed['lpips']
    assert 'musiq_koniq_ckpt-e95806b9.pth' in ms.failed['musiq']
    assert 'MANIQA_PIPAL-ae6d356b.pth' in ms.failed['maniqa']  # maniqa-pipal, not the koniq default
    x = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    assert set(ms.compute(x, x)) == {'psnr'}
    info = ms.describe()
    assert info['lpips']['status'] == 'failed' and info['psnr']['status'] == 'ok'


def test_weights_dir_env_and_download_guard(tmp_path, monkeypatch):
    monkeypatch.setenv('DALPSR_IQA_WEIGHTS', str(tmp_path / 'w'))
    assert resolve_weights_dir() == (tmp_path / 'w').absolute()
    assert resolve_weights_dir(tmp_path / 'x') == (tmp_path / 'x').absolute()
    hub_before = torch.hub.get_dir()
    with offline_weights(tmp_path / 'w'):
        assert torch.hub.get_dir() == str(tmp_path / 'w')
        with pytest.raises(MissingWeightsError, match='alexnet-owt-7be5be79.pth'):
            torch.hub.load_state_dict_from_url('https://download.pytorch.org/models/alexnet-owt-7be5be79.pth')
        from pyiqa.utils.download_util import load_file_from_url
        with pytest.raises(MissingWeightsError, match=str(tmp_path / 'w' / 'pyiqa' / 'x.pth')):
            load_file_from_url('https://example.invalid/x.pth')
    assert torch.hub.get_dir() == hub_before


def test_unknown_metric_and_bad_options(weights):
    with pytest.raises(IQAError, match='did you mean'):
        MetricSet(['lpipz'], weights_dir=weights)
    with pytest.raises(IQAError, match='unknown MetricSet option'):
        MetricSet(['psnr'], weights_dir=weights, crop=4)
    with pytest.raises(IQAError, match='crop_border'):
        MetricSet(['psnr'], weights_dir=weights, crop_border=-1)
    assert iqa.expand_metric_names(['dalpsr', 'MANIQA-PIPAL', 'clip-i']) == \
        ['lpips', 'fid', 'maniqa', 'musiq', 'clipiqa', 'clip_i']


# ---- pairing and odd files -------------------------------------------------------------------

def test_strip_key_rules():
    sfx = ['_x4', '_sr', '_out', '_lr4', '_hr']
    assert strip_key('0801_x4_SR', sfx) == '0801'
    assert strip_key('Canon_003_LR4', sfx) == 'Canon_003'
    assert strip_key('Canon_003_HR', sfx) == 'Canon_003'
    assert strip_key('_x4', sfx) == '_x4'  # never strips to an empty key
    assert strip_key('0801_x4', []) == '0801_x4'


def test_pairing_statuses(tmp_path):
    sr, gt = tmp_path / 'sr', tmp_path / 'gt'
    sr.mkdir(), gt.mkdir()
    img = np.zeros((8, 8, 3), np.float32)
    for n in ['a_x4.PNG', 'b_SR.png', 'c.png', 'd_x4.png', 'd_out.png', 'notes.txt']:
        (sr / n).write_bytes(b'x') if n.endswith('.txt') else write_image(sr / n, img)
    for n in ['a.png', 'b.JPG', 'e.png', 'c_HR.png', 'c_gt.png']:
        write_image(gt / n, img)
    rows = {(r.key, r.status) for r in pair_folders(str(sr), str(gt))}
    assert rows == {('a', 'ok'), ('b', 'ok'), ('c', 'ambiguous_gt'), ('d', 'duplicate'), ('e', 'unpaired_gt')}
    custom = {(r.key, r.status) for r in pair_folders(str(sr), str(gt), strip_suffixes=['_x4'])}
    assert ('a', 'ok') in custom and ('b_SR', 'unpaired_sr') in custom and ('b', 'unpaired_gt') in custom


def test_evaluate_reports_bad_files_per_row_and_continues(folders, weights):
    sr, gt = folders
    img = read_image(gt / 'img0.png')
    (sr / 'broken_x4.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
    write_image(gt / 'broken.png', img)
    write_image(gt / 'small.png', img)
    write_image(sr / 'small_x4.png', img[:48, :56])                       # size mismatch, tiny
    write_image(gt / 'big.png', img)
    write_image(sr / 'big_x4.png', cv2.resize(img, (2 * W, 2 * H)))       # size mismatch
    write_image(sr / 'lonely_x4.png', img)                                # no GT
    gray16 = np.round(img.mean(axis=2) * 65535).astype(np.uint16)         # 16-bit grayscale SR
    cv2.imwrite(str(sr / 'gray16_SR.png'), gray16)
    write_image(gt / 'gray16.png', np.repeat(img.mean(axis=2, keepdims=True), 3, axis=2))
    rgba = np.dstack([_bgr_u8(img), np.full((H, W), 255, np.uint8)])     # opaque RGBA SR
    cv2.imwrite(str(sr / 'rgba_x4.png'), rgba)
    write_image(gt / 'rgba.png', img)
    out = sr.parent / 'out'
    summary = evaluate_folders(str(sr), str(gt), ['psnr', 'niqe'], str(out), weights_dir=weights,
                               progress=False, batch_size=2)
    with open(out / 'per_image.csv', newline='') as f:
        rows = {r['key']: r for r in csv.DictReader(f)}
    assert rows['broken']['status'] == 'unreadable' and 'broken_x4.png' in rows['broken']['reason']
    assert rows['small']['status'] == 'size_mismatch' and '56x48' in rows['small']['reason']
    assert rows['small']['psnr'] == '' and rows['small']['niqe'] == ''
    assert 'smaller than the 96x96 NIQE patch' in rows['small']['reason']
    assert rows['big']['status'] == 'size_mismatch' and '224x192 vs GT 112x96' in rows['big']['reason']
    assert rows['big']['psnr'] == '' and float(rows['big']['niqe']) > 0   # NR metric still runs
    assert rows['lonely']['status'] == 'unpaired_sr' and rows['lonely']['psnr'] == ''
    assert float(rows['gray16']['psnr']) > 45       # 16-bit gray read as 3 equal channels
    assert float(rows['rgba']['psnr']) > 70         # opaque alpha composited away: identical
    for k in ('img0', 'img1', 'img2'):
        assert rows[k]['status'] == 'ok' and 25 < float(rows[k]['psnr']) < 40
    assert summary['results']['psnr']['count'] == 5
    assert summary['files']['unreadable'] == 1 and summary['files']['size_mismatch'] == 2
    log = (out / 'iqa.log').read_text()
    assert 'broken' in log and 'size mismatch' in log


# ---- result files, overwrite, resume, CLI ------------------------------------------------------

def test_outputs_record_options_and_refuse_overwrite(folders, weights):
    sr, gt = folders
    out = sr.parent / 'out'
    s = evaluate_folders(str(sr), str(gt), ['psnr', 'ssim', 'lpips'], str(out), weights_dir=weights,
                         crop_border=4, progress=False, name='Ours')
    data = json.loads((out / 'summary.json').read_text())
    assert data['sr_dir'] == str(sr.absolute()) and data['gt_dir'] == str(gt.absolute()) and data['date']
    assert data['versions']['pyiqa'] == '0.1.16'
    psnr_opts = data['metrics']['psnr']['options']
    assert psnr_opts['test_y_channel'] is True and psnr_opts['color_space'] == 'ycbcr'
    assert psnr_opts['crop_border'] == 4 and data['settings']['crop_border'] == 4
    assert data['metrics']['lpips']['status'] == 'failed' and 'LPIPS_v0.1' in data['metrics']['lpips']['error']
    with open(out / 'per_image.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    vals = [float(r['psnr']) for r in rows]
    assert data['results']['psnr']['mean'] == pytest.approx(np.mean(vals))
    assert data['results']['psnr']['std'] == pytest.approx(np.std(vals))
    assert data['results']['psnr']['count'] == 3
    table = (out / 'table.md').read_text().splitlines()
    assert table[0] == '| Method | PSNR↑ | SSIM↑ | LPIPS↓ |'
    assert table[2] == f"| Ours | {np.mean(vals):.2f} | {data['results']['ssim']['mean']:.4f} | n/a |"
    assert s['table_md'].splitlines()[2] == table[2]
    before = (out / 'summary.json').read_text()
    with pytest.raises(IQAError, match='refusing to overwrite'):
        evaluate_folders(str(sr), str(gt), ['psnr'], str(out), weights_dir=weights, progress=False)
    assert (out / 'summary.json').read_text() == before
    evaluate_folders(str(sr), str(gt), ['psnr'], str(out), weights_dir=weights, progress=False, overwrite=True)
    assert list(json.loads((out / 'summary.json').read_text())['metrics']) == ['psnr']


def test_resume_after_interruption(folders, weights, monkeypatch):
    sr, gt = folders
    fresh = evaluate_folders(str(sr), str(gt), ['psnr'], None, weights_dir=weights, progress=False)
    out = sr.parent / 'out'
    calls = {'n': 0}
    real = MetricSet.score_batch

    def flaky(self, *a, **k):
        calls['n'] += 1
        if calls['n'] == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(MetricSet, 'score_batch', flaky)
    with pytest.raises(KeyboardInterrupt):
        evaluate_folders(str(sr), str(gt), ['psnr'], str(out), weights_dir=weights, progress=False, batch_size=1)
    assert (out / iqa.PARTIAL_FILE).exists() and not (out / 'summary.json').exists()
    with pytest.raises(IQAError, match='--resume'):
        evaluate_folders(str(sr), str(gt), ['psnr'], str(out), weights_dir=weights, progress=False)
    with pytest.raises(IQAError, match='cannot be resumed'):
        evaluate_folders(str(sr), str(gt), ['psnr', 'ssim'], str(out), weights_dir=weights, progress=False,
                         resume=True)
    calls['n'] = -100
    resumed = evaluate_folders(str(sr), str(gt), ['psnr'], str(out), weights_dir=weights, progress=False,
                               batch_size=1, resume=True)
    assert calls['n'] == -100 + 2  # only the two rows not yet scored
    assert resumed['results']['psnr'] == fresh['results']['psnr']
    assert not (out / iqa.PARTIAL_FILE).exists()


def test_cli_flags_and_options_file(folders, weights, tmp_path, repo_root, capsys):
    import yaml
    script = load_script('iqa')
    sr, gt = folders
    out = tmp_path / 'cli'
    rc = script.main(['--sr', str(sr), '--gt', str(gt), '--metrics', 'psnr', 'lpips', '--out', str(out),
                      '--weights-dir', weights, '--no-progress', '--strict', '--metric-opt', 'psnr.crop_border=2'])
    assert rc == 3  # lpips has no weights here
    assert json.loads((out / 'summary.json').read_text())['metrics']['psnr']['options']['crop_border'] == 2
    assert script.main(['--sr', str(sr), '--gt', str(gt), '--metrics', 'psnr', '--out', str(out),
                        '--weights-dir', weights, '--no-progress']) == 2
    assert 'refusing to overwrite' in capsys.readouterr().err
    assert script.main(['--sr', str(tmp_path / 'nope'), '--out', str(tmp_path / 'o2'), '--no-progress']) == 2
    # the example options file only uses documented keys and runs once its folders are set
    example = yaml.safe_load(open(os.path.join(repo_root, 'options', 'test', 'iqa_example.yml')))
    assert set(example['metrics']) <= set(script.BLOCK_KEYS)
    opt = tmp_path / 'iqa.yml'
    opt.write_text(yaml.safe_dump({'name': 'from_yaml', 'metrics': {
        'sr_dir': str(sr), 'gt_dir': str(gt), 'out_dir': str(tmp_path / 'yml_out'), 'names': ['psnr', 'ssim'],
        'weights_dir': weights, 'crop_border': 4, 'options': {'ssim': {'color_space': 'yiq'}}}}))
    assert script.main(['-opt', str(opt), '--no-progress', '--set', 'metrics.batch_size=2']) == 0
    data = json.loads((tmp_path / 'yml_out' / 'summary.json').read_text())
    assert data['name'] == 'from_yaml' and data['settings']['batch_size'] == 2
    assert data['metrics']['ssim']['options']['color_space'] == 'yiq'
    assert data['metrics']['ssim']['options']['crop_border'] == 4
    opt.write_text(yaml.safe_dump({'name': 'x', 'metrics': {'sr_dir': str(sr), 'crop_boarder': 4}}))
    assert script.main(['-opt', str(opt), '--no-progress']) == 2
    assert "did you mean 'crop_border'" in capsys.readouterr().err
