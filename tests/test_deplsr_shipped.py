"""The CPU-trained DePLSR model shipped in pretrained_models/deplsr_cpu_x4 loads through the restorer and
restores the shipped photos (none of them a training photo) better than bicubic on average: PSNR-Y
against their own HR after the Real-ESRGAN degradation (three fixed degradations each)."""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dalpsr.models.realdat_model import psnr_y
from dalpsr.restorers import build_restorer

WEIGHTS = Path(__file__).resolve().parents[1] / 'pretrained_models' / 'deplsr_cpu_x4'


def test_shipped_realdat_beats_bicubic(sample_paths):
    from dalpsr.data.degradations import RealESRGANDegradation
    from dalpsr.utils.img_io import read_image
    restorer = build_restorer({'type': 'RealDATRestorer', 'weights': str(WEIGHTS)})
    info = restorer.describe()
    assert info['arch'] == 'RealDAT' and info['srclip'] and info['scale'] == 4
    deg = RealESRGANDegradation(scale=4)
    gains = []
    for photo in sample_paths['val']:   # retina, ihc, grace_hopper: none of them seen in training
        hr = read_image(photo)[:256, :256]  # -> LR 64 x 64
        for seed in (0, 1, 2):
            out = deg(hr, np.random.default_rng(seed))
            gt = torch.from_numpy(out['gt']).permute(2, 0, 1)[None]
            lq = torch.from_numpy(out['lq']).permute(2, 0, 1)[None]
            sr = restorer.restore(lq, seeds=[0])
            bic = F.interpolate(lq, scale_factor=4, mode='bicubic', align_corners=False).clamp(0, 1)
            assert sr.shape == gt.shape
            gains.append(psnr_y(sr, gt, 2).item() - psnr_y(bic, gt, 2).item())
    # measured when shipped: +0.48 dB on average (retina +1.4, grace_hopper +0.07, ihc -0.06)
    assert np.mean(gains) > 0.25, gains


def test_demo_deplsr_writes_real_restorations(tmp_path, capsys):
    import json
    from tests.script_loader import load_script
    out = tmp_path / 'deplsr'
    demo = load_script('demo_deplsr')
    assert demo.main(['--out', str(out), '--num-images', '2', '--gt-size', '128']) == 0
    summary = json.loads((out / 'summary.json').read_text())
    assert len(summary['images']) == 2 and summary['model']['srclip']
    for sub in ('LR', 'SR', 'bicubic', 'GT'):
        assert len(list((out / sub).glob('*.png'))) == 2
    assert 'PSNR-Y DePLSR-CPU' in capsys.readouterr().out
    stamp = {p: p.stat().st_mtime_ns for p in (out / 'SR').iterdir()}
    assert demo.main(['--out', str(out), '--num-images', '2', '--gt-size', '128']) == 0
    assert stamp == {p: p.stat().st_mtime_ns for p in (out / 'SR').iterdir()}   # a rerun keeps finished images
    assert demo.main(['--weights', str(tmp_path / 'none'), '--out', str(tmp_path / 'x')]) == 2
