"""SSP-IR's networks (TCSVT 2025; spec: ../shared/specs/related-methods.md section 1).

- :class:`Processor` (replaces ControlNet's conditioning embedding, trainable): the LR image
  bicubic-upsampled to the output size, ``[B,3,H,W]`` in [0,1] ->
  ``F [B, C0, H/f, W/f]`` (``C0`` = the ControlNet's first block width, 320 for SD) and the
  RGB heads ``[I_1/2, I_1/4, ...]`` (``[B,3,H/2^k,W/2^k]``, one per stride-2 stage; k = 1..log2 f,
  f = the VAE scale factor, so SD gets 1/2, 1/4, 1/8). ``conv3x3 3->c0 + SiLU``; per stage
  ``conv3x3 c->c + SiLU, conv3x3/2 c->c' + SiLU, to_rgb conv3x3 c'->3``; a zero-initialised
  ``conv3x3 c_last->C0`` gives F, which is added to the ControlNet's ``conv_in`` output (the
  ControlNet's own embedding slot holds an identity).
- :class:`RefineLayer`: frozen CLIP image tokens ``[B, N, D_clip]`` -> ``T_img [B, N, D_img]``:
  ``n x [Linear D->D, LayerNorm, LeakyReLU]`` then ``Linear D->D_img`` (SSP-IR: n=2, 1024 -> 512).
- :class:`CLIPImagePrior`: frozen ``transformers.CLIPVisionModel`` (``openai/clip-vit-large-patch14``):
  LR up-sampled to the output size, resized (bicubic) to the CLIP input size, CLIP mean/std,
  ``hidden_states[layer][:, 1:]`` (``layer`` -1 = the last = 24 for ViT-L/14) -> ``[B, 256, 1024]``.
- :func:`build_sspir_networks`: the ControlNet (``from_unet``) and the prior-guided attention
  (dalpsr/archs/sspir_attention.py) installed into it and into the frozen UNet.

SD 1.5 (the paper's base) and SD 2.1-base configs are in ``dalpsr/archs/configs``;
:func:`sd15_configs` reads them (used to count parameters on the meta device and by the benchmark).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dalpsr.utils.registry import ARCH_REGISTRY

CONFIG_DIR = Path(__file__).resolve().parent / 'configs'
DEFAULT_CLIP = 'openai/clip-vit-large-patch14'
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: Processor widths of the authors' code (input conv, then one entry per stride-2 stage).
PROCESSOR_CHANNELS = (16, 32, 96, 256)
EXPORT_META = 'sspir.json'
EXPORT_WEIGHTS = 'sspir_trainable.safetensors'
EXPORT_FORMAT = 'dalpsr-sspir-v1'


@ARCH_REGISTRY.register()
class Processor(nn.Module):
    """SSP-IR's constrained Processor (see the module docstring for shapes).

    ``out_channels``: the ControlNet's first block width; ``vae_scale_factor`` (a power of 2)
    fixes the number of stride-2 stages (log2); ``channels`` has one entry more than stages.
    """

    def __init__(self, out_channels: int = 320, vae_scale_factor: int = 8,
                 channels: Sequence[int] = PROCESSOR_CHANNELS, in_channels: int = 3):
        super().__init__()
        f = int(vae_scale_factor)
        if f < 2 or f & (f - 1):
            raise ValueError(f'vae_scale_factor must be a power of 2 >= 2, got {vae_scale_factor}')
        n = int(math.log2(f))
        channels = [int(c) for c in channels]
        if len(channels) != n + 1:
            raise ValueError(f'processor channels need {n + 1} entries (input conv + {n} stride-2 stages for the '
                             f'VAE scale factor {f}), got {channels}')
        self.num_stages = n
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        for c, c2 in zip(channels[:-1], channels[1:]):
            self.blocks.append(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.SiLU(),
                                             nn.Conv2d(c, c2, 3, padding=1, stride=2), nn.SiLU()))
            self.to_rgbs.append(nn.Conv2d(c2, 3, 3, padding=1))
        self.conv_out = nn.Conv2d(channels[-1], int(out_channels), 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """``image`` [B,3,H,W] in [0,1] (H, W multiples of the VAE factor) ->
        ``(F [B,C0,H/f,W/f], [I_1/2, I_1/4, ..., I_1/f])``."""
        h = F.silu(self.conv_in(image))
        rgbs = []
        for blk, rgb in zip(self.blocks, self.to_rgbs):
            h = blk(h)
            rgbs.append(rgb(h))
        return self.conv_out(h), rgbs


@ARCH_REGISTRY.register()
class RefineLayer(nn.Module):
    """``[B, N, in_dim]`` -> ``[B, N, out_dim]``: ``num_layers x [Linear, LayerNorm, LeakyReLU]``
    at ``in_dim`` width, then a Linear to ``out_dim`` (paper III-B: three MLP layers, no
    activation after the last)."""

    def __init__(self, in_dim: int = 1024, out_dim: int = 512, num_layers: int = 2, negative_slope: float = 0.01):
        super().__init__()
        layers: List[nn.Module] = []
        for _ in range(int(num_layers)):
            layers += [nn.Linear(in_dim, in_dim), nn.LayerNorm(in_dim), nn.LeakyReLU(negative_slope)]
        layers.append(nn.Linear(in_dim, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)


class CLIPImagePrior(nn.Module):
    """Frozen CLIP vision tower -> patch tokens of one layer (see the module docstring)."""

    def __init__(self, vision_model, layer: int = -1):
        super().__init__()
        self.model = vision_model
        self.layer = int(layer)
        n = vision_model.config.num_hidden_layers
        if not -(n + 1) <= self.layer <= n:
            raise ValueError(f'clip layer must be in [-{n + 1}, {n}] for a {n}-layer vision tower, got {layer}')
        self.register_buffer('mean', torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.model.requires_grad_(False)
        self.model.eval()

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def forward(self, image_up: torch.Tensor) -> torch.Tensor:
        """``image_up`` [B,3,H,W] in [0,1] (the LR up-sampled to the output size) ->
        ``[B, (S/p)^2, D]`` float32 (S = CLIP input size, p = patch size)."""
        s = int(self.model.config.image_size)
        x = image_up.float()
        if tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode='bicubic', align_corners=False).clamp_(0, 1)
        p = next(self.model.parameters())
        x = ((x - self.mean.to(x.device)) / self.std.to(x.device)).to(device=p.device, dtype=p.dtype)
        out = self.model(pixel_values=x, output_hidden_states=True)
        return out.hidden_states[self.layer][:, 1:].float()


def load_clip_vision(pretrained: str = DEFAULT_CLIP, dtype=None):
    """``CLIPVisionModel.from_pretrained`` with a one-line error naming what is missing."""
    from transformers import CLIPVisionModel
    local = os.path.isdir(os.path.expanduser(str(pretrained)))
    if local:
        root = Path(os.path.expanduser(str(pretrained)))
        if not (root / 'config.json').is_file():
            raise FileNotFoundError(f"missing {root / 'config.json'} (a CLIP vision model saved with save_pretrained)")
        if not any((root / n).is_file() for n in ('model.safetensors', 'pytorch_model.bin')):
            raise FileNotFoundError(f"missing {root / 'model.safetensors'} (weights of the CLIP vision model)")
    kwargs = {'dtype': dtype} if dtype is not None else {}
    try:
        return CLIPVisionModel.from_pretrained(str(pretrained), **kwargs)
    except (OSError, ValueError) as err:
        if local:
            raise FileNotFoundError(f'could not load the CLIP vision model from {pretrained}: '
                                    f'{str(err).splitlines()[0]}') from None
        name = str(pretrained).rstrip('/').split('/')[-1]
        raise FileNotFoundError(f"could not load the CLIP vision model '{pretrained}' (not in the local HF cache); "
                                f"download it once with `huggingface-cli download {pretrained} --local-dir "
                                f"pretrained_models/{name}` and set clip.pretrained: pretrained_models/{name}") from None


#: Tiny CLIP vision tower for tests and the CPU recipe (same class, 32x32 input, 16 patch tokens).
TINY_CLIP_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                        image_size=32, patch_size=8, projection_dim=32, hidden_act='quick_gelu')


def build_tiny_clip_vision(out_dir, seed: int = 0, overwrite: bool = False) -> str:
    """Write a tiny randomly initialised ``CLIPVisionModel`` (save_pretrained) to ``out_dir``."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f'{out} exists and is not empty; refusing to overwrite it')
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP_VISION))
    tmp = out.with_name(f'.{out.name}.tmp{os.getpid()}')
    model.save_pretrained(tmp)
    if out.exists():
        import shutil
        shutil.rmtree(out)
    os.replace(tmp, out)
    return str(out)


