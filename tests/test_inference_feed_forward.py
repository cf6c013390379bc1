"""A feed-forward restorer (Bicubic) through dalpsr/test.py on odd real images: every input rule,
records, per-image seeds, metrics, resume, and the method block's checks."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dalpsr import test as T
from dalpsr.utils.options import OptionError


@pytest.fixture(scope='module')
def odd_set(tmp_path_factory, sample_paths):
    """Real photos as LR (x4 area-downscaled, with GT): plain, gray, RGBA (half transparent),
    16-bit; plus a corrupt file and a text file with an image suffix."""
    from dalpsr.utils.img_io import read_image
    root = tmp_path_factory.mktemp('odd')
    lq, gt = root / 'lq', root / 'gt'
    lq.mkdir()
    gt.mkdir()
    photos = (sample_paths['val'] + sample_paths['train'])[:4]
    assert len(photos) == 4
    for name, p in zip(('plain', 'gray', 'rgba', 'deep'), photos):
        hr = read_image(p)[:96, :128]  # float32 RGB [0,1]
        if name == 'gray':
            hr = np.repeat(hr.mean(2, keepdims=True), 3, 2)
        shown = hr * 0.5 + 0.5 if name == 'rgba' else hr  # RGBA at alpha 0.5 over white
        cv2.imwrite(str(gt / f'{name}_HR.png'), np.round(shown[:, :, ::-1] * 255).astype(np.uint8))
        small = cv2.resize(hr, (32, 24), interpolation=cv2.INTER_AREA)
        if name == 'gray':
            cv2.imwrite(str(lq / 'gray.png'), np.round(small[:, :, 0] * 255).astype(np.uint8))
        elif name == 'rgba':
            bgra = np.dstack([small[:, :, ::-1], np.full((24, 32, 1), 0.5, np.float32)])
            cv2.imwrite(str(lq / 'rgba.png'), np.round(bgra * 255).astype(np.uint8))
        elif name == 'deep':
            cv2.imwrite(str(lq / 'deep.png'), np.round(small[:, :, ::-1] * 65535).astype(np.uint16))
        else:
            cv2.imwrite(str(lq / 'plain.png'), np.round(small[:, :, ::-1] * 255).astype(np.uint8))
    (lq / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\x00broken' * 8)
    (lq / 'text.jpg').write_text('not an image')
    return {'lq': str(lq), 'gt': str(gt)}


def _opt(odd_set, results, name='bicubic', **extra):
    opt = {'name': name, 'seed': 5, 'path': {'results_root': str(results)}, 'method': {'type': 'Bicubic'},
           'irpad': {'source': 'none'}, 'metrics': {'names': ['psnr', 'ssim'], 'device': 'cpu'},
           'model': {'device': 'cpu'}, 'test': {'progress_bar': False, 'batch_size': 2},
           'datasets': {'odd': {'dataroot_lq': odd_set['lq'], 'dataroot_gt': odd_set['gt']}}}
    opt.update(extra)
    return opt


def _recs(d):
    return {r['key']: r for r in map(json.loads, (d / 'records.jsonl').read_text().splitlines())}


def test_bicubic_through_test_py_every_rule_record_seed_and_metric(odd_set, tmp_path):
    from dalpsr.utils.img_io import img2tensor
    res = T.test(_opt(odd_set, tmp_path))
    d = res['dir'] / 'odd'
    recs = _recs(d)
    assert {k: r['status'] for k, r in recs.items()} == {'plain': 'ok', 'gray': 'ok', 'rgba': 'ok', 'deep': 'ok',
                                                          'corrupt': 'failed', 'text': 'failed'}
    assert recs['gray']['notes'] == ['gray->rgb'] and recs['rgba']['notes'] == ['alpha->white']
    assert recs['deep']['notes'] == ['16bit->8bit output'] and 'not a readable image' in recs['corrupt']['message']
    for k in ('plain', 'gray', 'rgba', 'deep'):
        out = cv2.imread(str(d / f'{k}.png'), cv2.IMREAD_UNCHANGED)
        assert out.shape == (96, 128, 3) and out.dtype == np.uint8
        # the written image is exactly bicubic x4 of the LR as the input rules read it
        img, _ = T.load_lr(Path(recs[k]['lr_path']), T.TEST_DEFAULTS['test'])
        want = torch.nn.functional.interpolate(img2tensor(img)[None], scale_factor=4, mode='bicubic',
                                               align_corners=False).clamp(0, 1)[0]
        want = np.round(want.permute(1, 2, 0).numpy()[:, :, ::-1] * 255).astype(np.int16)
        assert np.abs(out.astype(np.int16) - want).max() <= 1, k
        assert recs[k]['seed'] == T.image_seed(5, k) and recs[k]['batch'] in (1, 2)
        assert set(recs[k]['metrics']) == {'psnr', 'ssim'} and recs[k]['metrics']['psnr'] > 18, k
    gray = cv2.imread(str(d / 'gray.png'))
    assert np.array_equal(gray[:, :, 0], gray[:, :, 1]) and np.array_equal(gray[:, :, 1], gray[:, :, 2])
    # RGBA at alpha 0.5 over white: every input pixel is at least half white
    assert T.load_lr(Path(recs['rgba']['lr_path']), T.TEST_DEFAULTS['test'])[0].min() >= 127 / 255
    # 16-bit input keeps its precision: closer to GT than the same photo through 8 bits would be
    assert recs['deep']['metrics']['psnr'] > 20
    s = json.loads((d / 'summary.json').read_text())
    assert (s['ok'], s['failed']) == (4, 2) and s['metrics']['psnr']['count'] == 4
    run = json.loads((res['dir'] / 'run.json').read_text())['fingerprint']
    assert run['method']['describe'] == {'type': 'Bicubic', 'scale': 4} and 'sampler' not in run
    # a rerun redoes nothing; another scale is refused naming the key, --force archives
    before = {p.name: p.stat().st_mtime_ns for p in d.glob('*.png')}
    again = T.test(_opt(odd_set, tmp_path))
    assert again['sets']['odd']['resumed'] == 4 and {p.name: p.stat().st_mtime_ns for p in d.glob('*.png')} == before
    with pytest.raises(FileExistsError, match=r'method\.'):
        T.test(_opt(odd_set, tmp_path, method={'type': 'Bicubic', 'scale': 2}))


def test_method_block_is_checked_before_anything_runs(odd_set, tmp_path):
    with pytest.raises(OptionError, match='method Bicubic does not read the sampler block'):
        T.resolve_test_opt(_opt(odd_set, tmp_path, sampler={'num_steps': 3}))
    with pytest.raises(OptionError, match='method Bicubic does not read the model block'):
        T.resolve_test_opt(_opt(odd_set, tmp_path, model={'path': 'x'}))
    with pytest.raises(OptionError, match="method in .*No object named 'Bicubik'"):
        T.resolve_test_opt(_opt(odd_set, tmp_path, method={'type': 'Bicubik'}))
    with pytest.raises(OptionError, match="unknown key 'scal'"):
        T.test(_opt(odd_set, tmp_path, name='bad', method={'type': 'Bicubic', 'scal': 2}))
    assert not (tmp_path / 'bad').exists()


def test_bicubic_options_file_runs_from_the_command_line(odd_set, tmp_path, repo_root):
    rc = T.main(['-opt', f'{repo_root}/options/test/test_bicubic.yml',
                 '--set', f"datasets.demo.dataroot_lq={odd_set['lq']}",
                 '--set', f"datasets.demo.dataroot_gt={odd_set['gt']}", '--set', f'path.results_root={tmp_path}',
                 '--set', 'test.progress_bar=false'])
    assert rc == 0
    s = json.loads((tmp_path / 'bicubic_x4' / 'demo' / 'summary.json').read_text())
    assert (s['ok'], s['failed']) == (4, 2) and s['metrics']['psnr']['count'] == 4
