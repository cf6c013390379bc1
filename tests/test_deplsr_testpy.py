"""DePLSR through dalpsr/test.py: the shipped RealDAT-CPU as ``method: RealDATRestorer`` over a folder
of odd real images (gray, RGBA, 16-bit, a corrupt file), with test.py's rules and records."""
import json
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def test_testpy_runs_the_shipped_deplsr_over_odd_images(tmp_path, sample_paths):
    from dalpsr.test import test
    from dalpsr.utils.img_io import read_image
    from dalpsr.utils.options import load_options
    lq = tmp_path / 'lq'
    lq.mkdir()
    photo = read_image([p for p in sample_paths['val'] if p.name == 'grace_hopper.jpg'][0])
    small = cv2.resize(photo, (40, 32), interpolation=cv2.INTER_AREA)            # RGB float
    bgr = (small[:, :, ::-1] * 255).astype(np.uint8)
    cv2.imwrite(str(lq / 'plain.png'), bgr)
    cv2.imwrite(str(lq / 'gray.png'), cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(lq / 'rgba.png'), np.concatenate([bgr, np.full((32, 40, 1), 255, np.uint8)], 2))
    cv2.imwrite(str(lq / 'deep.png'), (small[:, :, ::-1] * 65535).astype(np.uint16))
    (lq / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'garbage' * 10)
    opt = load_options(str(REPO / 'options' / 'test' / 'test_deplsr_cpu.yml'), is_train=False, overrides=[
        f'path.results_root={tmp_path / "results"}', f'datasets.demo.dataroot_lq={lq}', 'datasets.demo.dataroot_gt=null',
        'method.tile=24', 'method.tile_overlap=4'])
    opt['method']['weights'] = str(REPO / 'pretrained_models' / 'deplsr_cpu_x4')
    res = test(opt)
    d = res['dir'] / 'demo'
    recs = {r['key']: r for r in map(json.loads, (d / 'records.jsonl').read_text().splitlines())}
    assert {k: r['status'] for k, r in recs.items()} == {'plain': 'ok', 'gray': 'ok', 'rgba': 'ok', 'deep': 'ok',
                                                         'corrupt': 'failed'}
    outs = {k: cv2.imread(str(d / f'{k}.png'), cv2.IMREAD_UNCHANGED) for k in ('plain', 'gray', 'rgba', 'deep')}
    for k, out in outs.items():
        assert out.shape == (128, 160, 3) and out.dtype == np.uint8, k
    # an opaque alpha and the 16-bit copy of the same picture restore to (almost) the same pixels
    assert np.abs(outs['rgba'].astype(int) - outs['plain'].astype(int)).max() <= 1
    assert np.abs(outs['deep'].astype(int) - outs['plain'].astype(int)).mean() < 1.0
    # gray went through the same model as three equal channels: a different result from the colour one
    assert np.abs(outs['gray'].astype(int) - outs['plain'].astype(int)).mean() > 1.0
