"""Hand-crafted degradation statistics (dalpsr/archs/degradation_stats.py): each group of
features moves the way its degradation says, on a real photo."""
import cv2
import numpy as np
import pytest
import torch

from dalpsr.archs.degradation_stats import NUM_FEATURES, degradation_statistics
from dalpsr.archs.irpad_arch import IRPAD, ConvEncoder

NOISE = slice(0, 6)          # luma local-std quantiles
SPECTRUM = slice(20, 30)     # radial power bands relative to the lowest
BLOCK_X = slice(30, 38)      # column-phase blockiness
DCT = slice(46, 110)         # zero fractions of the 64 DCT frequencies


@pytest.fixture(scope='module')
def photo():
    from dalpsr.data.sample_images import sample_image_paths
    path = [p for p in sample_image_paths('train') if 'astronaut' in str(p)][0]
    img = cv2.imread(str(path))[64:192, 160:288]
    return np.ascontiguousarray(img)


def _t(img_bgr):
    return torch.from_numpy(img_bgr[..., ::-1].copy()).permute(2, 0, 1)[None].float() / 255.0


def _jpeg(img, q):
    ok, buf = cv2.imencode('.jpg', img, [cv2.IMWRITE_JPEG_QUALITY, q])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)


def test_features_follow_noise_blur_and_jpeg(photo):
    rng = np.random.default_rng(0)
    clean = _t(photo)
    f = lambda x: degradation_statistics(x)[0]  # noqa: E731
    base = f(clean)
    assert base.shape == (NUM_FEATURES,) and torch.isfinite(base).all()
    # noise: every luma quantile rises, more with more noise
    levels = [f((clean + s / 255.0 * torch.from_numpy(rng.standard_normal(clean.shape)).float()).clamp(0, 1))
              for s in (3, 10)]
    assert (levels[0][NOISE] > base[NOISE]).all() and (levels[1][NOISE] > levels[0][NOISE]).all()
    # blur: the high-frequency bands fall relative to the low ones, more with a wider kernel
    b1 = f(_t(cv2.GaussianBlur(photo, (0, 0), 1.0)))
    b2 = f(_t(cv2.GaussianBlur(photo, (0, 0), 2.0)))
    mid = lambda v: v[SPECTRUM][2:7].mean()  # noqa: E731  (0.1-0.35 cycles/px; higher bands sit on the 8-bit floor)
    assert mid(b1) < mid(base) - 0.3 and mid(b2) < mid(b1) - 0.3
    # JPEG on the (0, 0) grid: more zeroed DCT coefficients and block edges at phase 7 (between
    # columns 8k+7 and 8k+8) the lower the quality
    q90, q20 = f(_t(_jpeg(photo, 90))), f(_t(_jpeg(photo, 20)))
    assert q20[DCT].mean() > q90[DCT].mean() + 0.1 > base[DCT].mean() + 0.1
    assert int(q20[BLOCK_X].argmax()) == 7 and q20[BLOCK_X][7] > q90[BLOCK_X][7]


def test_any_size_batch_independence_and_bad_input(photo):
    x = _t(photo)
    big = torch.cat([x, x.flip(-1)], 0)
    assert torch.allclose(degradation_statistics(big)[0], degradation_statistics(x)[0])
    assert degradation_statistics(torch.rand(1, 3, 16, 37)).shape == (1, NUM_FEATURES)
    with pytest.raises(ValueError, match='at least 16x16'):
        degradation_statistics(torch.rand(1, 3, 12, 40))
    with pytest.raises(ValueError, match=r'\[B, 3, h, w\]'):
        degradation_statistics(torch.rand(3, 32, 32))


