"""SSP-IR's prior-guided attention, installed into diffusers' UNet / ControlNet by wrapping modules.

Paper III-D (Fig. 2) and the authors' code: in every cross-attention block of the UNet and the
ControlNet, after the resnet, a new **image attention** (a full ``Transformer2DModel``: self-attn,
cross-attn on the refined CLIP tokens ``T_img`` [B, N, D_img], feed-forward) runs *before* the
original text attention. In the UNet's up blocks a **structure attention** (again a full
``Transformer2DModel``) runs after the text attention: its keys/values are the ControlNet residual of
the skip connection that the layer's resnet consumes, flattened to ``[B, h*w, C_skip]``
(``cross_attention_dim = C_skip``). The residuals are also added to the skips as in a normal
ControlNet (diffusers does that).

Nothing of diffusers is copied. Two wrappers replace modules in place:

- :class:`PriorGuidedAttention` replaces ``block.attentions[i]`` (the original text
  ``Transformer2DModel`` becomes its child ``text_attn``) in CrossAttn down / mid / up blocks;
- :class:`StructureUpBlock` replaces a plain ``UpBlock2D`` (no text attention: resnet ->
  structure attention per layer). The authors' code also puts structure attentions there (one head,
  ``cross_attention_dim = out_channels``, which is the skip width in SD); they are part of the 997.80 M trainable parameters of
  Table VI, so they are on by default (``structure_in_plain_up_blocks``).

The priors travel in ``cross_attention_kwargs['sspir']`` (no hidden state on the modules, so
gradient checkpointing recomputes correctly)::

    cross_attention_kwargs = {'sspir': {'image': T_img,                 # [B, N, D_img]
                                        'structure': down_residuals}}   # ControlNet outputs, one per skip

Each wrapper pops the key before calling the original modules. Without the key a wrapped model
behaves like the original with the new layers skipped.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

PRIOR_KEY = 'sspir'


def _transformer_like(text_attn, cross_attention_dim: int, heads: Optional[int] = None, zero_init: bool = False):
    """A new ``Transformer2DModel`` shaped like ``text_attn`` with another context width."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    c = text_attn.config
    n_heads = int(heads or c.num_attention_heads)
    width = int(c.num_attention_heads) * int(c.attention_head_dim)
    m = Transformer2DModel(num_attention_heads=n_heads, attention_head_dim=width // n_heads,
                           in_channels=c.in_channels, num_layers=c.num_layers,
                           cross_attention_dim=int(cross_attention_dim), norm_num_groups=c.norm_num_groups,
                           use_linear_projection=c.use_linear_projection,
                           only_cross_attention=c.only_cross_attention, upcast_attention=c.upcast_attention)
    if zero_init:
        _zero(m.proj_out)
    return m


def _plain_transformer(channels: int, groups: int, cross_attention_dim: int, zero_init: bool = False):
    """One-head ``Transformer2DModel`` (the authors' structure attention in plain ``UpBlock2D``)."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    m = Transformer2DModel(num_attention_heads=1, attention_head_dim=channels, in_channels=channels, num_layers=1,
                           cross_attention_dim=int(cross_attention_dim), norm_num_groups=groups)
    if zero_init:
        _zero(m.proj_out)
    return m


def _zero(module: nn.Module) -> None:
    for p in module.parameters():
        nn.init.zeros_(p)


def _cast(m, dtype):
    if m is None or dtype == torch.float32:
        return m
    return nn.Module.to(m, dtype=dtype)  # plain cast (diffusers' to() warns about fp32-kept modules)


def _split_priors(cross_attention_kwargs) -> Tuple[Optional[Dict[str, Any]], Optional[Dict[str, Any]]]:
    if not cross_attention_kwargs or PRIOR_KEY not in cross_attention_kwargs:
        return None, cross_attention_kwargs
    rest = {k: v for k, v in cross_attention_kwargs.items() if k != PRIOR_KEY}
    return cross_attention_kwargs[PRIOR_KEY], (rest or None)


def _flatten(res: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h*w, C]."""
    b, c, h, w = res.shape
    return res.reshape(b, c, h * w).transpose(1, 2)


