"""DAT: the Dual Aggregation Transformer for image SR (Chen et al., ICCV 2023), written here.

The backbone of DePLSR's RealDAT (dalpsr/archs/realdat_arch.py). Structure (x4, paper size:
``embed_dim=180, depth=[6]*6, num_heads=[6]*6, split_size=[8, 32], expansion_factor=4``)::

    lq [B, 3, h, w] in [0, 1] -> minus the DIV2K RGB mean -> conv 3x3 (3 -> C)        = f0
    f0 -> tokens [B, h*w, C] -> LayerNorm -> residual groups -> LayerNorm -> conv 3x3  + f0
       -> conv 3x3 (C -> 64) + LeakyReLU -> (conv 64 -> 256, PixelShuffle 2) x log2(scale)
       -> conv 3x3 (64 -> 3) -> plus the mean                                            = sr [B, 3, h*s, w*s]
    (``upsampler: pixelshuffledirect``, the lightweight variant: conv 3x3 (C -> 3 s^2) -> PixelShuffle s)

A residual group is ``depth`` blocks and a 3x3 conv, with a skip over the group. Blocks
alternate: even blocks mix space (two window-attention branches on the two channel halves,
windows ``split_size`` and its transpose, some shifted by half a window, plus a depth-wise conv
branch; an adaptive interaction module gates each branch by the other), odd blocks mix channels
(transposed attention over channels with a learnable temperature, same conv branch and gates).
Every block ends with a spatial-gate FFN (Linear -> GELU -> half x depthwise-conv(LN(other half))
-> Linear). The paper configuration has 14,802,051 parameters (tests count it on the meta
device); with DePLSR's fusion blocks 18,061,131.

Images of any size work: inside the spatial blocks the qkv maps are zero-padded to a multiple
of the largest window side (as the reference implementation does; padded keys take part in
the softmax with logit 0), and shift masks are computed for the padded size.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dalpsr.utils.registry import ARCH_REGISTRY

__all__ = ['DAT', 'DATBlock', 'ResidualGroup', 'count_parameters']

#: DIV2K RGB mean subtracted from the input (as the DAT/SwinIR family does).
RGB_MEAN = (0.4488, 0.4371, 0.4040)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------
# window helpers
# --------------------------------------------------------------------------------------------
def _to_windows(x: torch.Tensor, hs: int, ws: int) -> torch.Tensor:
    """[B, C, H, W] -> [B * nW, hs*ws, C] (H, W multiples of hs, ws)."""
    B, C, H, W = x.shape
    x = x.view(B, C, H // hs, hs, W // ws, ws).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(-1, hs * ws, C)


def _from_windows(x: torch.Tensor, hs: int, ws: int, H: int, W: int) -> torch.Tensor:
    """[B * nW, hs*ws, C] -> [B, H, W, C]."""
    C = x.shape[-1]
    B = x.shape[0] // ((H // hs) * (W // ws))
    x = x.view(B, H // hs, W // ws, hs, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, C)


@lru_cache(maxsize=64)
def _shift_mask(H: int, W: int, hs: int, ws: int, sh: int, sw: int) -> torch.Tensor:
    """Attention mask [nW, hs*ws, hs*ws] (0 / -100) for windows of a map rolled by (-sh, -sw):
    tokens from regions that were not neighbours before the roll do not attend to each other."""
    region = torch.zeros(1, 1, H, W)
    n = 0
    for hsl in (slice(0, -hs), slice(-hs, -sh), slice(-sh, None)):
        for wsl in (slice(0, -ws), slice(-ws, -sw), slice(-sw, None)):
            region[:, :, hsl, wsl] = n
            n += 1
    win = _to_windows(region, hs, ws).squeeze(-1)  # [nW, hs*ws]
    mask = win[:, None, :] - win[:, :, None]
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class DynamicPosBias(nn.Module):
    """Relative position bias from an MLP on the (dy, dx) offsets: [n_offsets, 2] -> [n_offsets, heads].
    ``dim`` is the MLP input width parameter (its hidden width is ``dim // 4``)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        hid = dim // 4
        self.pos_proj = nn.Linear(2, hid)
        self.pos1 = nn.Sequential(nn.LayerNorm(hid), nn.ReLU(inplace=True), nn.Linear(hid, hid))
        self.pos2 = nn.Sequential(nn.LayerNorm(hid), nn.ReLU(inplace=True), nn.Linear(hid, hid))
        self.pos3 = nn.Sequential(nn.LayerNorm(hid), nn.ReLU(inplace=True), nn.Linear(hid, num_heads))

    def forward(self, offsets: torch.Tensor) -> torch.Tensor:
        return self.pos3(self.pos2(self.pos1(self.pos_proj(offsets))))


class WindowAttention(nn.Module):
    """Multi-head attention inside (hs x ws) windows with a dynamic relative position bias.
    Input: q, k, v [B, L, C] of a (H x W) map (H, W multiples of the window) -> [B, H, W, C]."""

    def __init__(self, dim: int, num_heads: int, window: Tuple[int, int]):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'window attention: dim {dim} is not divisible by {num_heads} heads')
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.hs, self.ws = int(window[0]), int(window[1])
        self.pos = DynamicPosBias(dim // 4, num_heads)
        dy = torch.arange(1 - self.hs, self.hs)
        dx = torch.arange(1 - self.ws, self.ws)
        offsets = torch.stack(torch.meshgrid(dy, dx, indexing='ij')).flatten(1).t().float()
        self.register_buffer('offsets', offsets, persistent=False)
        cy, cx = torch.meshgrid(torch.arange(self.hs), torch.arange(self.ws), indexing='ij')
        coords = torch.stack([cy.flatten(), cx.flatten()])  # [2, N]
        rel = coords[:, :, None] - coords[:, None, :]
        index = (rel[0] + self.hs - 1) * (2 * self.ws - 1) + (rel[1] + self.ws - 1)
        self.register_buffer('index', index, persistent=False)

    def forward(self, q, k, v, H: int, W: int, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, L, C = q.shape
        hs, ws, nh = self.hs, self.ws, self.num_heads

        def split(t):
            t = _to_windows(t.transpose(1, 2).reshape(B, C, H, W), hs, ws)  # [B*nW, N, C]
            return t.view(t.shape[0], hs * ws, nh, C // nh).transpose(1, 2)  # [B*nW, nh, N, d]

        q, k, v = split(q) * self.scale, split(k), split(v)
        attn = q @ k.transpose(-2, -1)  # [B*nW, nh, N, N]
        bias = self.pos(self.offsets)[self.index.view(-1)].view(hs * ws, hs * ws, nh).permute(2, 0, 1)
        attn = attn + bias.unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(-1, nw, nh, hs * ws, hs * ws) + mask.to(attn)[None, :, None]
            attn = attn.view(-1, nh, hs * ws, hs * ws)
        out = attn.softmax(-1) @ v  # [B*nW, nh, N, d]
        out = out.transpose(1, 2).reshape(-1, hs * ws, C)
        return _from_windows(out, hs, ws, H, W)


def _conv_branch(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, groups=dim), nn.BatchNorm2d(dim), nn.GELU())


def _channel_gate(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, dim // 8, 1), nn.BatchNorm2d(dim // 8), nn.GELU(),
                         nn.Conv2d(dim // 8, dim, 1))


def _spatial_gate(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(dim, dim // 16, 1), nn.BatchNorm2d(dim // 16), nn.GELU(),
                         nn.Conv2d(dim // 16, 1, 1))


class SpatialMixer(nn.Module):
    """Adaptive spatial self-attention: two window branches (window ``split`` on the first channel
    half, its transpose on the second) + depthwise-conv branch, crossed gates. [B, L, C] -> [B, L, C]."""

    def __init__(self, dim: int, num_heads: int, split: Sequence[int], shift: bool, qkv_bias: bool = True):
        super().__init__()
        if num_heads % 2 or dim % 2:
            raise ValueError(f'DAT spatial blocks need an even dim and head count, got {dim}, {num_heads}')
        self.dim, self.split, self.shift = dim, (int(split[0]), int(split[1])), bool(shift)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        a, b = self.split
        self.attns = nn.ModuleList([WindowAttention(dim // 2, num_heads // 2, (a, b)),
                                    WindowAttention(dim // 2, num_heads // 2, (b, a))])
        self.dwconv = _conv_branch(dim)
        self.channel_interaction = _channel_gate(dim)
        self.spatial_interaction = _spatial_gate(dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, L, C = x.shape
        qkv = self.qkv(x)  # [B, L, 3C]
        v_img = qkv[..., 2 * C:].transpose(1, 2).reshape(B, C, H, W)
        m = max(self.split)
        ph, pw = (m - H % m) % m, (m - W % m) % m
        Hp, Wp = H + ph, W + pw
        grid = qkv.transpose(1, 2).reshape(B, 3 * C, H, W)
        if ph or pw:
            grid = F.pad(grid, (0, pw, 0, ph))
        grid = grid.view(B, 3, C, Hp, Wp)
        outs = []
        for i, attn in enumerate(self.attns):
            part = grid[:, :, i * C // 2:(i + 1) * C // 2]  # [B, 3, C/2, Hp, Wp]
            mask = None
            if self.shift:
                sh, sw = attn.hs // 2, attn.ws // 2
                part = torch.roll(part, shifts=(-sh, -sw), dims=(3, 4))
                mask = _shift_mask(Hp, Wp, attn.hs, attn.ws, sh, sw)
            q, k, v = (part[:, j].flatten(2).transpose(1, 2) for j in range(3))  # [B, Lp, C/2]
            out = attn(q, k, v, Hp, Wp, mask)  # [B, Hp, Wp, C/2]
            if self.shift:
                out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
            outs.append(out[:, :H, :W].reshape(B, L, C // 2))
        att = torch.cat(outs, -1)  # [B, L, C]
        conv = self.dwconv(v_img)  # [B, C, H, W]
        cmap = self.channel_interaction(conv).view(B, 1, C)
        smap = self.spatial_interaction(att.transpose(1, 2).reshape(B, C, H, W))
        att = att * torch.sigmoid(cmap)
        conv = (torch.sigmoid(smap) * conv).flatten(2).transpose(1, 2)
        return self.proj(att + conv)


class ChannelMixer(nn.Module):
    """Adaptive channel self-attention (attention across channels per head, L2-normalised q/k,
    learnable temperature) + depthwise-conv branch, crossed gates. [B, L, C] -> [B, L, C]."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dwconv = _conv_branch(dim)
        self.channel_interaction = _channel_gate(dim)
        self.spatial_interaction = _spatial_gate(dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, L, C = x.shape
        nh = self.num_heads
        q, k, v = self.qkv(x).view(B, L, 3, nh, C // nh).permute(2, 0, 3, 4, 1)  # each [B, nh, d, L]
        v_img = v.reshape(B, C, H, W)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature  # [B, nh, d, d]
        att = (attn.softmax(-1) @ v).reshape(B, C, L).transpose(1, 2)  # [B, L, C]
        conv = self.dwconv(v_img)
        cmap = self.channel_interaction(att.transpose(1, 2).reshape(B, C, H, W))  # [B, C, 1, 1]
        smap = self.spatial_interaction(conv).flatten(2).transpose(1, 2)  # [B, L, 1]
        att = att * torch.sigmoid(smap)
        conv = (conv * torch.sigmoid(cmap)).flatten(2).transpose(1, 2)
        return self.proj(att + conv)


class SpatialGateFFN(nn.Module):
    """Linear(C -> hid) -> GELU -> x1 * dwconv(LN(x2)) on the two halves -> Linear(hid/2 -> C)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(hidden // 2)
        self.conv = nn.Conv2d(hidden // 2, hidden // 2, 3, 1, 1, groups=hidden // 2)
        self.fc2 = nn.Linear(hidden // 2, dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = self.act(self.fc1(x))
        x1, x2 = x.chunk(2, dim=-1)
        B, L, C = x2.shape
        x2 = self.conv(self.norm(x2).transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)
        return self.fc2(x1 * x2)


def _shifted(group: int, block: int) -> bool:
    """DAT's shift pattern: blocks 2, 6, 10... of even groups, blocks 0, 4, 8... of odd groups."""
    return (group % 2 == 0 and block > 0 and (block - 2) % 4 == 0) or (group % 2 == 1 and block % 4 == 0)


class DATBlock(nn.Module):
    """Pre-norm block: x + mixer(LN(x)); x + FFN(LN(x)). Spatial mixer on even ``block`` indices."""

    def __init__(self, dim: int, num_heads: int, split: Sequence[int], expansion: float, group: int, block: int,
                 qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if block % 2 == 0:
            self.attn = SpatialMixer(dim, num_heads, split, _shifted(group, block), qkv_bias)
        else:
            self.attn = ChannelMixer(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = SpatialGateFFN(dim, int(dim * expansion))

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), H, W)
        return x + self.ffn(self.norm2(x), H, W)


class ResidualGroup(nn.Module):
    """``depth`` DAT blocks, then a 3x3 conv; skip over the group. Tokens [B, H*W, C]."""

    def __init__(self, dim: int, depth: int, num_heads: int, split: Sequence[int], expansion: float, group: int,
                 qkv_bias: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList([DATBlock(dim, num_heads, split, expansion, group, b, qkv_bias)
                                     for b in range(depth)])
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        res = x
        for blk in self.blocks:
            x = blk(x, H, W)
        B, L, C = x.shape
        x = self.conv(x.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)
        return res + x


@ARCH_REGISTRY.register()
class DAT(nn.Module):
    """Dual Aggregation Transformer (module doc). ``forward(lq [B, 3, h, w] in [0, 1]) -> [B, 3, h*s, w*s]``
    (not clamped). ``config`` holds the constructor arguments (saved next to the weights)."""

    def __init__(self, upscale: int = 4, in_chans: int = 3, embed_dim: int = 180,
                 depth: Sequence[int] = (6, 6, 6, 6, 6, 6), num_heads: Sequence[int] = (6, 6, 6, 6, 6, 6),
                 split_size: Sequence[int] = (8, 32), expansion_factor: float = 4.0, qkv_bias: bool = True,
                 num_feat: int = 64, img_range: float = 1.0, upsampler: str = 'pixelshuffle'):
        super().__init__()
        depth, num_heads = [int(d) for d in depth], [int(h) for h in num_heads]
        if len(depth) != len(num_heads) or not depth:
            raise ValueError(f'DAT: depth {depth} and num_heads {num_heads} must be non-empty lists of one length')
        if upscale < 1 or (upscale & (upscale - 1) and upscale != 3):
            raise ValueError(f'DAT: upscale must be 1, 3 or a power of 2, got {upscale}')
        if upsampler not in ('pixelshuffle', 'pixelshuffledirect'):
            raise ValueError(f"DAT: upsampler must be 'pixelshuffle' or 'pixelshuffledirect', got {upsampler!r}")
        if embed_dim < 16 or embed_dim % 2:
            raise ValueError(f'DAT: embed_dim must be even and >= 16 (its gates use C/8 and C/16), got {embed_dim}')
        self.config = dict(upscale=int(upscale), in_chans=int(in_chans), embed_dim=int(embed_dim), depth=depth,
                           num_heads=num_heads, split_size=[int(s) for s in split_size],
                           expansion_factor=float(expansion_factor), qkv_bias=bool(qkv_bias), num_feat=int(num_feat),
                           img_range=float(img_range), upsampler=upsampler)
        self.upscale, self.img_range, self.embed_dim = int(upscale), float(img_range), int(embed_dim)
        mean = torch.tensor(RGB_MEAN).view(1, 3, 1, 1) if in_chans == 3 else torch.zeros(1, 1, 1, 1)
        self.register_buffer('mean', mean, persistent=False)
        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        self.norm_in = nn.LayerNorm(embed_dim)
        self.layers = nn.ModuleList([ResidualGroup(embed_dim, d, h, split_size, expansion_factor, i, qkv_bias)
                                     for i, (d, h) in enumerate(zip(depth, num_heads))])
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1)
        self.upsampler = upsampler
        if upsampler == 'pixelshuffledirect':  # lightweight: one conv to 3*s*s channels + PixelShuffle(s)
            self.upsample = nn.Sequential(nn.Conv2d(embed_dim, in_chans * upscale * upscale, 3, 1, 1),
                                          nn.PixelShuffle(upscale))
        else:
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1),
                                                      nn.LeakyReLU(inplace=True))
            ups: List[nn.Module] = []
            if upscale == 3:
                ups += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
            else:
                for _ in range(int(math.log2(upscale))):
                    ups += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
            self.upsample = nn.Sequential(*ups)
            self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # hooks RealDAT overrides
    def before_group(self, i: int, x: torch.Tensor, cond):
        return x, cond

    def forward_features(self, f: torch.Tensor, cond=None) -> torch.Tensor:
        B, C, H, W = f.shape
        x = self.norm_in(f.flatten(2).transpose(1, 2))
        for i, layer in enumerate(self.layers):
            x, cond = self.before_group(i, x, cond)
            x = layer(x, H, W)
        x = self.norm(x)
        return x.transpose(1, 2).reshape(B, C, H, W)

    def forward(self, lq: torch.Tensor, cond=None) -> torch.Tensor:
        mean = self.mean.to(lq)
        x = (lq - mean) * self.img_range
        f = self.conv_first(x)
        f = self.conv_after_body(self.forward_features(f, cond)) + f
        if self.upsampler == 'pixelshuffledirect':
            out = self.upsample(f)
        else:
            out = self.conv_last(self.upsample(self.conv_before_upsample(f)))
        return out / self.img_range + mean
