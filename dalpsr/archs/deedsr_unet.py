"""DeeDSR's changes to the frozen SD UNet, made on a loaded diffusers ``UNet2DConditionModel``
(no copied diffusers code):

* **SPADE on every ResnetBlock2D** (22 in SD 2.1-base): a :class:`SPADE` module is added to each
  ``ResnetBlock2D`` as its child ``spade``, and a forward hook on the block's ``conv2`` turns the
  residual branch ``h = conv2(...)`` into ``h * (1 + gamma) + beta``, ``[gamma, beta]`` from the
  adapter's local map of the same spatial size (``conv3(128 -> C)(ReLU(conv3(256 -> 128)(map)))``).
  gamma and beta convolutions are zero-initialised, so at initialisation the UNet computes
  exactly what it computed before. The maps are handed over with :func:`set_local_maps` before
  each UNet call (keyed by ``(height, width)``). Parameter names: ``...resnets.N.spade.*``.
* **Cross-attention on the adapter's global tokens**: every ``attn2`` (cross-attention) gets new
  ``to_k`` / ``to_v`` ``Linear(context_dim -> inner, no bias)`` (512 -> C at full scale; no text
  encoder); ``unet.config.cross_attention_dim`` records the new size.

The authors' code wraps the whole SPADE module in ``zero_module`` (its shared convolution too).
With ReLU(0) = 0 that leaves gamma/beta weights and the shared convolution without gradient, so
only the two biases could train; here only the gamma/beta convolutions start at zero (as in
SPADE-based SR adapters such as StableSR), which keeps the UNet unchanged at initialisation.
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class SPADE(nn.Module):
    """``h [B, C, H, W]``, ``seg [B, label_nc, H, W]`` -> ``h * (1 + gamma) + beta``."""

    def __init__(self, channels: int, label_nc: int = 256, hidden: int = 128, kernel_size: int = 3):
        super().__init__()
        pad = kernel_size // 2
        self.mlp_shared = nn.Conv2d(label_nc, hidden, kernel_size, padding=pad)
        self.mlp_gamma = nn.Conv2d(hidden, channels, kernel_size, padding=pad)
        self.mlp_beta = nn.Conv2d(hidden, channels, kernel_size, padding=pad)
        for m in (self.mlp_gamma, self.mlp_beta):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, h: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        actv = F.relu(self.mlp_shared(seg.to(self.mlp_shared.weight.dtype)))
        gamma, beta = self.mlp_gamma(actv), self.mlp_beta(actv)
        return h * (1 + gamma.to(h.dtype)) + beta.to(h.dtype)


class LocalMaps:
    """Holder of the adapter's local maps for the SPADE hooks of one UNet."""

    def __init__(self):
        self.maps: Optional[Dict[Tuple[int, int], torch.Tensor]] = None


def resnet_blocks(unet) -> Iterator[Tuple[str, nn.Module]]:
    from diffusers.models.resnet import ResnetBlock2D
    for name, m in unet.named_modules():
        if isinstance(m, ResnetBlock2D):
            yield name, m


def cross_attentions(unet) -> Iterator[Tuple[str, nn.Module]]:
    from diffusers.models.attention_processor import Attention
    for name, m in unet.named_modules():
        if isinstance(m, Attention) and name.endswith('attn2'):
            yield name, m


def add_spade(unet, label_nc: int = 256, hidden: int = 128) -> LocalMaps:
    """Give every ResnetBlock2D of ``unet`` a zero-initialised SPADE on its residual branch (module
    doc). Returns the :class:`LocalMaps` the hooks read (also ``unet._deedsr_maps``). New modules
    are created in float32 on the UNet's device."""
    if getattr(unet, '_deedsr_maps', None) is not None:
        raise RuntimeError('this UNet already has DeeDSR SPADE layers')
    holder = LocalMaps()
    device = next(unet.parameters()).device
    for _, block in resnet_blocks(unet):
        block.spade = SPADE(block.conv2.out_channels, label_nc, hidden).to(device)

        def hook(conv, inputs, out, block=block):
            maps = holder.maps
            if maps is None:
                raise RuntimeError('DeeDSR UNet called without local maps (set_local_maps before the UNet call)')
            key = tuple(out.shape[-2:])
            if key not in maps:
                raise KeyError(f'no local map of size {key} for a ResnetBlock2D (have {sorted(maps)})')
            return block.spade(out, maps[key])
        block.conv2.register_forward_hook(hook)
    unet._deedsr_maps = holder
    return holder


def set_local_maps(unet, maps: Dict[Tuple[int, int], torch.Tensor]) -> None:
    """Hand the adapter's ``{(h, w): [B, label_nc, h, w]}`` to the SPADE hooks of ``unet`` (kept
    until the next call, so gradient checkpointing can recompute with them)."""
    holder = getattr(unet, '_deedsr_maps', None)
    if holder is None:
        raise RuntimeError('this UNet has no DeeDSR SPADE layers (add_spade first)')
    holder.maps = dict(maps)


def rebuild_cross_attention(unet, context_dim: int = 512) -> int:
    """New random ``to_k``/``to_v`` (``context_dim`` -> inner, no bias) in every ``attn2``; returns
    how many attention layers were rebuilt."""
    n = 0
    device = next(unet.parameters()).device
    for _, attn in cross_attentions(unet):
        inner_k = attn.to_k.out_features
        inner_v = attn.to_v.out_features
        attn.to_k = nn.Linear(context_dim, inner_k, bias=False).to(device)
        attn.to_v = nn.Linear(context_dim, inner_v, bias=False).to(device)
        if hasattr(attn, 'cross_attention_dim'):
            attn.cross_attention_dim = context_dim
        n += 1
    if n:
        unet.register_to_config(cross_attention_dim=context_dim)
    return n


def deedsr_unet(unet, context_dim: int = 512, label_nc: int = 256, hidden: int = 128) -> LocalMaps:
    """Both changes (module doc) on a loaded UNet; returns the :class:`LocalMaps` holder."""
    rebuild_cross_attention(unet, context_dim)
    return add_spade(unet, label_nc, hidden)


def trained_unet_state(unet) -> Dict[str, torch.Tensor]:
    """The UNet parameters DeeDSR trains: every ``*spade*`` and ``*attn2*`` tensor."""
    return {k: v.detach().cpu() for k, v in unet.state_dict().items() if '.spade.' in k or '.attn2.' in k}
