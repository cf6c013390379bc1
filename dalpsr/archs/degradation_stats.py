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

Feature set ``'v2'`` appends 44 blur features (``'v1'``, the default, is the 115 above):

* edge width (12): at the 2 % and 10 % pixels of strongest luma gradient (central differences),
  the ratio of the local range (max - min over a 5x5 and a 9x9 window) to the gradient
  magnitude, quantiles (10, 25, 50 %). For a step edge of contrast C under a Gaussian blur of
  std s the peak slope is C / (s sqrt(2 pi)), so the ratio grows linearly with the blur and does
  not depend on the contrast (the classical edge-width estimator);
* fine spectrum (14): the radial power spectrum of the Hann-windowed luma in 16 bands, bands
  2..15 relative to band 1 (the window removes the border leakage that flattens the fall-off
  of small crops);
* anisotropy (14): the power along each axis (8 bands of |f_x| within |f_y| < 0.06, and the
  transpose), bands 1..7 relative to band 0 (anisotropic and motion-like kernels);
* scale (4): the 50/90/97/99 % quantiles of the gradient magnitude at full resolution relative
  to those after 2x2 averaging (a sharp image loses more of its gradient to the averaging).

Feature set ``'v3'`` appends 31 more (re-blur, the classical no-reference blur estimator: an
image that is already blurred loses less of its gradient when blurred again):

* re-blur (22): for a Gaussian re-blur of std 1 and of std 2.5 (LR pixels), the ratio of the
  gradient magnitude after to before at the 1 %, 5 % and 20 % pixels of strongest gradient,
  quantiles (25, 50, 75 %), and the ratio of the 90 / 99 % gradient quantiles of the whole image.
  A Gaussian edge of std s re-blurred by r keeps ``s / sqrt(s^2 + r^2)`` of its peak slope;
* Laplacian over gradient (9): at the same pixels, |Laplacian| / gradient magnitude, quantiles
  (25, 50, 75 %) (about 1 / s near a blurred edge).

On the seed-2 choice set of docs/irpad.md a classifier on the statistics alone reads blur at
0.586 from v1 and at 0.633 from v2 (``scripts/irpad_feature_probe.py --features v1|v2``, the
command in docs/irpad.md); what v3 adds there: docs/irpad.md, Results.

Magnitudes are log-compressed. Output [B, num_features(feature_set)] float32; values are O(1)-O(10) and
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

__all__ = ['degradation_statistics', 'DegradationStatsTokens', 'NUM_FEATURES', 'MIN_SIZE', 'FEATURE_SETS',
           'num_features']

MIN_SIZE = 16
NUM_FEATURES = 12 + 18 + 80 + 5          # feature set 'v1'
NUM_EDGE_FEATURES = 12 + 14 + 14 + 4     # added by 'v2'
NUM_REBLUR_FEATURES = 2 * (9 + 2) + 9    # added by 'v3' (after the 'v2' ones)
FEATURE_SETS = ('v1', 'v2', 'v3')
_REBLUR_STDS = (1.0, 2.5)
_TOP_FRACTIONS = (0.01, 0.05, 0.2)


def num_features(feature_set: str = 'v1') -> int:
    """Length of the feature vector of ``feature_set`` ('v1', 'v2' or 'v3')."""
    if feature_set not in FEATURE_SETS:
        raise ValueError(f'degradation statistics: feature_set must be one of {list(FEATURE_SETS)}, got {feature_set!r}')
    return (NUM_FEATURES + (NUM_EDGE_FEATURES if feature_set in ('v2', 'v3') else 0)
            + (NUM_REBLUR_FEATURES if feature_set == 'v3' else 0))
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


def _gradient_magnitude(y: torch.Tensor) -> torch.Tensor:
    """y [B,1,h,w] -> |central-difference gradient| [B,1,h,w] (replicate borders)."""
    gx = F.pad(y, (1, 1, 0, 0), mode='replicate')
    gy = F.pad(y, (0, 0, 1, 1), mode='replicate')
    return torch.hypot((gx[..., 2:] - gx[..., :-2]) * 0.5, (gy[..., 2:, :] - gy[..., :-2, :]) * 0.5)


