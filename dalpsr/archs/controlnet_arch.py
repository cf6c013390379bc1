"""DaLPSR's ControlNet: a trainable copy of the SD UNet encoder conditioned on the LR image.

Paper III-A / Fig. 2: the latent of the LR image, z_LR, enters a ControlNet initialised from
the frozen SD 2.1-base UNet; its zero-initialised outputs are added to the UNet's skip
connections and middle block. Two conditioning modes (option ``condition_mode``):

- ``'latent'`` (paper, default): the LR image is bicubically upsampled by ``scale`` to the
  output size, encoded by the frozen VAE (``mean * scaling_factor``) to ``[B, 4, H/8, W/8]``,
  and mapped by a small conditioning embedding (``conv 4->C, SiLU, zero conv C->320``, no
  downsampling) onto the ControlNet's input features.
- ``'image'``: the upsampled LR ``[B, 3, H, W]`` in [0, 1] goes through diffusers' standard
  conditioning embedding (4 conv stages with 3 stride-2 steps, 16-32-96-256 channels).

:class:`DaLPSRControlNet` subclasses diffusers' ``ControlNetModel`` without new config keys
(the mode follows from ``conditioning_channels`` and the embedding depth), so its
``save_pretrained`` dir also loads as a plain ``ControlNetModel``. The call is diffusers'::

    down, mid = controlnet(x_t, t, encoder_hidden_states=emb, controlnet_cond=cond,
                           conditioning_scale=s, return_dict=False)
    eps = unet(x_t, t, encoder_hidden_states=emb, down_block_additional_residuals=down,
               mid_block_additional_residual=mid).sample

An exported model is ``<dir>/controlnet/`` (save_pretrained) plus ``<dir>/dalpsr.json``
(condition mode, scale, SD source, prompt composition) — see :func:`export_dalpsr`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from dalpsr.utils.registry import ARCH_REGISTRY

CONDITION_MODES = ('latent', 'image')
#: Default conditioning-embedding channels per mode.
DEFAULT_EMBED_CHANNELS = {'latent': (256,), 'image': (16, 32, 96, 256)}
EXPORT_META = 'dalpsr.json'
EXPORT_FORMAT = 'dalpsr-controlnet-v1'


def _controlnet_base():
    from diffusers import ControlNetModel
    return ControlNetModel


def _make_class():
    ControlNetModel = _controlnet_base()

    class DaLPSRControlNet(ControlNetModel):
        """diffusers ``ControlNetModel`` with DaLPSR's LR conditioning (see module docstring).

        Input of ``forward``: ``sample`` x_t ``[B,4,H/8,W/8]``, ``timestep`` [B] or scalar,
        ``encoder_hidden_states`` [B, L, D], ``controlnet_cond`` from :func:`prepare_condition`
        (latent ``[B,4,H/8,W/8]`` or image ``[B,3,H,W]`` in [0,1]). Output: residuals for the
        UNet's down blocks (tuple) and mid block, scaled by ``conditioning_scale``.
        """

        @property
        def condition_mode(self) -> str:
            return condition_mode_of(self)

        @classmethod
        def from_unet(cls, unet, condition_mode: str = 'latent',
                      conditioning_embedding_out_channels: Optional[Sequence[int]] = None,
                      load_weights_from_unet: bool = True, **kwargs):
            """Build a ControlNet whose encoder copies ``unet``'s (weights too by default).

            ``condition_mode``: 'latent' (z_LR, ``unet.config.in_channels`` channels at the latent
            size) or 'image' (RGB at the output size). ``conditioning_embedding_out_channels``
            defaults to :data:`DEFAULT_EMBED_CHANNELS` [mode]; in latent mode it must have one
            entry (no downsampling).
            """
            if condition_mode not in CONDITION_MODES:
                raise ValueError(f"condition_mode must be one of {CONDITION_MODES}, got {condition_mode!r}")
            chans = tuple(conditioning_embedding_out_channels or DEFAULT_EMBED_CHANNELS[condition_mode])
            if condition_mode == 'latent':
                if len(chans) != 1:
                    raise ValueError("latent condition mode: conditioning_embedding_out_channels must have one "
                                     f"entry (the latent is already at the UNet's resolution), got {list(chans)}")
                cond_ch = unet.config.in_channels
            else:
                if len(chans) < 2:
                    raise ValueError("image condition mode: conditioning_embedding_out_channels needs one entry "
                                     "per stage (len-1 stride-2 steps; 4 entries for SD's factor 8)")
                cond_ch = 3
            return super().from_unet(unet, conditioning_embedding_out_channels=chans,
                                     load_weights_from_unet=load_weights_from_unet,
                                     conditioning_channels=cond_ch, **kwargs)

    DaLPSRControlNet.__module__ = __name__
    DaLPSRControlNet.__qualname__ = 'DaLPSRControlNet'
    return DaLPSRControlNet


_CLASS = None


def __getattr__(name):  # lazy: importing dalpsr.archs must not import diffusers
    if name == 'DaLPSRControlNet':
        return get_controlnet_class()
    raise AttributeError(name)


def get_controlnet_class():
    """The :class:`DaLPSRControlNet` class (built on first use so diffusers loads lazily)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _make_class()
        ARCH_REGISTRY.register(_CLASS, name='DaLPSRControlNet')
    return _CLASS


def condition_mode_of(controlnet) -> str:
    """'latent' or 'image', read from a ControlNet's config (or a config dict)."""
    cfg = controlnet.config if hasattr(controlnet, 'config') else controlnet
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    chans = get('conditioning_embedding_out_channels') or DEFAULT_EMBED_CHANNELS['image']
    if get('conditioning_channels', 3) == get('in_channels', 4) and len(chans) == 1:
        return 'latent'
    return 'image'