# ---- the trainable networks --------------------------------------------------------------------

ARCH_DEFAULTS: Dict[str, Any] = {
    'image_dim': 512,                  # width of T_img (the image attentions' cross_attention_dim)
    'refine_layers': 2,
    'refine_negative_slope': 0.01,
    'processor_channels': list(PROCESSOR_CHANNELS),
    'structure_attention': True,
    'structure_in_plain_up_blocks': True,
    'zero_init_attention': False,
    'copy_image_attention_to_controlnet': True,
}


def build_sspir_networks(unet, clip_hidden_size: int, vae_scale_factor: int, arch: Optional[Dict[str, Any]] = None,
                         seed: int = 0) -> Dict[str, Any]:
    """ControlNet + Processor + Refine layer, and the prior-guided attention installed in ``unet``
    (modified in place; its original weights stay, the new layers are drawn from ``seed``).

    ``arch``: keys of :data:`ARCH_DEFAULTS`. Returns ``{'controlnet', 'processor', 'refine',
    'unet_prior': [names of the new UNet modules]}``. Works on the meta device (for counting).
    The ControlNet is diffusers' ``ControlNetModel.from_unet`` (weights copied from the UNet) with
    the conditioning embedding replaced by an identity (F comes from the Processor); its image
    attentions copy the UNet's down/mid ones (as the authors' ``from_unet`` does) unless
    ``copy_image_attention_to_controlnet`` is false.
    """
    from diffusers import ControlNetModel

    from dalpsr.archs.sspir_attention import install_prior_attention
    a = dict(ARCH_DEFAULTS)
    a.update(arch or {})
    p = next(unet.parameters())
    meta = p.device.type == 'meta'
    with torch.random.fork_rng(devices=[] if p.device.type != 'cuda' else [p.device]):
        torch.manual_seed(int(seed))
        if meta:
            with torch.device('meta'):
                controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16,),
                                                       load_weights_from_unet=False)
        else:
            controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16,))
            controlnet.to(device=p.device, dtype=p.dtype)
        controlnet.controlnet_cond_embedding = nn.Identity()
        unet_new = install_prior_attention(unet, a['image_dim'], structure=bool(a['structure_attention']),
                                           structure_in_plain_up_blocks=bool(a['structure_in_plain_up_blocks']),
                                           zero_init=bool(a['zero_init_attention']))
        install_prior_attention(controlnet, a['image_dim'], zero_init=bool(a['zero_init_attention']))
        if a['copy_image_attention_to_controlnet'] and not meta:
            _copy_image_attentions(unet, controlnet)
        with torch.device(p.device):
            processor = Processor(controlnet.config.block_out_channels[0], vae_scale_factor, a['processor_channels'])
            refine = RefineLayer(int(clip_hidden_size), int(a['image_dim']), int(a['refine_layers']),
                                 float(a['refine_negative_slope']))
    return {'controlnet': controlnet, 'processor': processor, 'refine': refine, 'unet_prior': unet_new}