class PriorGuidedAttention(nn.Module):
    """image attention (context ``T_img``) -> original text attention -> [structure attention].

    Called like a diffusers ``Transformer2DModel``: ``hidden_states`` [B, C, h, w] ->
    ``(out,)`` (``return_dict=False``) with ``out`` [B, C, h, w]. ``skip_index`` (structure
    attention only) is the index, in the ControlNet's residual tuple, of the skip that the
    preceding resnet consumed; its residual [B, C_skip, h, w] gives the keys/values.
    """

    def __init__(self, text_attn: nn.Module, image_attn: nn.Module, structure_attn: Optional[nn.Module] = None,
                 skip_index: Optional[int] = None):
        super().__init__()
        self.text_attn = text_attn
        self.image_attn = image_attn
        self.structure_attn = structure_attn
        self.skip_index = skip_index

    @property
    def config(self):  # diffusers code reads attn.config in places (e.g. FreeU checks)
        return self.text_attn.config

    def forward(self, hidden_states, encoder_hidden_states=None, cross_attention_kwargs=None, attention_mask=None,
                encoder_attention_mask=None, return_dict: bool = True, **kwargs):
        priors, rest = _split_priors(cross_attention_kwargs)
        if priors is not None and priors.get('image') is not None:
            hidden_states = self.image_attn(hidden_states, encoder_hidden_states=priors['image'],
                                            cross_attention_kwargs=rest, return_dict=False)[0]
        hidden_states = self.text_attn(hidden_states, encoder_hidden_states=encoder_hidden_states,
                                       cross_attention_kwargs=rest, attention_mask=attention_mask,
                                       encoder_attention_mask=encoder_attention_mask, return_dict=False, **kwargs)[0]
        if self.structure_attn is not None and priors is not None and priors.get('structure') is not None:
            res = priors['structure'][self.skip_index]
            hidden_states = self.structure_attn(hidden_states, encoder_hidden_states=_flatten(res).to(hidden_states.dtype),
                                                cross_attention_kwargs=rest, return_dict=False)[0]
        if not return_dict:
            return (hidden_states,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput
        return Transformer2DModelOutput(sample=hidden_states)


class StructureUpBlock(nn.Module):
    """A diffusers ``UpBlock2D`` with a structure attention after each resnet.

    Declares ``has_cross_attention`` so the UNet passes ``cross_attention_kwargs``; the skip
    handling (pop the last skip, concatenate, resnet, upsample) is the ``UpBlock2D``'s own
    modules, called in its order. FreeU is not supported on a wrapped block.
    """

    has_cross_attention = True

    def __init__(self, block: nn.Module, structure_attns: List[nn.Module], skip_indices: List[int]):
        super().__init__()
        self.block = block
        self.structure_attentions = nn.ModuleList(structure_attns)
        self.skip_indices = list(skip_indices)

    @property
    def resnets(self):
        return self.block.resnets

    @property
    def upsamplers(self):
        return self.block.upsamplers

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, upsample_size=None,
                encoder_hidden_states=None, cross_attention_kwargs=None, attention_mask=None,
                encoder_attention_mask=None, **kwargs):
        priors, rest = _split_priors(cross_attention_kwargs)
        structure = priors.get('structure') if priors is not None else None
        blk = self.block
        for resnet, attn, k in zip(blk.resnets, self.structure_attentions, self.skip_indices):
            skip = res_hidden_states_tuple[-1]
            res_hidden_states_tuple = res_hidden_states_tuple[:-1]
            hidden_states = torch.cat([hidden_states, skip], dim=1)
            if torch.is_grad_enabled() and getattr(blk, 'gradient_checkpointing', False):
                hidden_states = blk._gradient_checkpointing_func(resnet, hidden_states, temb)
            else:
                hidden_states = resnet(hidden_states, temb)
            if structure is not None:
                hidden_states = attn(hidden_states, encoder_hidden_states=_flatten(structure[k]).to(hidden_states.dtype),
                                     cross_attention_kwargs=rest, return_dict=False)[0]
        if blk.upsamplers is not None:
            for up in blk.upsamplers:
                hidden_states = up(hidden_states, upsample_size)
        return hidden_states


# ---- installation ----------------------------------------------------------------------------

def _num_skips(model) -> int:
    """Skip connections of a UNet/ControlNet encoder: conv_in + every resnet and downsampler."""
    n = 1
    for blk in model.down_blocks:
        n += len(blk.resnets) + (len(blk.downsamplers) if getattr(blk, 'downsamplers', None) else 0)
    return n


def up_block_skip_indices(unet) -> List[List[int]]:
    """For each UNet up block, the index (in the ControlNet's down-residual tuple) of the skip each
    of its resnets consumes: skips are used last-in first-out."""
    nxt = _num_skips(unet) - 1
    out = []
    for blk in unet.up_blocks:
        idx = list(range(nxt, nxt - len(blk.resnets), -1))
        nxt -= len(blk.resnets)
        out.append(idx)
    if nxt != -1:
        raise ValueError(f'the up blocks consume {_num_skips(unet) - 1 - nxt} skips, the encoder makes {_num_skips(unet)}')
    return out


