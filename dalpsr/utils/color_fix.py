"""Color correction of diffusion outputs against the (upsampled) LR input.

Diffusion SR drifts in color; the usual fix (StableSR, SeeSR, DiffBIR) transfers the color of
the LR image onto the SR result. Three modes:

=========  ======================================================================================
mode       what it does
=========  ======================================================================================
adain      per image and channel, normalise the SR to zero mean / unit std and give it the mean
           and std of the reference (adaptive instance normalisation of statistics)
wavelet    keep the SR's high frequencies and take the low frequencies from the reference:
           ``high(sr) + low(ref)`` with an a-trous (dilated 3x3 binomial) wavelet of ``levels``
           levels (coarsest scale ~2**levels px)
none       return the SR unchanged
=========  ======================================================================================

All functions take float tensors ``[B, 3, H, W]`` in [0, 1]; the reference is resized to the SR
size with bicubic interpolation when sizes differ. Outputs are clamped to [0, 1] (``clamp=False``
keeps the raw values, used by tests).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

COLOR_FIX_MODES = ('adain', 'wavelet', 'none')


def _match_ref(ref: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    ref = ref.to(device=target.device, dtype=target.dtype)
    if ref.shape[-2:] != target.shape[-2:]:
        ref = F.interpolate(ref, size=target.shape[-2:], mode='bicubic', align_corners=False)
    return ref


def _check(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"color fix: '{name}' must be a [B, C, H, W] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")


def adain_color_fix(target: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5,
                    clamp: bool = True) -> torch.Tensor:
    """Give ``target`` [B,C,H,W] the per-channel mean/std of ``ref`` [B,C,h,w] (both [0,1])."""
    _check(target, 'target')
    _check(ref, 'ref')
    x = target.float()
    r = _match_ref(ref, target).float()
    t_mean = x.mean(dim=(2, 3), keepdim=True)
    t_std = x.std(dim=(2, 3), keepdim=True, unbiased=False)
    r_mean = r.mean(dim=(2, 3), keepdim=True)
    r_std = r.std(dim=(2, 3), keepdim=True, unbiased=False)
    out = (x - t_mean) / (t_std + eps) * r_std + r_mean
    if clamp:
        out = out.clamp(0, 1)
    return out.to(target.dtype)


def wavelet_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Dilated 3x3 binomial blur (dilation ``radius``), replicate padding; shape preserved."""
    k = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=x.dtype, device=x.device) / 16.0
    c = x.shape[1]
    k = k.expand(c, 1, 3, 3)
    xp = F.pad(x, (radius, radius, radius, radius), mode='replicate')  # any size works
    return F.conv2d(xp, k, groups=c, dilation=radius)


def wavelet_decompose(x: torch.Tensor, levels: int = 5):
    """Split ``x`` into (high, low) with ``high + low == x``; ``low`` is the residual after
    ``levels`` a-trous blurs with dilations 1, 2, 4, ..."""
    high = torch.zeros_like(x)
    low = x
    for i in range(levels):
        blurred = wavelet_blur(low, 2 ** i)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet_color_fix(target: torch.Tensor, ref: torch.Tensor, levels: int = 5,
                      clamp: bool = True) -> torch.Tensor:
    """``high(target) + low(ref)`` (see :func:`wavelet_decompose`); [B,3,H,W] in [0,1]."""
    _check(target, 'target')
    _check(ref, 'ref')
    x = target.float()
    r = _match_ref(ref, target).float()
    high, _ = wavelet_decompose(x, levels)
    _, low = wavelet_decompose(r, levels)
    out = high + low
    if clamp:
        out = out.clamp(0, 1)
    return out.to(target.dtype)


def color_fix(target: torch.Tensor, ref: torch.Tensor, mode: str = 'adain') -> torch.Tensor:
    """Apply the named color fix (``adain`` | ``wavelet`` | ``none``)."""
    mode = (mode or 'none').lower()
    if mode == 'adain':
        return adain_color_fix(target, ref)
    if mode == 'wavelet':
        return wavelet_color_fix(target, ref)
    if mode == 'none':
        return target
    raise ValueError(f"color_fix must be one of {', '.join(COLOR_FIX_MODES)}, got '{mode}'")