def _band_powers(power: torch.Tensor, coord: torch.Tensor, edges: torch.Tensor, mask=None) -> torch.Tensor:
    """Mean of ``power`` [B, h, w'] over ``edges[i] <= coord < edges[i+1]`` (and ``mask``) -> log [B, bands]."""
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (coord >= lo) & (coord < hi)
        if mask is not None:
            m = m & mask
        m = m.float()
        out.append((power * m).sum((1, 2)) / m.sum().clamp_min(1))
    return torch.log(torch.stack(out, 1) + 1e-3)


def _edge_statistics(y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The 'v2' blur features (module doc) of luma y [B,1,h,w] in [0, 255], its gradient magnitude
    ``g`` [B, h*w] (:func:`_gradient_magnitude`, flattened) -> [B, NUM_EDGE_FEATURES]."""
    b, _, h, w = y.shape
    out = []
    for win in (5, 9):
        p = win // 2
        yp = F.pad(y, (p, p, p, p), mode='replicate')
        both = torch.cat([yp, -yp], 1)   # max and -min in one separable pass (rows, then columns)
        both = F.max_pool2d(F.max_pool2d(both, (1, win), 1), (win, 1), 1)
        ratio = (both[:, 0] + both[:, 1]).flatten(1) / (g + 1.0)
        for top in (0.02, 0.1):
            idx = g.topk(max(4, int(g.shape[1] * top)), 1).indices
            out.append(torch.log(_quantiles(ratio.gather(1, idx), (.1, .25, .5)) + 0.1))
    yc = y[:, 0] - y[:, 0].mean(dim=(1, 2), keepdim=True)
    window = torch.hann_window(h, periodic=False, device=y.device)[:, None] * torch.hann_window(w, periodic=False, device=y.device)[None]
    power = torch.fft.rfft2(yc * window).abs() ** 2
    fy = torch.fft.fftfreq(h, device=y.device)[:, None].abs().expand(h, w // 2 + 1)
    fx = torch.fft.rfftfreq(w, device=y.device)[None].expand(h, w // 2 + 1)
    fine = _band_powers(power, (fx ** 2 + fy ** 2).sqrt(), torch.linspace(0, 0.5, 17, device=y.device))
    out.append(fine[:, 2:] - fine[:, 1:2])
    axis_edges = torch.linspace(0, 0.5, 9, device=y.device)
    for along, across in ((fx, fy), (fy, fx)):
        bands = _band_powers(power, along, axis_edges, across < 0.06)
        out.append(bands[:, 1:] - bands[:, :1])
    qs = (.5, .9, .97, .99)
    full = _quantiles(g, qs)
    half = _quantiles(_gradient_magnitude(F.avg_pool2d(y, 2)).flatten(1), qs)
    out.append(torch.log((full + 0.5) / (half + 0.5)))
    return torch.cat(out, 1)


def _gaussian_blur(y: torch.Tensor, std: float) -> torch.Tensor:
    """y [B,1,h,w] -> separable Gaussian blur of ``std`` pixels (radius 3 std, replicate borders)."""
    r = max(1, int(3 * std + 0.5))
    t = torch.arange(-r, r + 1, dtype=y.dtype, device=y.device)
    k = torch.exp(-t ** 2 / (2 * std * std))
    k = k / k.sum()
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode='replicate'), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(y, (0, 0, r, r), mode='replicate'), k.view(1, 1, -1, 1))


def _reblur_statistics(y: torch.Tensor, g: torch.Tensor, lap: torch.Tensor) -> torch.Tensor:
    """The 'v3' re-blur features (module doc) of luma y [B,1,h,w] in [0, 255], its gradient magnitude
    ``g`` [B, h*w] and |Laplacian| ``lap`` [B,1,h-2,w-2] (as v1 computes them) -> [B, NUM_REBLUR_FEATURES]."""
    tops = [g.topk(max(4, int(g.shape[1] * f)), 1).indices for f in _TOP_FRACTIONS]
    g_top = [g.gather(1, idx) + 0.5 for idx in tops]
    out = []
    for std in _REBLUR_STDS:
        gb = _gradient_magnitude(_gaussian_blur(y, std)).flatten(1)
        for idx, gt in zip(tops, g_top):
            out.append(torch.log(_quantiles((gb.gather(1, idx) + 0.5) / gt, (.25, .5, .75))))
        qs = (.9, .99)
        out.append(torch.log((_quantiles(gb, qs) + 0.5) / (_quantiles(g, qs) + 0.5)))
    lap = F.pad(lap, (1, 1, 1, 1)).flatten(1)
    for idx, gt in zip(tops, g_top):
        out.append(torch.log(_quantiles((lap.gather(1, idx) + 0.5) / gt, (.25, .5, .75))))
    return torch.cat(out, 1)


@torch.no_grad()
def degradation_statistics(lq: torch.Tensor, feature_set: str = 'v1') -> torch.Tensor:
    """lq [B, 3, h, w] in [0, 1] (h, w >= 16) -> features [B, num_features(feature_set)] (float32)."""
    n_out = num_features(feature_set)
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
    bands = _band_powers(power, radius, torch.linspace(0, 0.5, 11, device=y.device))
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
    if feature_set in ('v2', 'v3'):
        g_mag = _gradient_magnitude(y).flatten(1)   # shared by both blur sets
        out.append(_edge_statistics(y, g_mag))
    if feature_set == 'v3':
        out.append(_reblur_statistics(y, g_mag, lap.abs()))
    feats = torch.cat(out, 1)
    assert feats.shape[1] == n_out
    return feats


class DegradationStatsTokens(nn.Module):
    """lq [B, 3, h, w] in [0, 1] -> ``num_tokens`` tokens [B, num_tokens, dim]: the statistics
    above, BatchNorm-standardised (running statistics are saved with the model) and mapped by a
    two-layer MLP (``dropout`` on its hidden layer in training mode). No gradient flows into the
    image through this path. A training batch of one sample is normalised with the running
    statistics (BatchNorm cannot use a batch of one)."""

    def __init__(self, dim: int, num_tokens: int = 4, hidden: int = 256, feature_set: str = 'v1',
                 dropout: float = 0.0):
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f'DegradationStatsTokens: num_tokens must be >= 1, got {num_tokens}')
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f'DegradationStatsTokens: dropout must be in [0, 1), got {dropout}')
        self.num_tokens, self.dim = int(num_tokens), int(dim)
        self.drop = nn.Dropout(float(dropout))   # outside ``mlp``, so its state_dict keys stay those of dropout 0
        self.feature_set = str(feature_set)
        n = num_features(self.feature_set)
        self.norm = nn.BatchNorm1d(n)
        self.mlp = nn.Sequential(nn.Linear(n, hidden), nn.GELU(), nn.Linear(hidden, self.num_tokens * self.dim))

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        return self.from_features(degradation_statistics(lq, self.feature_set))

    def from_features(self, f: torch.Tensor) -> torch.Tensor:
        """Raw statistics [B, F] (:func:`degradation_statistics` of ``feature_set``) -> tokens
        [B, num_tokens, dim]; ``forward(lq) == from_features(degradation_statistics(lq))``, so the
        statistics of a fixed set of LRs can be computed once (IRPAD's ``stats_pretrain``)."""
        f = f.to(self.mlp[0].weight.dtype)
        if self.training and f.shape[0] == 1:  # batch statistics need 2+ samples: use the running ones
            n = self.norm
            f = F.batch_norm(f, n.running_mean, n.running_var, n.weight, n.bias, False, 0.0, n.eps)
        else:
            f = self.norm(f)
        h = self.drop(self.mlp[1](self.mlp[0](f)))
        return self.mlp[2](h).view(f.shape[0], self.num_tokens, self.dim)
