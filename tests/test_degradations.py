"""RealESRGANDegradation: agreement with basicsr's helpers, recorded parameters, determinism."""
import json
import math

import numpy as np
import pytest
import torch

from dalpsr.data.degradations import (KERNEL_TYPES, RealESRGANDegradation, _filter, gaussian_family_kernel,
                                      kernel_from_params, sinc_kernel, usm_sharp)
from dalpsr.utils.registry import TRANSFORM_REGISTRY


@pytest.fixture(scope='module')
def bsr():
    from dalpsr.utils.basicsr_compat import basicsr_degradations, basicsr_img_process
    return basicsr_degradations(), basicsr_img_process()


@pytest.fixture(scope='module')
def photo():
    from dalpsr.data.sample_images import sample_image_paths
    from dalpsr.utils.img_io import read_image
    return read_image(sample_image_paths('train')[0])[:96, :128]


@pytest.mark.parametrize('ktype,size,sx,sy,theta,beta', [
    ('iso', 21, 2.3, 2.3, 0.0, 1.0), ('aniso', 15, 0.7, 2.9, 0.8, 1.0), ('aniso', 7, 3.0, 0.3, -2.5, 1.0),
    ('generalized_iso', 13, 1.4, 1.4, 0.0, 0.6), ('generalized_aniso', 21, 2.0, 0.9, 1.9, 3.1),
    ('plateau_iso', 11, 1.1, 1.1, 0.0, 1.7), ('plateau_aniso', 17, 2.5, 0.4, -0.4, 1.2)])
def test_kernels_match_basicsr(bsr, ktype, size, sx, sy, theta, beta):
    deg, _ = bsr
    iso = not ktype.endswith('aniso')
    if ktype in ('iso', 'aniso'):
        ref = deg.bivariate_Gaussian(size, sx, sy, theta, isotropic=iso)
    elif ktype.startswith('generalized'):
        ref = deg.bivariate_generalized_Gaussian(size, sx, sy, theta, beta, isotropic=iso)
    else:
        ref = deg.bivariate_plateau(size, sx, sy, theta, beta, isotropic=iso)
    ours = gaussian_family_kernel(ktype, size, sx, sy, theta, beta)
    assert ours.shape == (size, size)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize('omega,size', [(math.pi / 3, 7), (2.0, 13), (math.pi / 5, 21), (math.pi, 9)])
def test_sinc_matches_basicsr(bsr, omega, size):
    deg, _ = bsr
    np.testing.assert_allclose(sinc_kernel(omega, size), deg.circular_lowpass_kernel(omega, size), rtol=1e-6, atol=1e-10)


def test_filter_and_usm_match_basicsr(bsr, photo):
    _, proc = bsr
    k = gaussian_family_kernel('aniso', 15, 2.0, 0.6, 0.7)
    x = photo
    t = torch.from_numpy(x.transpose(2, 0, 1))[None]
    ref = proc.filter2D(t, torch.from_numpy(k).float()[None])[0].numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(_filter(x, k), ref, atol=2e-5)
    ref_usm = proc.USMSharp()(t)[0].numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(usm_sharp(x), ref_usm, atol=1e-4)


def test_output_contract_and_determinism(photo):
    d = RealESRGANDegradation()
    a = d(photo, np.random.default_rng(7))
    b = d(photo, np.random.default_rng(7))
    c = d(photo, np.random.default_rng(8))
    assert a['gt'].shape == (96, 128, 3) and a['lq'].shape == (24, 32, 3)
    assert a['lq'].dtype == np.float32 and a['gt'].dtype == np.float32
    assert a['lq'].min() >= 0 and a['lq'].max() <= 1
    np.testing.assert_allclose(a['lq'] * 255, np.rint(a['lq'] * 255), atol=1e-3)  # 8-bit grid
    np.testing.assert_array_equal(a['lq'], b['lq'])
    assert a['params'] == b['params'] and a['params'] != c['params']
    assert not np.array_equal(a['lq'], c['lq'])
    # params alone reproduce the sample, also after a JSON round trip
    p = json.loads(json.dumps(a['params']))
    _, lq = d.apply(photo, p)
    np.testing.assert_array_equal(lq, a['lq'])
    # x4plus defaults: the L1 / perceptual targets are the USM-sharpened GT, the GAN's real input is the GT as read
    np.testing.assert_array_equal(a['gt'], usm_sharp(photo))
    assert a['gt_percep'] is a['gt']
    np.testing.assert_array_equal(a['gt_gan'], photo)
    assert a['params']['gt_usm'] is True


def test_registered_and_bad_options():
    assert TRANSFORM_REGISTRY.get('RealESRGANDegradation') is RealESRGANDegradation
    with pytest.raises(ValueError, match='kernel_prob'):
        RealESRGANDegradation(kernel_prob=[1, 2])
    with pytest.raises(ValueError, match='blur_sigma'):
        RealESRGANDegradation(blur_sigma=[3, 1])
    with pytest.raises(ValueError, match='second_blur_prob'):
        RealESRGANDegradation(second_blur_prob=1.5)
    with pytest.raises(ValueError, match='unknown kernel'):
        RealESRGANDegradation(kernel_list=['iso', 'box'], kernel_prob=[1, 1])


