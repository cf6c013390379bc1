"""DeeDSR stage 2: the degradation-aware adapter (paper Sec. 3.3, Table 5; authors' code).

Inputs: ``z_lr`` ``[B, 4, h, w]`` (VAE latent of the bicubic x4 LR, h = w = 64 for 512^2), the
timestep ``t`` ``[B]`` and the degradation representation ``d`` ``[B, d_dim]`` of the frozen
stage-1 learner (d_dim = 1024). Structure (full scale: model_channels 256, channel_mult
(1, 1, 2, 2), attention at down factors 1, 2, 4, 4 heads)::

    emb   = MLP(sinusoid(t, 256)) -> [B, 1024]                     # the adapter's own time embedding
    h     = conv3x3(4 -> 256)(z_lr)
    level i (channels 256, 256, 512, 512; size h/2^i):
        h = ResBlock(h, emb) -> DA block(h, d) -> [self-attention]   # attention at levels 0..2
        local[size] = h                                            # the last feature before the downsample
        h = ResBlock(h, emb, down=True)                            # avg-pool, not after the last level
    local[h/8] = h ; h = Middle(ResBlock - attention - ResBlock)(h, emb)
    locals  -> ResBlock(C_i -> 256) each                            # [B, 256, s, s], s = h, h/2, h/4, h/8
    global  = h.flatten -> [B, (h/8)^2, 512]                        # 64 tokens of 512 at h = 64

``forward`` returns ``(local, tokens)`` where ``local`` maps ``(height, width)`` of each map to
``[B, out_channels, height, width]``. The DA block (DASR-style, kernel 3, reduction 32)::

    d'  = SiLU(Linear(d_dim -> C, no bias)(d))
    DAconv(x, d') = conv1x1(SiLU(depthwise3x3(x; per-sample kernels from
                    Linear(C->C)-SiLU-Linear(C->9C)(d')))) + x * 2 sigmoid(1x1(C->C/32)-SiLU-1x1(->C)(d'))
    DAB(x)  = conv3(SiLU(DAconv(SiLU(conv3(SiLU(DAconv(x, d')))), d')))
    DA(x)   = x + conv3(DAB(x))

ResBlocks and attention are LDM's (GroupNorm - SiLU - conv, time-embedding add, zero-initialised
second convolution and attention output projection). 75.9 M parameters at full scale
(``tests/test_deedsr_stage2.py`` checks it on the meta device).
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dalpsr.utils.registry import ARCH_REGISTRY


def _zero(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    import math
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """LDM's sinusoidal embedding ``[cos, sin]`` of timesteps ``[B]`` -> ``[B, dim]`` (float32)."""
    from diffusers.models.embeddings import get_timestep_embedding
    return get_timestep_embedding(t.reshape(-1).float(), dim, flip_sin_to_cos=True, downscale_freq_shift=0)


