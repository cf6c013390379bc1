"""RealDAT: DAT conditioned on SRCLIP degradation embeddings through cross-modal fusion blocks (DePLSR).

Conditioning (specs/related-methods.md section 3)::

    xi = content embedding  [B, 1, D]   (SRCLIP f_c)        \\  shared Linear(D -> C) -> ReLU
    xd = fine embeddings    [B, 5, D]   (SRCLIP f_fd)       /   -> Linear(C -> C) -> ReLU
    before residual group g (every group by default), a FusionBlock:
        x, xi, xd = LN(x), LN(xi), LN(xd)
        xi' = CrossAttn(q=xi, kv=x)                      [B, 1, C]
        xd' = CrossAttn(q=xd, kv=x)                      [B, 5, C]
        xid = every (xi'_a, xd'_b) pair concatenated     [B, 5, 2C]
        x   = x + proj(softmax(q(x) k(xid)^T / sqrt(d)) v(xid))
        x   = x + MLP(LN(x))
        xi', xd' go on to the next fusion block.

``fusion_residual``: ``'normed'`` (default, the released code: the first residual adds to the
*normalised* x) or ``'input'`` (the usual pre-norm residual on the un-normalised x).

What the conditioning can carry: in the paper's block (and the released code) xi' and xd' are
attention *outputs over x*, i.e. weighted means of projected image tokens; the embeddings only
choose the weights, their values never reach x. At initialisation (near-uniform attention) the
output hardly depends on them at all. ``fusion_query_residual: true`` (not in the paper) keeps
them: xi' = LN(xi) + CrossAttn(q=LN(xi), kv=x) (and so xd'), so the keys and values x attends
to hold the conditioning itself (docs/deplsr.md measures both). The paper
configuration (DAT paper size + 6 fusion blocks, 6 heads, MLP ratio 1, attention ratio 1, qkv
bias) has 18,061,131 parameters (tests/test_dat_arch.py counts it on the meta device).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from dalpsr.archs.dat_arch import DAT
from dalpsr.utils.registry import ARCH_REGISTRY

__all__ = ['CrossAttention', 'FusionBlock', 'RealDAT']


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``a`` [B, Na, C] over ``b`` [B, Nb, C] -> [B, Na, C]."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'cross attention: dim {dim} is not divisible by {num_heads} heads')
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        B, Na, C = a.shape
        nh = self.num_heads
        q = self.q(a).view(B, Na, nh, C // nh).transpose(1, 2)
        k, v = self.kv(b).view(B, b.shape[1], 2, nh, C // nh).permute(2, 0, 3, 1, 4)
        out = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, Na, C))


class FusionBlock(nn.Module):
    """Cross-modal fusion of image tokens x [B, L, C] with xi [B, Ni, C] and xd [B, Nd, C]
    (module doc). Returns ``(x [B, L, C], xi' [B, Ni, C], xd' [B, Nd, C])``."""

    def __init__(self, dim: int, num_heads: int = 6, mlp_ratio: float = 1.0, attn_ratio: float = 1.0,
                 qkv_bias: bool = True, residual: str = 'normed', query_residual: bool = False):
        super().__init__()
        self.query_residual = bool(query_residual)
        if residual not in ('normed', 'input'):
            raise ValueError(f"fusion_residual must be 'normed' or 'input', got {residual!r}")
        self.residual = residual
        self.num_heads = num_heads
        self.qk_dim = int(dim * attn_ratio)
        if self.qk_dim % num_heads or dim % num_heads:
            raise ValueError(f'fusion block: dims {dim}/{self.qk_dim} not divisible by {num_heads} heads')
        self.scale = (self.qk_dim // num_heads) ** -0.5
        self.norm_x, self.norm_xi, self.norm_xd = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn_i = CrossAttention(dim, num_heads, qkv_bias)
        self.attn_d = CrossAttention(dim, num_heads, qkv_bias)
        self.q = nn.Linear(dim, self.qk_dim, bias=qkv_bias)
        self.k = nn.Linear(2 * dim, self.qk_dim, bias=qkv_bias)
        self.v = nn.Linear(2 * dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, xi: torch.Tensor, xd: torch.Tensor):
        B, L, C = x.shape
        xn, xi, xd = self.norm_x(x), self.norm_xi(xi), self.norm_xd(xd)
        if self.query_residual:
            xi, xd = xi + self.attn_i(xi, xn), xd + self.attn_d(xd, xn)
        else:
            xi, xd = self.attn_i(xi, xn), self.attn_d(xd, xn)
        ni, nd = xi.shape[1], xd.shape[1]
        xid = torch.cat([xi.unsqueeze(2).expand(B, ni, nd, C), xd.unsqueeze(1).expand(B, ni, nd, C)], -1)
        xid = xid.reshape(B, ni * nd, 2 * C)
        nh = self.num_heads
        q = self.q(xn).view(B, L, nh, -1).transpose(1, 2)
        k = self.k(xid).view(B, ni * nd, nh, -1).transpose(1, 2)
        v = self.v(xid).view(B, ni * nd, nh, -1).transpose(1, 2)
        fused = (((q * self.scale) @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(B, L, C)
        x = (xn if self.residual == 'normed' else x) + self.proj(fused)
        x = x + self.mlp(self.norm2(x))
        return x, xi, xd


@ARCH_REGISTRY.register()
class RealDAT(DAT):
    """DAT + fusion blocks. ``forward(lq [B, 3, h, w] in [0, 1], xi [B, Ni, D] or [B, D],
    xd [B, Nd, D]) -> sr [B, 3, h*s, w*s]``. ``xi``/``xd`` ``None``: the fusion blocks are skipped
    (the plain DAT path, as the released code does).

    Args (besides DAT's): ``cond_dim`` D of the SRCLIP embeddings (512 for ViT-B/32);
    ``fusion_layers``: ``'all'``, ``'none'`` or a list of group indices; ``fusion_num_heads``,
    ``fusion_mlp_ratio``, ``fusion_attn_ratio``, ``fusion_residual``, ``fusion_query_residual`` (module doc);
    ``cond_standardize`` (default False, the paper): standardise every dimension of xi and of
    each of the ``cond_tokens`` xd embeddings over the data before the adapter (BatchNorm without
    affine: batch statistics in training; in eval the cumulative mean / variance over every
    training batch, saved with the weights), so
    that embeddings that differ between images only in a small part of a large common direction
    (a unit-norm encoder whose images all point nearly the same way) still reach the fusion blocks
    as different inputs; ``cond_tokens``: Nd of xd (SRCLIP: 5 fine embeddings).
    """

    def __init__(self, cond_dim: int = 512, fusion_layers: Union[str, Sequence[int]] = 'all',
                 fusion_num_heads: int = 6, fusion_mlp_ratio: float = 1.0, fusion_attn_ratio: float = 1.0,
                 fusion_residual: str = 'normed', cond_standardize: bool = False, cond_tokens: int = 5,
                 fusion_query_residual: bool = False, **dat_kwargs):
        super().__init__(**dat_kwargs)
        n = len(self.layers)
        if fusion_layers == 'all':
            layers = list(range(n))
        elif fusion_layers in ('none', None):
            layers = []
        else:
            layers = sorted({int(i) for i in fusion_layers})
            if any(not 0 <= i < n for i in layers):
                raise ValueError(f'fusion_layers {list(fusion_layers)} out of range for {n} residual groups')
        self.config.update(cond_dim=int(cond_dim), fusion_layers=layers, fusion_num_heads=int(fusion_num_heads),
                           fusion_mlp_ratio=float(fusion_mlp_ratio), fusion_attn_ratio=float(fusion_attn_ratio),
                           fusion_residual=str(fusion_residual))
        if fusion_query_residual:  # only then in the config: older exports load unchanged
            self.config.update(fusion_query_residual=True)
        C = self.embed_dim
        self.fusion_index = {g: j for j, g in enumerate(layers)}
        self.fusion_blocks = nn.ModuleList([FusionBlock(C, fusion_num_heads, fusion_mlp_ratio, fusion_attn_ratio,
                                                        True, fusion_residual, bool(fusion_query_residual))
                                            for _ in layers])
        self.adapt = nn.Sequential(nn.Linear(cond_dim, C), nn.ReLU(), nn.Linear(C, C), nn.ReLU())
        if cond_standardize:  # only then in config and state dict: older exports load unchanged
            self.config.update(cond_standardize=True, cond_tokens=int(cond_tokens))
            # eps far below the variances it must resolve (a collapsed encoder: per-dim std ~1e-5);
            # momentum None: the exact mean over all batches (an EMA's start-up bias would exceed that std)
            self.cond_norm_i = nn.BatchNorm1d(cond_dim, eps=1e-12, momentum=None, affine=False)
            self.cond_norm_d = nn.BatchNorm1d(int(cond_tokens) * cond_dim, eps=1e-12, momentum=None, affine=False)
        self.fusion_blocks.apply(self._init_weights)
        self.adapt.apply(self._init_weights)

    def before_group(self, i: int, x: torch.Tensor, cond):
        j = self.fusion_index.get(i)
        if cond is None or j is None:
            return x, cond
        x, xi, xd = self.fusion_blocks[j](x, *cond)
        return x, (xi, xd)

    def forward(self, lq: torch.Tensor, xi: Optional[torch.Tensor] = None,
                xd: Optional[torch.Tensor] = None) -> torch.Tensor:
        cond = None
        if xi is not None and xd is not None:
            if xi.dim() == 2:
                xi = xi.unsqueeze(1)
            if xd.dim() == 2:
                xd = xd.unsqueeze(1)
            xi, xd = xi.to(lq.dtype), xd.to(lq.dtype)
            if self.config.get('cond_standardize'):
                (B, Ni, D), Nd = xi.shape, xd.shape[1]
                if Ni != 1 or Nd != self.config['cond_tokens']:
                    raise ValueError(f"cond_standardize expects xi [B, 1, D] and xd [B, {self.config['cond_tokens']}, D], "
                                     f'got {tuple(xi.shape)} and {tuple(xd.shape)}')
                xi = self.cond_norm_i(xi.reshape(B, D)).view(B, 1, D)
                xd = self.cond_norm_d(xd.reshape(B, Nd * D)).view(B, Nd, D)
            cond = (self.adapt(xi), self.adapt(xd))
        return super().forward(lq, cond)
