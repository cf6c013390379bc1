"""SSP-IR through dalpsr/test.py (``method: {type: SSPIR}``) on odd real images with tiny stand-ins:
every input rule (gray, RGBA, 16-bit, corrupt files skipped), records with prompts and seeds,
resume; the tiny test options file from the command line."""
import json

import cv2
import numpy as np
import pytest

pytest.importorskip('dalpsr.inference', reason='test.py with method: blocks (dalpsr/inference) is not merged yet')

from dalpsr import test as T  # noqa: E402
from tests.test_inference_feed_forward import odd_set  # noqa: E402,F401 - fixture: plain, gray, RGBA, 16-bit, corrupt
from tests.test_sspir_restorer import export  # noqa: E402,F401 - fixture: a tiny SSP-IR export


def _opt(odd_set, export, results, name='sspir', **extra):
    opt = {'name': name, 'seed': 5, 'path': {'results_root': str(results)}, 'method': {'type': 'SSPIR'},
           'model': {'path': export['path'], 'device': 'cpu', 'dtype': 'fp32'},
           'sampler': {'scheduler': 'ddpm', 'num_steps': 2, 'guidance_scale': 7.5, 'added_prompt': 'clean'},
           'irpad': {'source': 'none'}, 'captioner': {'mode': 'none'},
           'metrics': {'names': ['psnr'], 'device': 'cpu'}, 'test': {'progress_bar': False, 'batch_size': 2},
           'datasets': {'odd': {'dataroot_lq': odd_set['lq'], 'dataroot_gt': odd_set['gt']}}}
    opt.update(extra)
    return opt


def _recs(d):
    return {r['key']: r for r in map(json.loads, (d / 'records.jsonl').read_text().splitlines())}


def test_sspir_through_test_py_on_odd_images(odd_set, export, tmp_path):
    caps = tmp_path / 'caps.jsonl'
    caps.write_text(json.dumps({'key': 'plain', 'description': 'a photo of a cat', 'tags': [], 'error': None}) + '\n')
    opt = _opt(odd_set, export, tmp_path)
    opt['datasets']['odd']['caption_file'] = str(caps)
    res = T.test(opt)
    d = res['dir'] / 'odd'
    recs = _recs(d)
    assert {k: r['status'] for k, r in recs.items()} == {'plain': 'ok', 'gray': 'ok', 'rgba': 'ok', 'deep': 'ok',
                                                          'corrupt': 'failed', 'text': 'failed'}
    for k in ('plain', 'gray', 'rgba', 'deep'):
        out = cv2.imread(str(d / f'{k}.png'), cv2.IMREAD_UNCHANGED)
        assert out.shape == (96, 128, 3) and out.dtype == np.uint8, k
        assert recs[k]['seed'] == T.image_seed(5, k) and 'psnr' in recs[k]['metrics']
    assert json.dumps(recs['plain']).count('a photo of a cat, clean') == 1  # the caption reached the prompt
    run = json.loads((res['dir'] / 'run.json').read_text())['fingerprint']
    assert run['method']['describe']['type'] == 'SSPIR'
    before = {p.name: p.stat().st_mtime_ns for p in d.glob('*.png')}
    again = T.test(opt)
    assert again['sets']['odd']['resumed'] == 4 and {p.name: p.stat().st_mtime_ns for p in d.glob('*.png')} == before


def test_sspir_tiny_options_file_runs_from_the_command_line(odd_set, export, tmp_path, repo_root):
    rc = T.main(['-opt', f'{repo_root}/options/test/test_sspir_tiny.yml', '--set', f"model.path={export['path']}",
                 '--set', f"datasets.demo.dataroot_lq={odd_set['lq']}", '--set', f'path.results_root={tmp_path}',
                 '--set', 'sampler.num_steps=2', '--set', 'test.progress_bar=false'])
    assert rc == 0
    s = json.loads((tmp_path / 'sspir_tiny_TINY_RANDOM_STAND-IN' / 'demo' / 'summary.json').read_text())
    assert (s['ok'], s['failed']) == (4, 2)