def test_crop_to_scale_usm_and_too_small(photo):
    d = RealESRGANDegradation(gt_usm=True)
    out = d(photo[:95, :126], np.random.default_rng(0))
    assert out['gt'].shape == (92, 124, 3) and out['lq'].shape == (23, 31, 3)
    np.testing.assert_allclose(out['gt'], usm_sharp(np.ascontiguousarray(photo[:92, :124, ::-1]))[:, :, ::-1], atol=1e-6)
    assert not np.allclose(out['gt'], photo[:92, :124])
    with pytest.raises(ValueError, match='too small'):
        d(photo[:7, :40], np.random.default_rng(0))
    # tiny but legal inputs never crash, whatever the sampled resize
    for s in range(20):
        r = RealESRGANDegradation()(photo[:8, :12], np.random.default_rng(s))
        assert r['lq'].shape == (2, 3, 3)


def _sample(n, **kw):
    d = RealESRGANDegradation(**kw)
    rng = np.random.default_rng(2024)
    return [d.sample_params(rng) for _ in range(n)]


def _check_freq(values, expected, n, name):
    """Observed frequencies within 4.5 binomial standard deviations of the configured ones."""
    for key, p in expected.items():
        f = sum(v == key for v in values) / n
        tol = 4.5 * math.sqrt(max(p * (1 - p), 1e-4) / n)
        assert abs(f - p) <= tol, f"{name}={key}: observed {f:.3f}, configured {p:.3f}"


def test_recorded_parameter_distributions_match_config():
    n = 4000
    ps = _sample(n)
    d = RealESRGANDegradation()
    kprob = dict(zip(KERNEL_TYPES, (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)))
    for order, sigma, rr, rprob, nr, pr in (('order1', (0.2, 3.0), (0.15, 1.5), (0.2, 0.7, 0.1), (1, 30), (0.05, 3.0)),
                                            ('order2', (0.2, 1.5), (0.3, 1.2), (0.3, 0.4, 0.3), (1, 25), (0.05, 2.5))):
        st = [p[order] for p in ps]
        blur = [s['blur'] for s in st]
        _check_freq([b is not None for b in blur], {True: 1.0 if order == 'order1' else 0.8}, n, f'{order} blur applied')
        kern = [b for b in blur if b is not None]
        m = len(kern)
        _check_freq([k['type'] == 'sinc' for k in kern], {True: 0.1}, m, f'{order} sinc')
        gk = [k for k in kern if k['type'] != 'sinc']
        _check_freq([k['type'] for k in gk], kprob, len(gk), f'{order} kernel type')
        assert {k['size'] for k in kern} == set(range(7, 22, 2))
        _check_freq([k['size'] for k in kern], {s: 1 / 8 for s in range(7, 22, 2)}, m, f'{order} size')
        sx = np.array([k['sigma_x'] for k in gk])
        assert sx.min() >= sigma[0] and sx.max() <= sigma[1]
        assert abs(sx.mean() - sum(sigma) / 2) < 0.05 * (sigma[1] - sigma[0])
        for k in gk:
            if k['type'].endswith('aniso'):
                assert sigma[0] <= k['sigma_y'] <= sigma[1] and -math.pi <= k['theta'] <= math.pi
            else:
                assert k['sigma_y'] == k['sigma_x'] and k['theta'] == 0
            if k['type'].startswith('generalized'):
                assert 0.5 <= k['beta'] <= 4
            elif k['type'].startswith('plateau'):
                assert 1 <= k['beta'] <= 2
        for k in kern:
            if k['type'] == 'sinc':
                lo = math.pi / 3 if k['size'] < 13 else math.pi / 5
                assert lo <= k['omega'] <= math.pi
        rs = [s['resize'] for s in st]
        _check_freq([r['updown'] for r in rs], dict(zip(('up', 'down', 'keep'), rprob)), n, f'{order} resize')
        _check_freq([r['mode'] for r in rs], {'area': 1 / 3, 'bilinear': 1 / 3, 'bicubic': 1 / 3}, n, f'{order} mode')
        for r in rs:
            lo, hi = {'up': (1, rr[1]), 'down': (rr[0], 1), 'keep': (1, 1)}[r['updown']]
            assert lo <= r['scale'] <= hi
        ns = [s['noise'] for s in st]
        _check_freq([x['kind'] for x in ns], {'gaussian': 0.5, 'poisson': 0.5}, n, f'{order} noise kind')
        _check_freq([x['gray'] for x in ns], {True: 0.4}, n, f'{order} gray noise')
        g = np.array([x['sigma'] for x in ns if x['kind'] == 'gaussian'])
        q = np.array([x['scale'] for x in ns if x['kind'] == 'poisson'])
        assert g.min() >= nr[0] and g.max() <= nr[1] and abs(g.mean() - sum(nr) / 2) < 0.05 * (nr[1] - nr[0])
        assert q.min() >= pr[0] and q.max() <= pr[1] and abs(q.mean() - sum(pr) / 2) < 0.05 * (pr[1] - pr[0])
    fin = [p['final'] for p in ps]
    for j in [p['order1']['jpeg'] for p in ps] + [f['jpeg'] for f in fin]:
        assert isinstance(j, int) and 30 <= j <= 95
    assert abs(np.mean([f['jpeg'] for f in fin]) - 62.5) < 2
    _check_freq([f['order'] for f in fin], {'resize_sinc_jpeg': 0.5}, n, 'final order')
    _check_freq([f['sinc'] is not None for f in fin], {True: 0.8}, n, 'final sinc')
    for f in fin:
        if f['sinc']:
            assert math.pi / 3 <= f['sinc']['omega'] <= math.pi and f['sinc']['size'] in d.kernel_sizes
    assert len({p['noise_seed'] for p in ps}) == n


