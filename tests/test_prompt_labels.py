"""Degrees, interval labels and restoration prompts."""
import copy
import itertools

import numpy as np
import pytest

from dalpsr.data.calibration import calibrate
from dalpsr.data.degradations import RealESRGANDegradation
from dalpsr.data.prompt_labels import CALIBRATION, DEGREE_TYPES, PromptSpec, degrees, interval_index, severity


@pytest.fixture(scope='module')
def default_params():
    d = RealESRGANDegradation()
    rng = np.random.default_rng(99)
    return [d.sample_params(rng) for _ in range(2000)]


def test_paper_prompt_format_and_parse():
    spec = PromptSpec()
    assert spec.prompt([2, 1, 0]) == ('Deblur with sigma 0.5~0.75, Denoise with sigma 0.25~0.5, '
                                      'Dejpeg with sigma 0~0.25')
    assert spec.candidates()[0] == ['Deblur with sigma 0~0.25', 'Deblur with sigma 0.25~0.5',
                                    'Deblur with sigma 0.5~0.75', 'Deblur with sigma 0.75~1']
    for lab in itertools.product(range(4), repeat=3):
        assert spec.parse(spec.prompt(lab)) == list(lab)
    assert spec.parse('Deblur with sigma 0.5~0.75,Denoise with sigma 0.25~0.5 ,  Dejpeg with sigma 0~0.25') == [2, 1, 0]
    with pytest.raises(ValueError, match='not a noise phrase'):
        spec.parse('Deblur with sigma 0.5~0.75, Denoise with sigma 0.3~0.5, Dejpeg with sigma 0~0.25')
    with pytest.raises(ValueError, match='expected 3'):
        spec.parse('Deblur with sigma 0.5~0.75')
    with pytest.raises(ValueError, match='labels must be'):
        spec.prompt([4, 0, 0])


def test_configurable_spec():
    spec = PromptSpec.from_opt({'types': ['noise', 'blur', 'resize'], 'num_intervals': 3, 'separator': '; ',
                                'templates': {'noise': 'remove noise of level {lo}-{hi}'}})
    assert spec.candidates()[0] == ['remove noise of level 0-0.3333', 'remove noise of level 0.3333-0.6667',
                                    'remove noise of level 0.6667-1']
    p = spec.prompt([2, 0, 1])
    assert p == 'remove noise of level 0.6667-1; Deblur with sigma 0~0.3333; Deresize with sigma 0.3333~0.6667'
    assert spec.parse(p) == [2, 0, 1]
    assert PromptSpec.from_opt(spec.to_opt()) == spec
    with pytest.raises(ValueError, match='unknown key'):
        PromptSpec.from_opt({'intervals': 4})
    with pytest.raises(ValueError, match='types'):
        PromptSpec(types=('blur', 'haze'))
    with pytest.raises(ValueError, match='lo'):
        PromptSpec(templates={'blur': 'Deblur'})
    with pytest.raises(ValueError, match='num_intervals'):
        PromptSpec(num_intervals=1)


def test_interval_edges_follow_the_paper():
    # [0, 0.25], (0.25, 0.5], (0.5, 0.75], (0.75, 1]
    assert [interval_index(x, 4) for x in (0.0, 0.1, 0.25, 0.2500001, 0.5, 0.50001, 0.75, 0.8, 1.0)] == \
        [0, 0, 0, 1, 1, 2, 2, 3, 3]
    assert [interval_index(x, 5) for x in (0.0, 0.2, 0.21, 0.99, 1.0)] == [0, 0, 1, 4, 4]