class ResBlock(nn.Module):
    """LDM ResBlock: GN-SiLU-conv3 (+ Linear(emb)) GN-SiLU-dropout-conv3 (zero-init) + skip
    (identity, or 1x1 when the channels change). ``down``: 2x2 average pooling of both paths."""

    def __init__(self, cin: int, emb_dim: int, cout: int = None, down: bool = False, dropout: float = 0.0,
                 groups: int = 32):
        super().__init__()
        cout = cout or cin
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = _norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)
        self.down = down

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(x))
        if self.down:
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        h = self.conv1(h) + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention (LDM ``AttentionBlock``): GN, 1x1 qkv, ``heads`` heads, zero-init 1x1
    output projection, residual."""

    def __init__(self, channels: int, heads: int = 4, groups: int = 32):
        super().__init__()
        if channels % heads:
            raise ValueError(f'{channels} channels do not split into {heads} heads')
        self.heads = heads
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))                              # [B, 3C, T]
        # LDM's legacy order: split heads first, then q/k/v within each head
        q, k, v = qkv.reshape(b * self.heads, 3 * c // self.heads, -1).chunk(3, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).reshape(b, c, -1)
        return (flat + self.proj_out(out)).reshape(b, c, hh, ww)


class DAConv(nn.Module):
    """Degradation-aware convolution (DASR): per-sample depthwise kernels from d' plus channel
    attention from d'. ``x [B, C, H, W]``, ``dp [B, C]`` -> ``[B, C, H, W]``."""

    def __init__(self, channels: int, kernel_size: int = 3, reduction: int = 32):
        super().__init__()
        self.k = kernel_size
        self.kernel = nn.Sequential(nn.Linear(channels, channels, bias=False), nn.SiLU(),
                                    nn.Linear(channels, channels * kernel_size * kernel_size, bias=False))
        self.conv = nn.Conv2d(channels, channels, 1)
        mid = max(1, channels // reduction)
        self.ca = nn.Sequential(nn.Conv2d(channels, mid, 1, bias=False), nn.SiLU(),
                                nn.Conv2d(mid, channels, 1, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor, dp: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        kernel = self.kernel(dp).reshape(b * c, 1, self.k, self.k).to(x.dtype)
        out = F.conv2d(x.reshape(1, b * c, h, w), kernel, groups=b * c, padding=self.k // 2)
        out = self.conv(F.silu(out).reshape(b, c, h, w))
        return out + x * 2 * self.ca(dp[:, :, None, None].to(x.dtype))


class DABlock(nn.Module):
    """The DA block of each adapter level (module doc): ``x + conv3(DAB(x, d'))``,
    ``d' = SiLU(Linear(d_dim -> C, no bias)(d))``."""

    def __init__(self, channels: int, d_dim: int = 1024, kernel_size: int = 3, reduction: int = 32):
        super().__init__()
        self.compress = nn.Linear(d_dim, channels, bias=False)
        self.da1 = DAConv(channels, kernel_size, reduction)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.da2 = DAConv(channels, kernel_size, reduction)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.tail = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        dp = F.silu(self.compress(d))
        out = F.silu(self.da1(x, dp))
        out = F.silu(self.conv1(out))
        out = F.silu(self.da2(out, dp))
        out = self.conv2(out)
        return x + self.tail(out)


class _Level(nn.Module):
    def __init__(self, cin, cout, emb_dim, d_dim, attention, heads, groups, dropout, reduction):
        super().__init__()
        self.res = ResBlock(cin, emb_dim, cout, dropout=dropout, groups=groups)
        self.da = DABlock(cout, d_dim, 3, reduction)
        self.attn = AttentionBlock(cout, heads, groups) if attention else None

    def forward(self, h, emb, d):
        h = self.da(self.res(h, emb), d)
        return self.attn(h) if self.attn is not None else h


@ARCH_REGISTRY.register()
class DegradationAwareAdapter(nn.Module):
    """The DeeDSR adapter (module doc). Defaults are the published full-scale settings.

    Args:
        in_channels: latent channels (4). model_channels: base width (256).
        channel_mult: per-level multipliers ((1, 1, 2, 2) -> 256, 256, 512, 512).
        attention_levels: down factors with self-attention ((1, 2, 4)). num_heads: 4.
        out_channels: channels of the local maps (256; SPADE's input).
        d_dim: size of the learner's d (1024). reduction: DA channel-attention reduction (32).
        norm_groups: GroupNorm groups (32; fewer for tiny test models). dropout: 0.
    """

    def __init__(self, in_channels: int = 4, model_channels: int = 256, channel_mult: Sequence[int] = (1, 1, 2, 2),
                 attention_levels: Sequence[int] = (1, 2, 4), num_heads: int = 4, out_channels: int = 256,
                 d_dim: int = 1024, reduction: int = 32, norm_groups: int = 32, dropout: float = 0.0):
        super().__init__()
        self.config = dict(in_channels=in_channels, model_channels=model_channels, channel_mult=list(channel_mult),
                           attention_levels=list(attention_levels), num_heads=num_heads, out_channels=out_channels,
                           d_dim=d_dim, reduction=reduction, norm_groups=norm_groups, dropout=dropout)
        mc = int(model_channels)
        emb_dim = 4 * mc
        self.model_channels = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_channels, mc, 3, padding=1)
        self.levels = nn.ModuleList()
        self.downs = nn.ModuleList()
        chans = []
        ch = mc
        for i, mult in enumerate(channel_mult):
            cout = mc * int(mult)
            self.levels.append(_Level(ch, cout, emb_dim, d_dim, (2 ** i) in set(attention_levels), num_heads,
                                      norm_groups, dropout, reduction))
            ch = cout
            chans.append(ch)
            if i != len(channel_mult) - 1:
                self.downs.append(ResBlock(ch, emb_dim, ch, down=True, dropout=dropout, groups=norm_groups))
        self.mid1 = ResBlock(ch, emb_dim, ch, dropout=dropout, groups=norm_groups)
        self.mid_attn = AttentionBlock(ch, num_heads, norm_groups)
        self.mid2 = ResBlock(ch, emb_dim, ch, dropout=dropout, groups=norm_groups)
        self.local_out = nn.ModuleList([ResBlock(c, emb_dim, out_channels, dropout=dropout, groups=norm_groups)
                                        for c in chans])
        self.out_channels = int(out_channels)
        self.global_dim = ch
        self.downscale = 2 ** (len(channel_mult) - 1)

    def forward(self, z_lr: torch.Tensor, t: torch.Tensor, d: torch.Tensor
                ) -> Tuple[Dict[Tuple[int, int], torch.Tensor], torch.Tensor]:
        """-> (``{(h_i, w_i): [B, out_channels, h_i, w_i]}``, tokens ``[B, h_L w_L, global_dim]``).
        ``z_lr`` height and width must be divisible by ``2 ** (levels - 1)``."""
        b, _, h, w = z_lr.shape
        if h % self.downscale or w % self.downscale:
            raise ValueError(f'latent size {h}x{w} must be divisible by {self.downscale}')
        if t.ndim == 0:
            t = t.expand(b)
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(z_lr.dtype))
        x = self.conv_in(z_lr)
        feats = []
        for i, level in enumerate(self.levels):
            x = level(x, emb, d)
            feats.append(x)
            if i < len(self.downs):
                x = self.downs[i](x, emb)
        x = self.mid2(self.mid_attn(self.mid1(x, emb)), emb)
        local = {tuple(f.shape[-2:]): head(f, emb) for f, head in zip(feats, self.local_out)}
        tokens = x.flatten(2).transpose(1, 2)
        return local, tokens