def upsample_lq(lq: torch.Tensor, scale: int = 4, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Bicubic upsampling of ``lq`` [B,3,h,w] in [0,1] to ``size`` or ``(h*scale, w*scale)``,
    clamped to [0,1]."""
    if lq.dim() != 4 or lq.shape[1] != 3:
        raise ValueError(f"lq must be [B,3,h,w], got {tuple(lq.shape)}")
    size = tuple(size) if size is not None else (lq.shape[-2] * scale, lq.shape[-1] * scale)
    if tuple(lq.shape[-2:]) == size:
        return lq
    up = F.interpolate(lq.float(), size=size, mode='bicubic', align_corners=False)
    return up.clamp_(0, 1).to(lq.dtype)


def prepare_condition(controlnet_or_mode: Union[str, Any], lq: torch.Tensor, vae=None, scale: int = 4,
                      size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """The ControlNet condition for LR images ``lq`` [B,3,h,w] in [0,1].

    latent mode: VAE latent of the upsampled LR, ``mean * scaling_factor``, ``[B,4,H/8,W/8]``
    (needs ``vae``; H, W multiples of the VAE factor). image mode: the upsampled LR
    ``[B,3,H,W]`` in [0,1]. ``H, W = size or (h*scale, w*scale)``. No gradients flow into the
    VAE. The result has the ControlNet's dtype when a ControlNet is passed.
    """
    mode = controlnet_or_mode if isinstance(controlnet_or_mode, str) else condition_mode_of(controlnet_or_mode)
    if mode not in CONDITION_MODES:
        raise ValueError(f"condition mode must be one of {CONDITION_MODES}, got {mode!r}")
    up = upsample_lq(lq, scale, size)
    if mode == 'latent':
        if vae is None:
            raise ValueError("latent condition mode needs the VAE")
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if up.shape[-2] % factor or up.shape[-1] % factor:
            raise ValueError(f"upsampled LR size {tuple(up.shape[-2:])} is not a multiple of the VAE factor {factor}")
        from dalpsr.archs.sd_components import encode_images
        with torch.no_grad():
            cond = encode_images(vae, up)
    else:
        cond = up
    if not isinstance(controlnet_or_mode, str) and hasattr(controlnet_or_mode, 'dtype'):
        cond = cond.to(controlnet_or_mode.dtype)
    return cond


def controlled_unet(unet, controlnet, x_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor,
                    cond: torch.Tensor, conditioning_scale: float = 1.0) -> torch.Tensor:
    """UNet output (eps or v, per the scheduler config) with ControlNet residuals added.
    ``x_t`` [B,4,h,w], ``t`` [B] long, ``emb`` [B,L,D], ``cond`` from :func:`prepare_condition`."""
    down, mid = controlnet(x_t, t, encoder_hidden_states=emb, controlnet_cond=cond,
                           conditioning_scale=conditioning_scale, return_dict=False)
    dtype = getattr(unet, 'module', unet).dtype  # unet may be wrapped (DDP)
    return unet(x_t.to(dtype), t, encoder_hidden_states=emb.to(dtype),
                down_block_additional_residuals=[d.to(dtype) for d in down],
                mid_block_additional_residual=mid.to(dtype)).sample


# ---- export / load ---------------------------------------------------------------------------

def export_dalpsr(out_dir, controlnet, meta: Dict[str, Any]) -> Path:
    """Write ``<out_dir>/controlnet/`` (save_pretrained, safetensors) and ``<out_dir>/dalpsr.json``.

    ``meta`` should hold at least ``sd`` (the SD options block), ``scale`` and ``prompt``
    (composition options); ``condition_mode`` and ``format`` are added. Files are written to a
    temporary folder first, then moved into place.
    """
    import os
    import shutil

    from dalpsr.utils.misc import atomic_write_json
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f'.controlnet.tmp{os.getpid()}'
    if tmp.exists():
        shutil.rmtree(tmp)
    controlnet.save_pretrained(tmp, safe_serialization=True)
    final = out / 'controlnet'
    if final.exists():
        old = out / f'.controlnet.old{os.getpid()}'
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    meta = dict(meta)
    meta['format'] = EXPORT_FORMAT
    meta['condition_mode'] = condition_mode_of(controlnet)
    atomic_write_json(out / EXPORT_META, meta)
    return out


def load_dalpsr_export(path, device=None, dtype=None):
    """Load an export dir written by :func:`export_dalpsr` -> ``(controlnet, meta)``.

    ``path`` is the export dir (holding ``controlnet/`` and ``dalpsr.json``). Raises
    ``FileNotFoundError`` naming the missing file.
    """
    root = Path(path)
    meta_path = root / EXPORT_META
    cn_cfg = root / 'controlnet' / 'config.json'
    for need in (meta_path, cn_cfg):
        if not need.is_file():
            raise FileNotFoundError(f"missing {need} (a DaLPSR export dir holds controlnet/ and {EXPORT_META}, "
                                    "written at the end of training under experiments/<name>/export/)")
    meta = json.loads(meta_path.read_text(encoding='utf-8'))
    kwargs = {'torch_dtype': dtype} if dtype is not None else {}
    controlnet = get_controlnet_class().from_pretrained(root / 'controlnet', **kwargs)
    if device is not None:
        controlnet.to(device)
    controlnet.eval()
    return controlnet, meta