def test_conv_encoder_statistics_tokens_train_and_round_trip(tmp_path):
    torch.manual_seed(0)
    enc = ConvEncoder(channels=(8, 16), stat_tokens=True, dstat_tokens=3)
    tok = enc(torch.rand(4, 3, 32, 32))
    assert tok.shape == (4, 16 * 16 + 2 + 3, 16)
    (tok * torch.randn_like(tok)).sum().backward()
    assert enc.dstat.mlp[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match='dstat_tokens must be >= 0'):
        ConvEncoder(dstat_tokens=-1)
    # the BatchNorm running statistics are part of the saved model
    from dalpsr.data.prompt_labels import PromptSpec
    from dalpsr.models.irpad_model import IRPADPredictor, save_irpad
    popt = {'types': ['blur', 'noise', 'jpeg'], 'num_intervals': 4}
    spec = PromptSpec.from_opt(popt)
    cfg = {'image_encoder': {'type': 'conv', 'channels': [8, 16], 'dstat_tokens': 2},
           'prompt_embedding': {'type': 'learnable'}, 'embed_dim': 16, 'num_heads': 2}
    net = IRPAD(num_types=3, num_intervals=4, candidates=spec.candidates(), **cfg)
    net.train()
    for _ in range(3):
        net(torch.rand(4, 3, 24, 24))
    net.eval()
    assert net.image_encoder.dstat.norm.num_batches_tracked.item() == 3
    save_irpad(net, popt, str(tmp_path / 'export'))
    pred = IRPADPredictor.from_pretrained(str(tmp_path / 'export'))
    lq = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        assert torch.allclose(pred.predict_logits(lq), net(lq), atol=1e-5)


