"""FID through the path of scripts/iqa.py against the textbook Frechet distance.

Inception weights are not available offline, so the feature extractor inside pyiqa's FID is a small
fixed random network (8 features, recorded as they flow); everything else is the real path:
scripts/iqa.py -> evaluate_folders -> FIDMetric.score_folders (temporary folders of links) ->
pyiqa's clean-fid resize, mean/covariance and Frechet distance. The textbook value is

    d^2 = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))

with unbiased covariances and scipy.linalg.sqrtm, also in the symmetric form
Tr((S_1^(1/2) S_2 S_1^(1/2))^(1/2)).
"""
import json

import cv2
import numpy as np
import pytest
import scipy.linalg
import torch

from dalpsr.utils.img_io import read_image, write_image
from tests.script_loader import load_script

NUM_FEATURES = 8


class _TinyFeatures(torch.nn.Module):
    """Stand-in for pyiqa's InceptionV3 (same constructor and BLOCK_INDEX_BY_DIM): spatial mean and
    std of 4 fixed random filters of the 0..255 299x299 batch; records every output."""
    BLOCK_INDEX_BY_DIM = {64: 0, 192: 1, 768: 2, 2048: 3}
    seen = []

    def __init__(self, output_blocks=None, **kwargs):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, NUM_FEATURES // 2, 7, stride=4)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.1)
            self.conv.bias.zero_()

    def forward(self, x):
        assert x.shape[1:] == (3, 299, 299)
        y = self.conv(x / 255.0)
        feats = torch.cat([y.mean((2, 3)), y.std((2, 3))], 1)
        _TinyFeatures.seen.append(feats.double().numpy().copy())
        return feats


def textbook_fid(f1, f2, symmetric=False):
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    if symmetric:
        r1 = scipy.linalg.sqrtm(s1)
        cross = scipy.linalg.sqrtm(r1 @ s2 @ r1)
    else:
        cross = scipy.linalg.sqrtm(s1 @ s2)
    mean_term = float(((mu1 - mu2) ** 2).sum())
    cov_term = float(np.trace(s1) + np.trace(s2) - 2 * np.trace(cross).real)
    return mean_term, cov_term


@pytest.fixture
def two_folders(tmp_path, sample_paths):
    """Two different folders of 12 real photo crops each: clean 96 px crops, and other crops of the
    same photos blurred and with noise."""
    a, b = tmp_path / 'sr', tmp_path / 'gt'
    a.mkdir()
    b.mkdir()
    rng = np.random.default_rng(0)
    for i, p in enumerate(sample_paths['train'][:12]):
        img = read_image(p)
        h, w = img.shape[:2]
        write_image(a / f'{i:02d}.png', img[(h - 96) // 2:(h - 96) // 2 + 96, (w - 96) // 2:(w - 96) // 2 + 96])
        other = cv2.GaussianBlur(img[:96, -96:], (0, 0), 1.5) + rng.normal(0, 0.05, (96, 96, 3)).astype(np.float32)
        write_image(b / f'{i:02d}_x4.png', np.clip(other, 0, 1))
    return a, b


def test_fid_of_scripts_iqa_equals_textbook_frechet_distance(tmp_path, two_folders, monkeypatch):
    import pyiqa.archs.fid_arch as fid_arch
    from pyiqa.archs.inception import FID_WEIGHTS_URL
    from dalpsr.metrics.weights import _basename
    monkeypatch.setattr(fid_arch, 'InceptionV3', _TinyFeatures)
    monkeypatch.setattr(_TinyFeatures, 'seen', [])
    weights = tmp_path / 'w'
    (weights / 'pyiqa').mkdir(parents=True)
    (weights / 'pyiqa' / _basename(FID_WEIGHTS_URL)).write_bytes(b'')  # present; the stand-in never reads it
    sr, gt = two_folders
    out = tmp_path / 'out'
    iqa = load_script('iqa')
    rc = iqa.main(['--sr', str(sr), '--gt', str(gt), '--metrics', 'fid', '--out', str(out), '--weights-dir',
                   str(weights), '--no-progress', '--metric-opt', 'fid.batch_size=5'])
    assert rc == 0
    summary = json.loads((out / 'summary.json').read_text())
    fid = summary['results']['fid']
    assert fid['status'] == 'ok' and fid['sr_images'] == 12 and fid['gt_images'] == 12
    feats = np.concatenate(_TinyFeatures.seen)
    assert feats.shape == (24, NUM_FEATURES)  # SR folder first, then GT, in batches of 5
    f_sr, f_gt = feats[:12], feats[12:]
    mean_term, cov_term = textbook_fid(f_sr, f_gt)
    assert cov_term > 0.1 * mean_term > 0  # two different folders: both terms matter
    np.testing.assert_allclose(fid['mean'], mean_term + cov_term, rtol=1e-6, atol=1e-9)
    # the symmetric form of the covariance term is the same number
    np.testing.assert_allclose(textbook_fid(f_sr, f_gt, symmetric=True)[1], cov_term, rtol=1e-6, atol=1e-9)
    # the test can tell a wrong covariance estimate (biased, ddof=0) from the right one
    biased = (np.trace(np.cov(f_sr, rowvar=False, ddof=0)) + np.trace(np.cov(f_gt, rowvar=False, ddof=0))
              - 2 * np.trace(scipy.linalg.sqrtm(np.cov(f_sr, rowvar=False, ddof=0)
                                                @ np.cov(f_gt, rowvar=False, ddof=0))).real)
    assert abs(mean_term + biased - fid['mean']) > 1e3 * 1e-6 * fid['mean']
    # and the distance of a folder to itself is (numerically) zero
    monkeypatch.setattr(_TinyFeatures, 'seen', [])
    rc = iqa.main(['--sr', str(gt), '--gt', str(gt), '--metrics', 'fid', '--out', str(tmp_path / 'self'),
                   '--weights-dir', str(weights), '--no-progress'])
    assert rc == 0
    same = json.loads((tmp_path / 'self' / 'summary.json').read_text())['results']['fid']['mean']
    assert abs(same) < 1e-6 * fid['mean']
