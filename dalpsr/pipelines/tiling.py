"""Tiles with Gaussian-weighted overlap: latent diffusion and VAE encode/decode of any size.

A large image is cut into overlapping tiles; a function runs on each tile and the outputs are
blended with Gaussian weights (peak at the tile centre, falling to ~0 at its edges), then
normalised by the summed weights. Every output pixel is a convex combination of tile outputs,
so tiles that agree give exactly the untiled value, and where they disagree the weight moves
smoothly from one tile to the next (no seams). Memory of the network calls is bounded by the
tile size; only the input and the output accumulator are full size (on the device given).

Used three ways (``DaLPSRSampler``):

* ``tiled_vae_encode``: pixels [B,3,H,W] in [-1,1] -> latent mean [B,C,H/8,W/8] (unscaled),
  tiles of ``tile`` px (default 1024, SeeSR's encoder tile), overlap ``overlap`` px.
* ``tiled_vae_decode``: latent [B,C,h,w] (unscaled) -> pixels [B,3,8h,8w] in about [-1,1],
  tiles of ``tile`` latent px (default 224, SeeSR's decoder tile).
* latent diffusion: at every step the UNet/ControlNet noise prediction is computed per latent
  tile (default 96 with overlap 32) and blended with :func:`blend_tiles`.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from functools import lru_cache
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch


def tile_starts(size: int, tile: int, overlap: int, align: int = 1) -> List[int]:
    """Start offsets of tiles of length ``min(tile, size)`` covering ``[0, size)``.

    Consecutive tiles overlap by at least ``overlap``; the last tile ends exactly at ``size``;
    starts are multiples of ``align`` except the last, which is ``size - tile`` (callers keep
    ``size`` and ``tile`` multiples of ``align``). Deterministic and symmetric in spirit: the
    stride is the largest aligned value giving the minimum number of tiles.
    """
    if size <= 0 or tile <= 0:
        raise ValueError(f'tile_starts: size and tile must be > 0, got size={size}, tile={tile}')
    if overlap < 0 or overlap >= tile:
        raise ValueError(f'tile_starts: overlap must be in [0, tile), got overlap={overlap}, tile={tile}')
    if size <= tile:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))  # minimum number of tiles
    n = max(n, 2)
    span = size - tile  # distance from first to last start
    starts = []
    for i in range(n):
        s = round(i * span / (n - 1))
        s = (s // align) * align if i < n - 1 else span
        starts.append(s)
    return sorted(set(starts))


def tile_boxes(height: int, width: int, tile: int, overlap: int, align: int = 1
               ) -> List[Tuple[int, int, int, int]]:
    """(top, left, tile_h, tile_w) of every tile covering a ``height`` x ``width`` plane."""
    th, tw = min(tile, height), min(tile, width)
    return [(t, l, th, tw) for t in tile_starts(height, tile, overlap, align)
            for l in tile_starts(width, tile, overlap, align)]


@lru_cache(maxsize=32)
def _gaussian_1d(n: int, sigma_frac: float) -> torch.Tensor:
    x = torch.arange(n, dtype=torch.float64)
    mid = (n - 1) / 2.0
    sigma = max(sigma_frac * n, 1e-6)
    g = torch.exp(-0.5 * ((x - mid) / sigma) ** 2)
    g_out = math.exp(-0.5 * ((n / 2.0) / sigma) ** 2)  # value half a pixel beyond the edge
    return (g - g_out) / (1.0 - g_out)


def gaussian_weights(h: int, w: int, sigma_frac: float = 0.2, floor: float = 1e-12) -> torch.Tensor:
    """A float32 [h, w] window: a Gaussian (``sigma = sigma_frac * size`` per axis, peak 1)
    shifted down by its value half a pixel beyond the tile edge, so it falls to ~0 at the edge:
    a tile fades in continuously (no step where it starts) and the cross-fade inside an overlap
    is wide (max change of the blend ratio 5.3 %/px for 96/32 latent tiles, vs 17 %/px for
    SeeSR's unshifted sigma 0.1). Clamped to ``floor`` > 0 so every covered pixel normalises.
    """
    g = torch.outer(_gaussian_1d(h, float(sigma_frac)), _gaussian_1d(w, float(sigma_frac)))
    return g.clamp_min(floor).float()


def blend_tiles(fn: Callable[[torch.Tensor, Tuple[int, int, int, int]], torch.Tensor], x: torch.Tensor,
                tile: int, overlap: int, *, scale: float = 1.0, out_channels: Optional[int] = None,
                align: int = 1, sigma_frac: float = 0.2, out_dtype: Optional[torch.dtype] = None,
                on_tile: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Apply ``fn`` to overlapping tiles of ``x`` [B, C, H, W] and blend the results.

    Args:
        fn: ``fn(x_tile, box) -> y_tile`` where ``box = (top, left, h, w)`` in input units and
            ``y_tile`` is [B, C_out, h*scale, w*scale].
        tile, overlap: tile size and minimum overlap in input units.
        scale: output/input size ratio (8 for VAE decode, 1/8 for encode, 1 for latents);
            ``tile*scale`` and ``overlap*scale`` must be integers at the aligned positions.
        align: tile starts are multiples of ``align`` (8 when encoding pixels into latents).
        on_tile: called with (index, count) after each tile (progress).
    Returns:
        [B, C_out, H*scale, W*scale] in ``out_dtype`` (default: dtype of the first tile output);
        accumulation is in float32. If one tile covers ``x`` ``fn`` is called once, unblended.
    """
    b, _, H, W = x.shape
    boxes = tile_boxes(H, W, tile, overlap, align)
    if len(boxes) == 1:
        out = fn(x, (0, 0, H, W))
        if on_tile:
            on_tile(0, 1)
        return out if out_dtype is None else out.to(out_dtype)
    OH, OW = int(round(H * scale)), int(round(W * scale))
    acc = None
    wsum = None
    for i, (t, l, th, tw) in enumerate(boxes):
        y = fn(x[:, :, t:t + th, l:l + tw], (t, l, th, tw))
        oh, ow = y.shape[-2:]
        ot, ol = int(round(t * scale)), int(round(l * scale))
        if acc is None:
            out_channels = out_channels or y.shape[1]
            out_dtype = out_dtype or y.dtype
            acc = torch.zeros(b, y.shape[1], OH, OW, dtype=torch.float32, device=y.device)
            wsum = torch.zeros(1, 1, OH, OW, dtype=torch.float32, device=y.device)
        w = gaussian_weights(oh, ow, sigma_frac).to(y.device)[None, None]
        acc[:, :, ot:ot + oh, ol:ol + ow] += y.float() * w
        wsum[:, :, ot:ot + oh, ol:ol + ow] += w
        if on_tile:
            on_tile(i, len(boxes))
        del y
    return (acc / wsum).to(out_dtype)


def _vae_dtype(vae) -> torch.dtype:
    return next(vae.parameters()).dtype


SHARED_NORM_MODES = ('preview', 'none')


@contextmanager
def shared_groupnorm(module: torch.nn.Module, stats_pass: Callable[[Callable[[], None]], None]):
    """Make every ``GroupNorm`` of ``module`` normalise with statistics shared by all tiles.

    A GroupNorm normalises with the mean/var of whatever it sees, so each tile would be
    normalised differently (visible as per-tile color/contrast shifts). ``stats_pass(reset)``
    runs the network one or more times (calling ``reset()`` before each forward); the
    per-sample, per-group count, sum and sum of squares of every GroupNorm call are accumulated
    over those runs, and inside the context every forward is normalised with the pooled
    mean/variance instead of its own. GroupNorm calls are matched by module and call order
    within a forward. Yields ``reset`` (call it before each tile's forward).
    """
    norms = [m for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]
    acc: Dict[Tuple[int, int], List[torch.Tensor]] = {}
    pooled: Dict[Tuple[int, int], Tuple[torch.Tensor, torch.Tensor]] = {}
    cursor: Dict[int, int] = {}

    def _next(gn) -> Tuple[int, int]:
        k = cursor.get(id(gn), 0)
        cursor[id(gn)] = k + 1
        return (id(gn), k)

    def recorder(gn):
        def forward(x):
            key = _next(gn)
            xg = x.float().reshape(x.shape[0], gn.num_groups, -1)
            n = torch.full_like(xg[..., 0], xg.shape[-1])
            s1, s2 = xg.sum(-1), (xg * xg).sum(-1)
            if key in acc:
                acc[key] = [acc[key][0] + n, acc[key][1] + s1, acc[key][2] + s2]
            else:
                acc[key] = [n, s1, s2]
            return torch.nn.functional.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps)
        return forward

    def applier(gn):
        def forward(x):
            key = _next(gn)
            if key not in pooled:
                raise RuntimeError('shared_groupnorm: a GroupNorm call was not seen by the statistics pass')
            mean, var = pooled[key]
            b, c = x.shape[:2]
            xg = x.float().reshape(b, gn.num_groups, -1)
            y = (xg - mean.to(x.device)[..., None]) * torch.rsqrt(var.to(x.device)[..., None] + gn.eps)
            y = y.reshape(x.shape)
            if gn.affine:
                bshape = (1, c) + (1,) * (x.dim() - 2)
                y = y * gn.weight.float().reshape(bshape) + gn.bias.float().reshape(bshape)
            return y.to(x.dtype)
        return forward

    def reset():
        cursor.clear()

    try:
        for gn in norms:
            gn.forward = recorder(gn)
        stats_pass(reset)
        for key, (n, s1, s2) in acc.items():
            mean = s1 / n
            pooled[key] = (mean, (s2 / n - mean * mean).clamp_min(0))
        for gn in norms:
            gn.forward = applier(gn)
        reset()
        yield reset
    finally:
        for gn in norms:
            if 'forward' in gn.__dict__:
                del gn.forward