def test_exposure_features_see_clipping_and_mid_gray_noise(photo):
    exposure = slice(110, 115)
    x = _t(photo)
    dark = degradation_statistics(x * 0.05)[0][exposure]
    base = degradation_statistics(x)[0][exposure]
    assert dark[0] < base[0] and dark[1] > 0.5 > base[1]          # mean luma, near-black fraction
    assert dark[3] < base[3]                                         # fewer mid-brightness cells
    flat = torch.full((1, 3, 64, 64), 0.5)
    noisy = (flat + 5 / 255.0 * torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    e0, e1 = degradation_statistics(flat)[0][exposure], degradation_statistics(noisy)[0][exposure]
    assert e0[3] == 1.0 and e1[4] > e0[4] + 2.0                      # all cells mid; noise raises their std


def test_statistics_tokens_accept_a_training_batch_of_one():
    from dalpsr.archs.degradation_stats import DegradationStatsTokens
    torch.manual_seed(0)
    tok = DegradationStatsTokens(dim=8, num_tokens=2).train()
    tok(torch.rand(4, 3, 32, 32))                     # updates the running statistics
    mean = tok.norm.running_mean.clone()
    one = tok(torch.rand(1, 3, 32, 32))
    assert one.shape == (1, 2, 8) and torch.isfinite(one).all()
    assert torch.equal(tok.norm.running_mean, mean)   # a single sample does not move them


def test_v2_edge_features_measure_blur_width_not_contrast(photo):
    from dalpsr.archs.degradation_stats import NUM_EDGE_FEATURES, num_features
    assert num_features('v2') == NUM_FEATURES + NUM_EDGE_FEATURES
    x = _t(photo)
    v1, v2 = degradation_statistics(x)[0], degradation_statistics(x, 'v2')[0]
    assert v2.shape == (num_features('v2'),) and torch.isfinite(v2).all()
    assert torch.equal(v2[:NUM_FEATURES], v1)                        # v2 extends v1
    width = slice(NUM_FEATURES, NUM_FEATURES + 12)                   # log edge-width ratios
    fine = slice(NUM_FEATURES + 12, NUM_FEATURES + 26)               # Hann-windowed spectrum
    scale = slice(NUM_FEATURES + 40, NUM_FEATURES + 44)              # full / half-scale gradients
    f = lambda img: degradation_statistics(_t(img), 'v2')[0]  # noqa: E731
    b1, b2 = f(cv2.GaussianBlur(photo, (0, 0), 1.0)), f(cv2.GaussianBlur(photo, (0, 0), 2.0))
    assert (b1[width] > v2[width]).all() and (b2[width] > b1[width] + 0.1).all()
    assert b2[fine][4:10].mean() < b1[fine][4:10].mean() - 0.3 < v2[fine][4:10].mean() - 0.3
    assert b2[scale].mean() < b1[scale].mean() < v2[scale].mean()
    # the edge width is a ratio: halving the contrast (float image, no 8-bit rounding) barely moves it
    soft = 0.25 + 0.5 * cv2.GaussianBlur(photo, (0, 0), 1.0).astype(np.float32) / 255.0
    soft = torch.from_numpy(soft[..., ::-1].copy()).permute(2, 0, 1)[None]
    assert (degradation_statistics(soft, 'v2')[0][width] - b1[width]).abs().max() < 0.15
    with pytest.raises(ValueError, match="feature_set must be one of"):
        degradation_statistics(x, 'v4')


def test_v3_reblur_features_grow_with_blur_and_ignore_contrast(photo):
    from dalpsr.archs.degradation_stats import NUM_EDGE_FEATURES, NUM_REBLUR_FEATURES, num_features
    n2 = NUM_FEATURES + NUM_EDGE_FEATURES
    assert num_features('v3') == n2 + NUM_REBLUR_FEATURES
    f = lambda img: degradation_statistics(_t(img) if isinstance(img, np.ndarray) else img, 'v3')[0]  # noqa: E731
    x = f(photo)
    assert x.shape == (num_features('v3'),) and torch.isfinite(x).all()
    assert torch.equal(x[:n2], degradation_statistics(_t(photo), 'v2')[0])   # v3 extends v2
    kept = [n2 + i for i in range(22) if i % 11 < 9]       # log(after / before re-blur) at the strongest gradients
    lap = slice(n2 + 22, n2 + 31)                          # log(|Laplacian| / gradient) there
    b1, b2 = f(cv2.GaussianBlur(photo, (0, 0), 1.0)), f(cv2.GaussianBlur(photo, (0, 0), 2.0))
    # a blurrier image keeps more of its gradient when blurred again, and has less curvature per slope
    assert x[kept].mean() < b1[kept].mean() - 0.1 < b2[kept].mean() - 0.2
    assert (b2[kept] > x[kept]).float().mean() > 0.9
    assert x[lap].mean() > b1[lap].mean() + 0.1 > b2[lap].mean() + 0.2
    # ratios: halving the contrast of a float image barely moves them
    soft = 0.25 + 0.5 * cv2.GaussianBlur(photo, (0, 0), 1.0).astype(np.float32) / 255.0
    soft = torch.from_numpy(soft[..., ::-1].copy()).permute(2, 0, 1)[None]
    assert (f(soft)[kept] - b1[kept]).abs().max() < 0.15


def test_conv_encoder_v2_statistics_tokens_round_trip(tmp_path):
    from dalpsr.archs.degradation_stats import num_features
    from dalpsr.data.prompt_labels import PromptSpec
    from dalpsr.models.irpad_model import IRPADPredictor, save_irpad
    torch.manual_seed(0)
    popt = {'types': ['blur', 'noise', 'jpeg'], 'num_intervals': 4}
    cfg = {'image_encoder': {'type': 'conv', 'channels': [8, 16], 'dstat_tokens': 2, 'dstat_features': 'v2'},
           'prompt_embedding': {'type': 'learnable'}, 'embed_dim': 16, 'num_heads': 2}
    net = IRPAD(num_types=3, num_intervals=4, candidates=PromptSpec.from_opt(popt).candidates(), **cfg)
    assert net.image_encoder.dstat.norm.num_features == num_features('v2')
    net.train()
    net(torch.rand(4, 3, 24, 24))
    net.eval()
    save_irpad(net, popt, str(tmp_path / 'export'))
    pred = IRPADPredictor.from_pretrained(str(tmp_path / 'export'))
    assert pred.net.image_encoder.dstat.feature_set == 'v2'
    lq = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        assert torch.allclose(pred.predict_logits(lq), net(lq), atol=1e-5)


def test_statistics_tokens_dropout_acts_in_training_only_and_keeps_the_weight_names():
    from dalpsr.archs.degradation_stats import DegradationStatsTokens
    torch.manual_seed(0)
    plain, drop = DegradationStatsTokens(8, 2), DegradationStatsTokens(8, 2, dropout=0.5)
    assert list(plain.state_dict()) == list(drop.state_dict())      # exports/checkpoints load either way
    drop.load_state_dict(plain.state_dict())
    f = torch.randn(6, NUM_FEATURES)
    plain.eval(), drop.eval()
    assert torch.equal(plain.from_features(f), drop.from_features(f))  # no dropout at inference
    drop.train()
    drop.norm.momentum = 0.0
    a, b = drop.from_features(f), drop.from_features(f)
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match='dropout'):
        DegradationStatsTokens(8, 2, dropout=1.0)