def _copy_image_attentions(unet, controlnet) -> None:
    from dalpsr.archs.sspir_attention import PriorGuidedAttention
    src = {n: m for n, m in unet.named_modules() if isinstance(m, PriorGuidedAttention)
           and (n.startswith('down_blocks') or n.startswith('mid_block'))}
    for n, m in controlnet.named_modules():
        if isinstance(m, PriorGuidedAttention) and n in src:
            m.image_attn.load_state_dict(src[n].image_attn.state_dict())


def count_parameters(modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


# ---- published configs -----------------------------------------------------------------------

def read_config(name: str) -> Dict[str, Any]:
    """A config json of ``dalpsr/archs/configs`` without its ``_``-keys."""
    cfg = json.loads((CONFIG_DIR / f'{name}.json').read_text())
    return {k: v for k, v in cfg.items() if not k.startswith('_')}


def sd15_configs() -> Dict[str, Dict[str, Any]]:
    """SD 1.5 ``unet``, ``vae``, ``text_encoder``, ``scheduler`` and the CLIP ViT-L/14 ``clip_vision`` configs."""
    out = {part: read_config(f'sd15_{part}') for part in ('unet', 'vae', 'text_encoder', 'scheduler', 'controlnet')}
    out['clip_vision'] = read_config('clip_vit_l14_vision')
    return out


def build_random_base(configs: Dict[str, Dict[str, Any]], device='meta', seed: int = 0) -> Dict[str, Any]:
    """UNet, VAE, text encoder, CLIP vision tower of ``configs`` (e.g. :func:`sd15_configs`)
    with random weights on ``device`` (``'meta'``: no memory, for counting parameters)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            return {'unet': UNet2DConditionModel.from_config(configs['unet']),
                    'vae': AutoencoderKL.from_config(configs['vae']),
                    'text_encoder': CLIPTextModel(CLIPTextConfig(**configs['text_encoder'])),
                    'clip_vision': CLIPVisionModel(CLIPVisionConfig(**configs['clip_vision']))}


# ---- export / load ---------------------------------------------------------------------------

def trainable_state_dict(parts: Dict[str, Any], unet) -> Dict[str, torch.Tensor]:
    """Every trained tensor, keyed ``controlnet.*``, ``processor.*``, ``refine.*``, ``unet.<new module>.*``."""
    from dalpsr.archs.sspir_attention import prior_modules
    sd: Dict[str, torch.Tensor] = {}
    for name in ('controlnet', 'processor', 'refine'):
        for k, v in parts[name].state_dict().items():
            sd[f'{name}.{k}'] = v.detach().cpu().contiguous()
    for mname, m in prior_modules(unet):
        for k, v in m.state_dict().items():
            sd[f'unet.{mname}.{k}'] = v.detach().cpu().contiguous()
    return sd


def load_trainable_state_dict(parts: Dict[str, Any], unet, sd: Dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`trainable_state_dict`; every key must match (strict)."""
    from dalpsr.archs.sspir_attention import prior_modules
    groups: Dict[str, Dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        head, _, rest = k.partition('.')
        groups.setdefault(head, {})[rest] = v
    for name in ('controlnet', 'processor', 'refine'):
        parts[name].load_state_dict(groups.pop(name, {}), strict=True)
    un = groups.pop('unet', {})
    for mname, m in prior_modules(unet):
        sub = {k[len(mname) + 1:]: v for k, v in un.items() if k.startswith(mname + '.')}
        m.load_state_dict(sub, strict=True)
        for k in sub:
            un.pop(f'{mname}.{k}')
    if un or groups:
        extra = sorted(list(un) + list(groups))[:3]
        raise KeyError(f'unexpected keys in the SSP-IR weights (e.g. {extra}); the export does not match this architecture')


def export_sspir(out_dir, parts: Dict[str, Any], unet, meta: Dict[str, Any]) -> Path:
    """``<out_dir>/sspir_trainable.safetensors`` + ``<out_dir>/sspir.json`` (atomic writes)."""
    from safetensors.torch import save_file

    from dalpsr.utils.misc import atomic_write_json
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f'.{EXPORT_WEIGHTS}.tmp{os.getpid()}'
    save_file(trainable_state_dict(parts, unet), str(tmp))
    os.replace(tmp, out / EXPORT_WEIGHTS)
    atomic_write_json(out / EXPORT_META, dict(meta, format=EXPORT_FORMAT))
    return out


def read_export_meta(path) -> Dict[str, Any]:
    root = Path(path)
    for need in (root / EXPORT_META, root / EXPORT_WEIGHTS):
        if not need.is_file():
            raise FileNotFoundError(f'missing {need} (an SSP-IR export dir holds {EXPORT_META} and {EXPORT_WEIGHTS}, '
                                    'written at the end of training under experiments/<name>/export/)')
    meta = json.loads((root / EXPORT_META).read_text(encoding='utf-8'))
    if meta.get('format') != EXPORT_FORMAT:
        raise ValueError(f'{root / EXPORT_META} is not an SSP-IR export (format {meta.get("format")!r})')
    return meta


def load_export_weights(path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(Path(path) / EXPORT_WEIGHTS))