def _preview(x: torch.Tensor, max_side: int, multiple: int) -> torch.Tensor:
    """``x`` downscaled (area) so its longer side is <= ``max_side``, sides multiples of ``multiple``."""
    h, w = x.shape[-2:]
    f = min(1.0, max_side / max(h, w))
    nh = max(multiple, int(h * f) // multiple * multiple)
    nw = max(multiple, int(w * f) // multiple * multiple)
    if (nh, nw) == (h, w):
        return x
    return torch.nn.functional.interpolate(x.float(), size=(nh, nw), mode='area').to(x.dtype)


def _tiled_vae(run: Callable[[torch.Tensor], torch.Tensor], net: torch.nn.Module, x: torch.Tensor, tile: int,
               overlap: int, scale: float, align: int, dtype: torch.dtype, shared_norm: str) -> torch.Tensor:
    if shared_norm not in SHARED_NORM_MODES:
        raise ValueError(f"shared_norm must be one of {', '.join(SHARED_NORM_MODES)}, got '{shared_norm}'")
    boxes = tile_boxes(x.shape[-2], x.shape[-1], tile, overlap, align)
    if len(boxes) == 1 or shared_norm == 'none':
        return blend_tiles(lambda t, box: run(t), x, tile, overlap, scale=scale, align=align, out_dtype=dtype)

    def stats_pass(reset):
        reset()
        run(_preview(x, tile, align))

    def tile_fn(t, box, reset):
        reset()
        return run(t)

    with shared_groupnorm(net, stats_pass) as reset:
        return blend_tiles(lambda t, box: tile_fn(t, box, reset), x, tile, overlap, scale=scale, align=align,
                           out_dtype=dtype)


def tiled_vae_encode(vae, img: torch.Tensor, tile: int = 1024, overlap: int = 128,
                     sample_generator=None, shared_norm: str = 'preview') -> torch.Tensor:
    """VAE-encode ``img`` [B,3,H,W] in [-1,1] (H, W multiples of 8) in tiles of ``tile`` px.

    Returns the posterior mean [B, C, H/8, W/8] (unscaled; multiply by the VAE's
    ``scaling_factor``), or a sample when ``sample_generator`` is given, in the VAE's dtype.
    With more than one tile and ``shared_norm='preview'``, GroupNorm statistics come from one
    pass on the image downscaled to one tile (:func:`shared_groupnorm`, the "fast mode" of
    tiled VAEs); ``none`` lets each tile normalise itself. (Measured on a random tiny VAE,
    256 px image, 128 px tiles: preview halves the tiled-vs-whole error of the encoder and raises
    the decoder's, hence the defaults: encoder ``preview``, decoder ``none``.)
    """
    if img.shape[-1] % 8 or img.shape[-2] % 8:
        raise ValueError(f'tiled_vae_encode: H and W must be multiples of 8, got {tuple(img.shape[-2:])}')
    tile = max(8, (int(tile) // 8) * 8)
    overlap = min((int(overlap) // 8) * 8, tile - 8)
    dtype = _vae_dtype(vae)

    def run(x):
        dist = vae.encode(x).latent_dist
        return dist.sample(generator=sample_generator) if sample_generator is not None else dist.mean

    return _tiled_vae(run, vae.encoder, img.to(dtype), tile, overlap, 1 / 8, 8, dtype, shared_norm)


def tiled_vae_decode(vae, z: torch.Tensor, tile: int = 224, overlap: int = 32,
                     shared_norm: str = 'none') -> torch.Tensor:
    """VAE-decode unscaled latents ``z`` [B,C,h,w] in tiles of ``tile`` latent px ->
    [B,3,8h,8w] (about [-1,1]) in the VAE's dtype (``shared_norm`` as in :func:`tiled_vae_encode`)."""
    dtype = _vae_dtype(vae)
    tile = max(1, int(tile))
    overlap = min(int(overlap), tile - 1)
    return _tiled_vae(lambda x: vae.decode(x).sample, vae.decoder, z.to(dtype), tile, overlap, 8, 1, dtype,
                      shared_norm)


@dataclass
class TileOptions:
    """Tiling of latent diffusion and of the VAE (sizes in latent px unless noted).

    latent_size/latent_overlap: UNet+ControlNet tiles when the latent exceeds ``latent_size``
    (SeeSR 96/32); vae_encoder_tile/overlap in pixels (1024/128); vae_decoder_tile/overlap in
    latent px (224/32); vae_encoder_norm/vae_decoder_norm: GroupNorm statistics of VAE tiles
    (``preview`` shared from a downscaled pass, or ``none``; see tiling.tiled_vae_encode).
    """
    latent_size: int = 96
    latent_overlap: int = 32
    vae_encoder_tile: int = 1024
    vae_encoder_overlap: int = 128
    vae_decoder_tile: int = 224
    vae_decoder_overlap: int = 32
    vae_encoder_norm: str = 'preview'
    vae_decoder_norm: str = 'none'

    @classmethod
    def from_opt(cls, opt: Union[None, Dict[str, Any], 'TileOptions']) -> 'TileOptions':
        if opt is None:
            return cls()
        if isinstance(opt, cls):
            return opt
        if not isinstance(opt, dict):
            raise ValueError(f'tile options must be a mapping, got {type(opt).__name__}')
        known = set(cls.__dataclass_fields__)
        bad = [k for k in opt if k not in known]
        if bad:
            raise ValueError(f"unknown tile option '{bad[0]}' (known: {', '.join(sorted(known))})")
        t = cls(**opt)
        for k in ('vae_encoder_norm', 'vae_decoder_norm'):
            if getattr(t, k) not in ('preview', 'none'):
                raise ValueError(f"tile option {k} must be 'preview' or 'none', got {getattr(t, k)!r}")
        for k in sorted(known - {'vae_encoder_norm', 'vae_decoder_norm'}):
            v = getattr(t, k)
            if not isinstance(v, int) or v < 0 or (k.endswith(('size', 'tile')) and v < 1):
                raise ValueError(f'tile option {k} must be a positive integer, got {v!r}')
        if t.latent_overlap >= t.latent_size:
            raise ValueError(f'tile.latent_overlap ({t.latent_overlap}) must be < tile.latent_size ({t.latent_size})')
        return t
