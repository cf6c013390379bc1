"""Color fix: adain matches the reference statistics; wavelet keeps the reference's low
frequencies and the target's high frequencies."""
import pytest
import torch
import torch.nn.functional as F

from dalpsr.utils.color_fix import adain_color_fix, color_fix, wavelet_color_fix, wavelet_decompose


def _smooth_rand(b, h, w, seed, lo=0.2, hi=0.8):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, h // 8, w // 8, generator=g)
    x = F.interpolate(x, size=(h, w), mode='bilinear', align_corners=False)
    return lo + (hi - lo) * x


def test_adain_matches_reference_mean_and_std():
    g = torch.Generator().manual_seed(0)
    target = 0.3 + 0.1 * torch.rand(2, 3, 64, 48, generator=g)           # dull, shifted colors
    ref = _smooth_rand(2, 16, 12, 1)                                       # LR, other size
    out = adain_color_fix(target, ref, clamp=False)
    ref_up = F.interpolate(ref, size=(64, 48), mode='bicubic', align_corners=False)
    for b in range(2):
        for c in range(3):
            assert out[b, c].mean().item() == pytest.approx(ref_up[b, c].mean().item(), abs=1e-5)
            assert out[b, c].std(unbiased=False).item() == pytest.approx(ref_up[b, c].std(unbiased=False).item(), rel=1e-3)
    # the structure of the target is kept: per-channel correlation with the target is 1
    t = target[0, 0].flatten() - target[0, 0].mean()
    o = out[0, 0].flatten() - out[0, 0].mean()
    assert float((t @ o) / (t.norm() * o.norm())) == pytest.approx(1.0, abs=1e-5)


def test_wavelet_decomposition_is_exact_and_lowpass():
    x = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(3))
    high, low = wavelet_decompose(x, 5)
    assert torch.allclose(high + low, x, atol=1e-6)
    # low is smooth: much smaller pixel-to-pixel variation than the noise input
    assert (low[..., 1:] - low[..., :-1]).abs().mean() < 0.1 * (x[..., 1:] - x[..., :-1]).abs().mean()


def test_wavelet_keeps_low_frequencies_of_reference_and_detail_of_target():
    ref = _smooth_rand(1, 64, 64, 5)                                   # smooth colors
    detail = 0.05 * torch.sign(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6)))
    target = (ref * 0.5 + 0.1) + detail                                 # wrong colors + texture
    out = wavelet_color_fix(target, ref, clamp=False)
    _, low_out = wavelet_decompose(out, 5)
    _, low_ref = wavelet_decompose(ref, 5)
    _, low_tgt = wavelet_decompose(target, 5)
    err_out = (low_out - low_ref).abs().mean()
    err_tgt = (low_tgt - low_ref).abs().mean()
    assert err_out < 0.1 * err_tgt
    high_out, _ = wavelet_decompose(out, 5)
    high_tgt, _ = wavelet_decompose(target, 5)
    assert torch.corrcoef(torch.stack([high_out.flatten(), high_tgt.flatten()]))[0, 1] > 0.95
    # the output equals high(target) + low(ref) exactly
    assert torch.allclose(out, high_tgt + wavelet_decompose(ref, 5)[1], atol=1e-5)


def test_color_fix_modes_and_errors():
    t = torch.rand(1, 3, 32, 32)
    r = torch.rand(1, 3, 8, 8)
    assert torch.equal(color_fix(t, r, 'none'), t)
    for mode in ('adain', 'wavelet'):
        out = color_fix(t, r, mode)
        assert out.shape == t.shape and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match='color_fix must be one of'):
        color_fix(t, r, 'histogram')
    with pytest.raises(ValueError, match=r'\[B, C, H, W\]'):
        adain_color_fix(t[0], r)