def test_every_interval_holds_at_least_10_percent(default_params):
    """With default options, over 2,000 samples each of K=4 intervals of each type holds >= 10 %."""
    spec = PromptSpec()
    labels = np.array([spec.labels(p) for p in default_params])
    assert labels.shape == (2000, 3)
    for i, t in enumerate(spec.types):
        frac = np.bincount(labels[:, i], minlength=4) / len(labels)
        assert frac.min() >= 0.10, f'{t}: interval fractions {frac}'
        # quantile calibration: close to uniform
        assert np.abs(frac - 0.25).max() < 0.05, f'{t}: interval fractions {frac}'
    # K = 5 is balanced too (calibration is per quantile, not per interval)
    spec5 = PromptSpec(num_intervals=5)
    lab5 = np.array([spec5.labels(p) for p in default_params[:1000]])
    for i in range(3):
        assert (np.bincount(lab5[:, i], minlength=5) / 1000).min() >= 0.10


def test_calibration_constants_are_current():
    """CALIBRATION was produced by calibrate(); a fresh small run agrees (catches a severity
    change without recalibration)."""
    fresh = calibrate(n=1500, seed=5)
    for t in ('blur', 'noise', 'jpeg'):
        knots = np.asarray(CALIBRATION[t])
        assert len(knots) == 21 and np.all(np.diff(knots) > 0)
        for q in (5, 10, 15):  # quartiles of the fresh run sit near the stored quartiles
            deg = np.interp(fresh[t][q], knots, np.linspace(0, 1, 21))
            assert abs(deg - q / 20) < 0.05, (t, q, deg)


def test_degrees_in_range_and_monotone(default_params):
    for p in default_params[:200]:
        d = degrees(p)
        assert set(d) == set(DEGREE_TYPES) and all(0.0 <= v <= 1.0 for v in d.values())
    base = copy.deepcopy(default_params[0])
    base['order1']['blur'] = {'type': 'iso', 'size': 21, 'sigma_x': 0.5, 'sigma_y': 0.5, 'theta': 0.0}
    base['order1']['noise'] = {'kind': 'gaussian', 'sigma': 5.0, 'gray': False}
    base['order2']['noise'] = {'kind': 'gaussian', 'sigma': 5.0, 'gray': False}
    base['final']['jpeg'] = 90
    d0 = degrees(base)
    more = copy.deepcopy(base)
    more['order1']['blur']['sigma_x'] = more['order1']['blur']['sigma_y'] = 2.5
    assert degrees(more)['blur'] > d0['blur']
    more = copy.deepcopy(base)
    more['order2']['noise']['sigma'] = 20.0
    assert degrees(more)['noise'] > d0['noise']
    more = copy.deepcopy(base)
    more['order1']['noise']['sigma'] = 20.0  # first-order noise counts, attenuated
    assert d0['noise'] < degrees(more)['noise']
    more = copy.deepcopy(base)
    more['final']['jpeg'] = 35
    assert degrees(more)['jpeg'] > d0['jpeg']
    # severities are physical: blur std in LR pixels grows with the downscale bottleneck
    more = copy.deepcopy(base)
    more['order2']['resize'] = {'updown': 'down', 'scale': 0.3, 'mode': 'area'}
    assert severity(more)['blur'] > severity(base)['blur']


def test_labels_depend_on_both_orders(default_params):
    """Labels change when only a first-order parameter changes (degrees use both orders)."""
    spec = PromptSpec()
    changed = 0
    for p in default_params[:100]:
        q = copy.deepcopy(p)
        q['order1']['jpeg'] = 95 if p['order1']['jpeg'] < 60 else 30
        q['order1']['noise'] = {'kind': 'gaussian', 'sigma': 1.0 if _lvl(p['order1']['noise']) > 15 else 30.0,
                                'gray': False}
        changed += spec.labels(q) != spec.labels(p)
    assert changed >= 10


def _lvl(n):
    return n['sigma'] if n['kind'] == 'gaussian' else n['scale'] * 11.3


# ---------------------------------------------------------------------------------------------
# noise_severity: measured
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def photo_crop():
    from dalpsr.data.sample_images import sample_image_paths
    from dalpsr.utils.img_io import read_image
    img = read_image(str(sample_image_paths('val')[-1]))  # grace_hopper.jpg
    return np.ascontiguousarray(img[100:228, 100:228], dtype=np.float32)


