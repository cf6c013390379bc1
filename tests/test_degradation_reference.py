"""RealESRGANDegradation against Real-ESRGAN as basicsr assembles it (benchmarks/degradation_reference.py):
area / bilinear / bicubic resize = ``F.interpolate``, USM = basicsr's ``USMSharp`` with the x4plus target
choices, JPEG codec difference per op, and the whole chain in ``feed_data`` order with the reference's
recorded parameters and noise."""
import importlib.util
import math
import os

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dalpsr.data.degradations as D
from dalpsr.data.degradations import RealESRGANDegradation, usm_sharp

_REF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks',
                    'degradation_reference.py')


def _load_reference():
    spec = importlib.util.spec_from_file_location('degradation_reference', _REF)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope='module')
def refmod():
    return _load_reference()


@pytest.fixture(scope='module')
def reference(refmod):
    return refmod.BasicsrReference(gt_usm=True)


@pytest.fixture(scope='module')
def photo():
    from dalpsr.data.sample_images import sample_image_paths
    from dalpsr.utils.img_io import read_image
    return np.ascontiguousarray(read_image(sample_image_paths('train')[0])[:96, :128])


def _t(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


def _np(t):
    return t[0].detach().numpy().transpose(1, 2, 0)


@pytest.mark.parametrize('mode', ['area', 'bilinear', 'bicubic'])
def test_resize_equals_torch_interpolate(photo, mode):
    """Up and non-integer down factors, the first order's scale_factor form and the size form."""
    H, W = photo.shape[:2]
    worst = 0.0
    for s in (0.15, 0.37, 0.5, 0.8, 0.9691, 1.003, 1.3, 1.5):
        h, w = math.floor(H * s), math.floor(W * s)
        ours = D._resize(photo, h, w, mode, scale_factor=s)
        ref = _np(F.interpolate(_t(photo), scale_factor=s, mode=mode))
        assert ours.shape == ref.shape == (h, w, 3)
        worst = max(worst, float(np.abs(ours - ref).max()))
        for size in ((h, w), (int(H / 4 * s), int(W / 4 * s)), (H // 4, W // 4)):
            ours = D._resize(photo, *size, mode)
            ref = _np(F.interpolate(_t(photo), size=size, mode=mode))
            worst = max(worst, float(np.abs(ours - ref).max()))
    assert worst <= 1e-6, f'{mode}: max |ours - F.interpolate| = {worst}'


def test_the_resize_test_would_see_opencv_area(photo):
    """OpenCV's INTER_AREA (what the pipeline used before) differs from F.interpolate(mode='area')
    by far more than the tolerance above for up and non-integer down factors (and not for x1/2)."""
    t = _t(photo)
    for s, expect_diff in ((1.3, True), (0.37, True), (0.8, True), (0.5, False)):
        h, w = math.floor(photo.shape[0] * s), math.floor(photo.shape[1] * s)
        d = np.abs(cv2.resize(photo, (w, h), interpolation=cv2.INTER_AREA) - _np(F.interpolate(t, size=(h, w), mode='area')))
        assert (d.max() > 0.02) == expect_diff, (s, d.max())


def test_usm_and_loss_targets_match_basicsr_usmsharp(photo, reference):
    sharp_ref = _np(reference.usm_sharpener(_t(photo)))
    assert np.abs(sharp_ref - photo).max() > 0.05  # the photo does get sharpened
    rng_seed = 11
    d = RealESRGANDegradation()  # x4plus: gt_usm, l1_gt_usm, percep_gt_usm true; gan_gt_usm false
    out = d(photo, np.random.default_rng(rng_seed))
    np.testing.assert_allclose(out['gt'], sharp_ref, atol=1e-4)
    np.testing.assert_allclose(out['gt_percep'], sharp_ref, atol=1e-4)
    np.testing.assert_array_equal(out['gt_gan'], photo)
    # the LR is made from the sharpened GT: same as degrading basicsr's USMSharp output without USM
    p = dict(out['params'], gt_usm=False)
    _, lq_from_ref_sharp = RealESRGANDegradation(gt_usm=False).apply(sharp_ref, p)
    _, lq_unsharpened = RealESRGANDegradation(gt_usm=False).apply(photo, p)
    close = np.abs(out['lq'] - lq_from_ref_sharp).mean()
    assert close < 0.05 / 255, close
    assert np.abs(out['lq'] - lq_unsharpened).mean() > 10 * max(close, 0.05 / 255)
    # every choice of the three targets
    for l1, percep, gan in ((False, False, False), (True, False, True), (False, True, False)):
        o = RealESRGANDegradation(l1_gt_usm=l1, percep_gt_usm=percep, gan_gt_usm=gan)(photo, np.random.default_rng(rng_seed))
        np.testing.assert_array_equal(o['lq'], out['lq'])  # the LR does not depend on the targets
        for key, usm in (('gt', l1), ('gt_percep', percep), ('gt_gan', gan)):
            if usm:
                np.testing.assert_allclose(o[key], sharp_ref, atol=1e-4)
            else:
                np.testing.assert_array_equal(o[key], photo)
    with pytest.raises(ValueError, match='gan_gt_usm'):
        RealESRGANDegradation(gan_gt_usm='no')


def test_dataset_items_carry_the_targets(tmp_path):
    from dalpsr.data.triplet_dataset import TripletDataset
    kw = dict(dataroot_gt='sample:train', gt_size=64, use_hflip=False, use_rot=False, seed=3)
    item = TripletDataset(**kw)[0]
    assert set(item) >= {'gt', 'gt_gan'} and 'gt_percep' not in item
    crop = item['gt_gan'].numpy().transpose(1, 2, 0)
    np.testing.assert_array_equal(item['gt'].numpy().transpose(1, 2, 0), usm_sharp(crop))
    plain = TripletDataset(degradation={'l1_gt_usm': False, 'percep_gt_usm': False}, **kw)[0]
    assert 'gt_gan' not in plain and 'gt_percep' not in plain
    np.testing.assert_array_equal(plain['gt'], item['gt_gan'])
    assert torch.equal(plain['lq'], item['lq'])
    both = TripletDataset(degradation={'l1_gt_usm': False, 'gan_gt_usm': True}, **kw)[0]
    assert torch.equal(both['gt_percep'], item['gt']) and torch.equal(both['gt_gan'], item['gt'])


def _diffjpeg(reference):
    def jpeg(img_bgr, quality):
        with torch.no_grad():
            out = reference.jpeger(_t(np.ascontiguousarray(img_bgr[:, :, ::-1])).clamp(0, 1),
                                   quality=torch.tensor([float(quality)]))
        return np.ascontiguousarray(_np(out)[:, :, ::-1])
    return jpeg


def test_jpeg_codec_per_op_tolerance(photo, reference):
    """OpenCV's libjpeg (ours) vs basicsr's DiffJPEG at the same quality: two codecs, so pixel values
    differ (a few levels on average), but they lose the same amount: mean error vs the input within
    0.5 level of each other, clean and noisy, low and high quality."""
    rng = np.random.default_rng(0)
    dj = _diffjpeg(reference)
    for sigma in (0, 10):
        x = np.clip(photo + rng.standard_normal(photo.shape).astype(np.float32) * sigma / 255, 0, 1)
        bgr = np.ascontiguousarray(x[:, :, ::-1])
        for q in (30, 60, 95):
            ours, ref = D._jpeg(bgr, q), dj(bgr, q)
            diff = np.abs(ours - ref).mean() * 255
            e_ours, e_ref = np.abs(ours - bgr).mean() * 255, np.abs(ref - bgr).mean() * 255
            assert diff < 4.5, (sigma, q, diff)
            assert abs(e_ours - e_ref) < 0.5, (sigma, q, e_ours, e_ref)


def test_whole_chain_equals_the_reference_with_its_recorded_parameters(refmod, reference, monkeypatch):
    """The reference draws and records every choice (kernels, resize direction/factor/mode, noise,
    JPEG qualities, final order) and the noise it added; our degradation replays them with
    ``apply``. With the JPEG codec the same (DiffJPEG in both), the LR is the reference's to
    within one 8-bit level at < 0.1 % of pixels (in practice identical); with our libjpeg the mean
    difference stays within the codec's per-op tolerance (test above, 4.5 levels) times the chain's
    two JPEG stages (measured: 2.9-7.2 levels on these 8 samples)."""
    crops = refmod.make_crops(4, 96, 0)
    deg = RealESRGANDegradation()
    seen = set()
    dj = _diffjpeg(reference)
    for seed in range(8):
        crop = crops[seed % 4]
        reference.seed(seed)
        with refmod.Recorder(reference.deg) as rec:
            lq_ref, (params,) = reference.run_batch([crop], rec)
        lq_ref = _np(lq_ref)
        noises = [np.ascontiguousarray(_np(n)[:, :, ::-1]) for n in rec.noise_tensors]
        assert len(noises) == 2
        params['noise_seed'] = 0
        seen.update({params['order1']['resize']['mode'] + '1', params['order2']['resize']['mode'] + '2',
                     params['final']['order'], params['order1']['resize']['updown']})
        for codec in ('diffjpeg', 'ours'):
            it = iter(noises)
            monkeypatch.setattr(D, '_add_noise', lambda img, noise, rng: np.clip(img + next(it), 0, 1))
            if codec == 'diffjpeg':
                monkeypatch.setattr(D, '_jpeg', dj)
            _, lq = deg.apply(crop, params)
            monkeypatch.undo()
            assert lq.shape == lq_ref.shape == (24, 24, 3)
            d = np.abs(lq - lq_ref) * 255
            if codec == 'diffjpeg':
                assert d.max() <= 1.0 + 1e-3 and (d > 0.5).mean() < 1e-3, (seed, d.max(), (d > 0.5).mean())
            else:
                assert d.mean() < 2 * 4.5, (seed, d.mean())
    # the seeds exercised every resize mode of both orders, both final orders, up and down
    assert {'area1', 'bilinear1', 'bicubic1', 'area2', 'bilinear2', 'bicubic2', 'resize_sinc_jpeg',
            'jpeg_resize_sinc', 'up', 'down'} <= seen, seen
