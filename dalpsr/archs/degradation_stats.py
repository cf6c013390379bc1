"""Hand-crafted degradation statistics of an LR image (no learned weights).

Classical no-reference estimators of the three degradations IRPAD classifies, computed on the
whole image (any size >= 16 x 16) and returned as one fixed-length vector per image, so a
small network trained on a CPU does not have to rediscover them from pixels:

* noise  (12): quantiles (2, 5, 10, 25, 50, 90 %) of the local std of the 3x3 high-pass
  residual of luma over 8x8 cells (the low quantiles sit in flat cells, where the residual is
  mostly noise), and the 5 / 25 % quantiles of the same per RGB channel (colour vs gray noise);
* sharpness (18): quantiles (50, 75, 90, 97, 99 %) of |horizontal/vertical differences| and
  (50, 90, 99 %) of |Laplacian| of luma, and the radial power spectrum of luma in 10 bands
  from DC to Nyquist, relative to the lowest band (the fall-off is the blur);
* JPEG (80): mean |difference| across each of the 8 column phases and 8 row phases, relative
  to their mean (block edges on the 8x8 grid stand out), and, for each of the 64 frequencies
  of the 8x8 DCT on the grid anchored at (0, 0), the fraction of blocks whose coefficient is
  below 1 in magnitude (quantisation zeroes high frequencies);
* exposure (5): mean luma, fractions of near-black (< 8) and near-white (> 247) pixels, the
  fraction of 8x8 cells of mid brightness (40..215) and the 10 % quantile of the residual std
  over those cells only (Poisson noise and clipping make visible noise depend on brightness,
  while the noise label is defined at mid-gray; these let a classifier correct for it).

Magnitudes are log-compressed. Output [B, NUM_FEATURES] float32; values are O(1)-O(10) and
not standardised (:class:`DegradationStatsTokens` normalises them with BatchNorm).
With them the CPU recipe's JPEG accuracy on the seed-2 held-out set went from 0.475 to 0.674
(both runs, and the commands, in docs/irpad.md, Results).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['degradation_statistics', 'DegradationStatsTokens', 'NUM_FEATURES', 'MIN_SIZE']

MIN_SIZE = 16
NUM_FEATURES = 12 + 18 + 80 + 5
_LUMA = (0.299, 0.587, 0.114)


def _quantiles(v: torch.Tensor, qs: Sequence[float]) -> torch.Tensor:
    """Row-wise quantiles by sorting (no size limit, unlike torch.quantile): v [B, n] -> [B, len(qs)]."""
    s = v.sort(dim=1).values
    n = s.shape[1]
    idx = torch.tensor([min(n - 1, max(0, int(round(q * (n - 1))))) for q in qs], device=v.device)
    return s[:, idx]


def _local_std(x: torch.Tensor) -> torch.Tensor:
    """x [B,1,h,w] -> std of its 3x3 high-pass residual per 8x8 cell, [B, cells]."""
    low = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode='replicate'), 3, stride=1)
    return F.avg_pool2d((x - low) ** 2, 8, 8).clamp_min(1e-6).sqrt().flatten(1)


def _dct_matrix(device) -> torch.Tensor:
    n = torch.arange(8, dtype=torch.float32, device=device)
    d = torch.cos(math.pi * (2 * n[None, :] + 1) * n[:, None] / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return d


@torch.no_grad()
def degradation_statistics(lq: torch.Tensor) -> torch.Tensor:
    """lq [B, 3, h, w] in [0, 1] (h, w >= 16) -> features [B, NUM_FEATURES] (float32)."""
    if lq.dim() != 4 or lq.shape[1] != 3:
        raise ValueError(f'degradation_statistics: expected lq [B, 3, h, w], got {tuple(lq.shape)}')
    b, _, h, w = lq.shape
    if h < MIN_SIZE or w < MIN_SIZE:
        raise ValueError(f'degradation_statistics: the LR must be at least {MIN_SIZE}x{MIN_SIZE}, got {h}x{w}')
    x = lq.float() * 255.0
    y = sum(c * x[:, i:i + 1] for i, c in enumerate(_LUMA))
    out = []
    # noise
    cell_std = _local_std(y)
    noise_q = _quantiles(cell_std, (.02, .05, .1, .25, .5, .9))
    out.append(torch.log(noise_q + 0.05))
    for i in range(3):
        out.append(torch.log(_quantiles(_local_std(x[:, i:i + 1]), (.05, .25)) + 0.05))
    # sharpness: differences, Laplacian, radial spectrum
    gx = y[..., :, 1:] - y[..., :, :-1]
    gy = y[..., 1:, :] - y[..., :-1, :]
    g = torch.cat([gx.abs().flatten(1), gy.abs().flatten(1)], 1)
    out.append(torch.log(_quantiles(g, (.5, .75, .9, .97, .99)) + 0.05))
    lap = (4 * y[..., 1:-1, 1:-1] - y[..., :-2, 1:-1] - y[..., 2:, 1:-1] - y[..., 1:-1, :-2] - y[..., 1:-1, 2:])
    out.append(torch.log(_quantiles(lap.abs().flatten(1), (.5, .9, .99)) + 0.05))
    yc = y[:, 0] - y[:, 0].mean(dim=(1, 2), keepdim=True)
    power = torch.fft.rfft2(yc).abs() ** 2
    radius = (torch.fft.fftfreq(h, device=y.device)[:, None] ** 2 + torch.fft.rfftfreq(w, device=y.device)[None, :] ** 2).sqrt()
    edges = torch.linspace(0, 0.5, 11, device=y.device)
    bands = []
    for i in range(10):
        m = ((radius >= edges[i]) & (radius < edges[i + 1])).float()
        bands.append((power * m).sum((1, 2)) / m.sum().clamp_min(1))
    bands = torch.log(torch.stack(bands, 1) + 1e-3)
    out.append(bands - bands[:, :1])
    # JPEG: blockiness per grid phase, DCT zero fractions on the (0, 0) grid
    dx = gx.abs().mean(dim=(1, 2))  # [B, w-1]
    dy = gy.abs().mean(dim=(1, 3))  # [B, h-1]
    for d in (dx, dy):
        ph = torch.stack([d[:, p::8].mean(1) for p in range(8)], 1)
        out.append(torch.log(ph / (ph.mean(1, keepdim=True) + 1e-3) + 1e-3))
    hh, ww = h // 8 * 8, w // 8 * 8
    blocks = (y[:, 0, :hh, :ww] - 128.0).unfold(1, 8, 8).unfold(2, 8, 8).reshape(b, -1, 8, 8)
    dct = _dct_matrix(y.device)
    coeff = dct @ blocks @ dct.T
    out.append((coeff.abs() < 1.0).float().mean(1).flatten(1))
    # exposure, and the noise of mid-brightness cells
    cell_mean = F.avg_pool2d(y, 8, 8).flatten(1)
    mid = (cell_mean > 40) & (cell_mean < 215)
    n_mid = mid.sum(1)
    ranked = torch.where(mid, cell_std, torch.full_like(cell_std, float('inf'))).sort(1).values
    k = (n_mid.float() * 0.1).long().clamp(max=ranked.shape[1] - 1)
    q_mid = ranked.gather(1, k[:, None])[:, 0]
    q_mid = torch.where(n_mid > 0, q_mid, noise_q[:, 2])  # no mid cell: the 10 % quantile of all cells
    out.append(torch.stack([y.mean((1, 2, 3)) / 255.0, (y < 8).float().mean((1, 2, 3)),
                            (y > 247).float().mean((1, 2, 3)), mid.float().mean(1), torch.log(q_mid + 0.05)], 1))
    feats = torch.cat(out, 1)
    assert feats.shape[1] == NUM_FEATURES
    return feats


class DegradationStatsTokens(nn.Module):
    """lq [B, 3, h, w] in [0, 1] -> ``num_tokens`` tokens [B, num_tokens, dim]: the statistics
    above, BatchNorm-standardised (running statistics are saved with the model) and mapped by a
    two-layer MLP. No gradient flows into the image through this path. A training batch of one
    sample is normalised with the running statistics (BatchNorm cannot use a batch of one)."""

    def __init__(self, dim: int, num_tokens: int = 4, hidden: int = 256):
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f'DegradationStatsTokens: num_tokens must be >= 1, got {num_tokens}')
        self.num_tokens, self.dim = int(num_tokens), int(dim)
        self.norm = nn.BatchNorm1d(NUM_FEATURES)
        self.mlp = nn.Sequential(nn.Linear(NUM_FEATURES, hidden), nn.GELU(), nn.Linear(hidden, self.num_tokens * self.dim))

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        f = degradation_statistics(lq).to(self.mlp[0].weight.dtype)
        if self.training and f.shape[0] == 1:  # batch statistics need 2+ samples: use the running ones
            n = self.norm
            f = F.batch_norm(f, n.running_mean, n.running_var, n.weight, n.bias, False, 0.0, n.eps)
        else:
            f = self.norm(f)
        return self.mlp(f).view(lq.shape[0], self.num_tokens, self.dim)