def skip_channels(model) -> List[int]:
    """Channels of each skip connection, in the order of the ControlNet's down residuals."""
    ch = [model.conv_in.out_channels]
    for blk in model.down_blocks:
        for r in blk.resnets:
            ch.append(r.out_channels)
        for d in (getattr(blk, 'downsamplers', None) or []):
            ch.append(d.out_channels)
    return ch


def is_installed(model) -> bool:
    return any(isinstance(m, (PriorGuidedAttention, StructureUpBlock)) for m in model.modules())


def install_prior_attention(model, image_dim: int, structure: bool = False, structure_in_plain_up_blocks: bool = True,
                            zero_init: bool = False) -> List[str]:
    """Install SSP-IR's new attentions into a diffusers UNet (``structure=True``) or ControlNet.

    Image attentions go into every CrossAttn down / mid / up block; with ``structure``, structure
    attentions go into every up block (CrossAttn ones after the text attention; plain ``UpBlock2D``
    too when ``structure_in_plain_up_blocks``). New layers use diffusers' default init (zero
    ``proj_out`` if ``zero_init``) from the current torch RNG and the model's device/dtype.
    Returns the dotted names of the new sub-modules (``...image_attn``, ``...structure_attn``,
    ``...structure_attentions``): the trainable part of the model.
    """
    if is_installed(model):
        raise ValueError('prior-guided attention is already installed in this model')
    p = next(model.parameters())
    factory = {'device': p.device, 'dtype': p.dtype}
    new: List[str] = []
    chans = skip_channels(model)

    def wrap(prefix: str, blk, skip_idx: Optional[List[int]] = None) -> None:
        for i, ta in enumerate(blk.attentions):
            with torch.device(factory['device']):
                img = _transformer_like(ta, image_dim, zero_init=zero_init)
                st = None
                if skip_idx is not None:
                    st = _transformer_like(ta, chans[skip_idx[i]], zero_init=zero_init)
            img, st = _cast(img, factory['dtype']), _cast(st, factory['dtype'])
            blk.attentions[i] = PriorGuidedAttention(ta, img, st, skip_idx[i] if skip_idx is not None else None)
            new.append(f'{prefix}.attentions.{i}.image_attn')
            if st is not None:
                new.append(f'{prefix}.attentions.{i}.structure_attn')

    for b, blk in enumerate(model.down_blocks):
        if getattr(blk, 'has_cross_attention', False):
            wrap(f'down_blocks.{b}', blk)
    mid = getattr(model, 'mid_block', None)
    if mid is not None and getattr(mid, 'has_cross_attention', False):
        wrap('mid_block', mid)
    if structure:
        for b, (blk, idx) in enumerate(zip(model.up_blocks, up_block_skip_indices(model))):
            if getattr(blk, 'has_cross_attention', False):
                wrap(f'up_blocks.{b}', blk, idx)
            elif structure_in_plain_up_blocks:
                attns = []
                for r, k in zip(blk.resnets, idx):  # context = the skip's channels (= out_channels in SD)
                    with torch.device(factory['device']):
                        attns.append(_cast(_plain_transformer(r.out_channels, r.norm2.num_groups, chans[k],
                                                              zero_init), factory['dtype']))
                model.up_blocks[b] = StructureUpBlock(blk, attns, idx)
                new.append(f'up_blocks.{b}.structure_attentions')
    elif getattr(model, 'up_blocks', None) is not None:
        for b, blk in enumerate(model.up_blocks):
            if getattr(blk, 'has_cross_attention', False):
                wrap(f'up_blocks.{b}', blk)
    return new


def prior_modules(model) -> Iterator[Tuple[str, nn.Module]]:
    """(name, module) of every SSP-IR layer installed in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, PriorGuidedAttention):
            yield f'{name}.image_attn', m.image_attn
            if m.structure_attn is not None:
                yield f'{name}.structure_attn', m.structure_attn
        elif isinstance(m, StructureUpBlock):
            yield f'{name}.structure_attentions', m.structure_attentions


def prior_kwargs(image: Optional[torch.Tensor], structure=None) -> Dict[str, Any]:
    """``cross_attention_kwargs`` carrying the priors (see the module docstring)."""
    return {PRIOR_KEY: {'image': image, 'structure': tuple(structure) if structure is not None else None}}