def _zero_noise(params):
    p = copy.deepcopy(params)
    for o in ('order1', 'order2'):
        p[o]['noise'].update(sigma=0.0, scale=0.0)
    return p


def test_measured_noise_is_the_rms_of_what_the_noise_changed(photo_crop):
    """The measurement does not change the sample, equals the RMS of lq minus the same chain
    rendered with zero noise (an independent replay), is 0 without noise and grows with sigma."""
    plain, meas = RealESRGANDegradation(), RealESRGANDegradation(measure_noise=True)
    for seed in range(6):
        a = plain(photo_crop, np.random.default_rng(seed))
        b = meas(photo_crop, np.random.default_rng(seed))
        assert np.array_equal(a['lq'], b['lq']) and 'measured' not in a['params']
        _, clean = plain.apply(photo_crop, _zero_noise(b['params']))
        ref = np.sqrt(np.mean((b['lq'].astype(np.float64) - clean) ** 2)) * 255.0
        assert b['params']['measured']['noise_rms'] == pytest.approx(ref, rel=1e-6, abs=1e-9)
    rms = []
    for sigma in (0.0, 4.0, 16.0):  # same draws (same seed), only the Gaussian level differs
        d = RealESRGANDegradation(measure_noise=True, gaussian_noise_prob=1.0, gaussian_noise_prob2=1.0,
                                  noise_range=(sigma, sigma), noise_range2=(sigma, sigma))
        rms.append([d(photo_crop, np.random.default_rng(s))['params']['measured']['noise_rms'] for s in range(4)])
    rms = np.array(rms)
    assert np.all(rms[0] == 0) and np.all(rms[1] > 0.3) and np.all(rms[2] > rms[1] + 1)


def test_measured_noise_labels(photo_crop):
    spec = PromptSpec(noise_severity='measured')
    assert spec.needs_measured_noise and spec.degradation_options({'scale': 4}) == {'scale': 4, 'measure_noise': True}
    assert not PromptSpec().needs_measured_noise and PromptSpec().degradation_options() == {}
    assert PromptSpec.from_opt(spec.to_opt()) == spec
    with pytest.raises(ValueError, match='noise_severity'):
        PromptSpec(noise_severity='guessed')
    out = RealESRGANDegradation(measure_noise=True)(photo_crop, np.random.default_rng(3))
    with pytest.raises(ValueError, match='measure_noise'):
        spec.labels(_zero_noise(out['params']) | {'measured': None})
    # the noise degree follows the measurement through the 'noise_measured' knots; the others
    # are those of the params
    p = out['params']
    d_meas, d_par = spec.degrees(p), PromptSpec().degrees(p)
    assert d_meas['blur'] == d_par['blur'] and d_meas['jpeg'] == d_par['jpeg']
    knots = CALIBRATION['noise_measured']
    assert d_meas['noise'] == pytest.approx(np.interp(p['measured']['noise_rms'], knots, np.linspace(0, 1, 21)))
    louder = copy.deepcopy(p)
    louder['measured']['noise_rms'] *= 3
    assert spec.degrees(louder)['noise'] > d_meas['noise']


def test_measured_noise_calibration_is_current():
    """CALIBRATION['noise_measured'] comes from calibrate_measured_noise(); a fresh small run agrees."""
    from dalpsr.data.calibration import calibrate_measured_noise
    knots = np.asarray(CALIBRATION['noise_measured'])
    assert len(knots) == 21 and np.all(np.diff(knots) > 0)
    fresh = calibrate_measured_noise(n=400, seed=5, workers=1)
    for q in (5, 10, 15):
        deg = np.interp(fresh[q], knots, np.linspace(0, 1, 21))
        assert abs(deg - q / 20) < 0.08, (q, deg)