def test_overrides_change_the_distributions():
    ps = _sample(300, second_blur_prob=0.0, jpeg_range=[90, 90], jpeg_range2=[40, 41], final_sinc_prob=0.0,
                 resize_prob=[0, 0, 1], kernel_list=['iso'], kernel_prob=[1], sinc_prob=0.0, resize_modes=['bicubic'],
                 gaussian_noise_prob2=1.0, gray_noise_prob=0.0, final_order_prob=1.0, kernel_range=[9, 11])
    for p in ps:
        assert p['order2']['blur'] is None and p['order1']['jpeg'] == 90 and p['final']['jpeg'] in (40, 41)
        assert p['final']['sinc'] is None and p['order1']['resize'] == {'updown': 'keep', 'scale': 1.0, 'mode': 'bicubic'}
        assert p['order1']['blur']['type'] == 'iso' and p['order1']['blur']['size'] in (9, 11)
        assert p['order2']['noise']['kind'] == 'gaussian' and not p['order1']['noise']['gray']
        assert p['final']['order'] == 'resize_sinc_jpeg'


def test_noise_level_is_realised():
    """Only second-order gray Gaussian noise of sigma 20 on a flat image: the LR std is 20/255.
    (Gray noise, because JPEG's 4:2:0 chroma subsampling removes part of colour noise.)"""
    d = RealESRGANDegradation(blur_prob=0, second_blur_prob=0, final_sinc_prob=0, resize_prob=[0, 0, 1],
                              resize_prob2=[0, 0, 1], noise_range=[0, 0], gaussian_noise_prob=1,
                              gaussian_noise_prob2=1, noise_range2=[20, 20], gray_noise_prob2=1,
                              jpeg_range=[100, 100], jpeg_range2=[100, 100], resize_modes=['area'])
    gt = np.full((512, 512, 3), 0.5, np.float32)
    lq = d(gt, np.random.default_rng(3))['lq']
    assert lq.shape == (128, 128, 3)
    assert abs(lq.std() * 255 - 20) < 1.5
    assert np.abs(lq - lq[:, :, :1]).max() < 3 / 255  # gray noise: the same in every channel


def test_poisson_noise_scales_with_intensity():
    d = RealESRGANDegradation(blur_prob=0, second_blur_prob=0, final_sinc_prob=0, resize_prob=[0, 0, 1],
                              resize_prob2=[0, 0, 1], gaussian_noise_prob=1, noise_range=[0, 0],
                              gaussian_noise_prob2=0, poisson_scale_range2=[1, 1], gray_noise_prob2=1,
                              jpeg_range=[100, 100], jpeg_range2=[100, 100], resize_modes=['area'])
    gt = np.zeros((512, 512, 3), np.float32)
    gt[:, :256] = 0.2
    gt[:, 256:] = 0.8
    gt[:4] = np.linspace(0, 1, 512)[None, :, None]  # all 256 levels present -> vals = 256
    lq = d(gt, np.random.default_rng(5))['lq']
    dark, bright = lq[2:, 2:62].std(), lq[2:, 66:126].std()
    assert abs(bright * 255 - 255 * math.sqrt(0.8 / 256)) < 1.5  # scale * sqrt(x / vals)
    assert 1.6 < bright / dark < 2.4  # std ~ sqrt(intensity): sqrt(4) = 2


def test_kernel_from_params_normalised():
    for kp in ({'type': 'sinc', 'size': 9, 'omega': 1.5},
               {'type': 'plateau_aniso', 'size': 21, 'sigma_x': 0.3, 'sigma_y': 2.9, 'theta': 2.0, 'beta': 1.1}):
        k = kernel_from_params(kp)
        assert k.shape == (kp['size'],) * 2 and abs(k.sum() - 1) < 1e-9
