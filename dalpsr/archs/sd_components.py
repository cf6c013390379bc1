"""Stable Diffusion parts (VAE, UNet, CLIP text encoder, tokenizer, noise scheduler) for DaLPSR.

One options block names where they come from (C8 in the interface contract)::

    sd:
      pretrained: stabilityai/stable-diffusion-2-1-base   # HF id or a local diffusers-format dir
      revision: null          # git revision on the hub (ignored for local dirs)
      variant: null           # e.g. fp16 -> diffusion_pytorch_model.fp16.safetensors
      dtype: fp32             # fp32 | fp16 | bf16: dtype the parts are loaded in
      vae: null               # optional per-part overrides: a local dir or HF id (subfolder 'vae'
      unet: null              #   is NOT appended to an override: point at the folder that holds
      text_encoder: null      #   config.json)
      tokenizer: null

``load_sd_components(cfg)`` returns :class:`SDComponents`. Nothing is downloaded when
``HF_HUB_OFFLINE=1``; a missing file is reported in one line that names it and says where to
put it. ``build_tiny_sd(out_dir)`` writes a tiny, randomly initialised model in exactly the same
layout (used by tests, the tiny training config and the demo), so tests take the same loading
path as a user with real weights.

Conventions: images are float tensors in [0, 1] at the boundary of dalpsr; the VAE sees
[-1, 1]; latents are ``vae.encode(x).latent_dist.mean * vae.config.scaling_factor``
(``[B, 4, H/8, W/8]`` for SD).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch

#: Hub id of the paper's base model.
DEFAULT_SD = 'stabilityai/stable-diffusion-2-1-base'

#: Keys accepted in the ``sd`` options block.
SD_KEYS = ('pretrained', 'revision', 'variant', 'dtype', 'vae', 'unet', 'text_encoder', 'tokenizer')

_DTYPES = {'fp32': torch.float32, 'float32': torch.float32, 'no': torch.float32,
           'fp16': torch.float16, 'float16': torch.float16,
           'bf16': torch.bfloat16, 'bfloat16': torch.bfloat16}

# Files each part needs (any one of the weight alternatives).
_PART_FILES = {
    'unet': (['config.json'], ['diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin']),
    'vae': (['config.json'], ['diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin']),
    'text_encoder': (['config.json'], ['model.safetensors', 'pytorch_model.bin']),
    'tokenizer': ([], ['tokenizer.json', 'vocab.json']),  # vocab.json comes with merges.txt
    'scheduler': (['scheduler_config.json'], []),
}


class SDLoadError(FileNotFoundError):
    """A Stable Diffusion part could not be found/loaded; the message says what and where."""


def parse_dtype(name: Any) -> torch.dtype:
    """'fp32'|'fp16'|'bf16' (or a torch.dtype) -> torch.dtype."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower()
    if key not in _DTYPES:
        raise ValueError(f"dtype must be one of fp32, fp16, bf16, got {name!r}")
    return _DTYPES[key]


@dataclass
class SDComponents:
    """The frozen Stable Diffusion parts DaLPSR builds on.

    - ``vae``: diffusers ``AutoencoderKL`` (image [-1,1] [B,3,H,W] <-> latent [B,4,H/8,W/8])
    - ``unet``: diffusers ``UNet2DConditionModel`` (eps or v prediction, see ``scheduler_config``)
    - ``text_encoder``: transformers ``CLIPTextModel`` (ids [B,77] -> hidden [B,77,D])
    - ``tokenizer``: transformers ``CLIPTokenizer`` (``model_max_length`` 77)
    - ``noise_scheduler``: diffusers ``DDPMScheduler`` built from the model's scheduler config
      (training: ``add_noise``, ``get_velocity``; ``config.prediction_type``)
    - ``scheduler_config``: that config as a plain dict (samplers build DDIM/DPM-Solver/UniPC from it)
    - ``source``: where the parts came from (recorded in exports)
    """
    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    scheduler_config: Dict[str, Any]
    source: Dict[str, Any] = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get('prediction_type', 'epsilon')

    def to(self, device=None, dtype=None) -> 'SDComponents':
        for m in (self.vae, self.unet, self.text_encoder):
            m.to(device=device, dtype=dtype)
        return self

    def freeze(self) -> 'SDComponents':
        """``requires_grad_(False)`` and ``eval()`` on VAE, UNet and text encoder."""
        for m in (self.vae, self.unet, self.text_encoder):
            m.requires_grad_(False)
            m.eval()
        return self


def _is_local(path: str) -> bool:
    return os.path.isdir(os.path.expanduser(str(path)))


def _download_hint(repo: str) -> str:
    name = repo.rstrip('/').split('/')[-1]
    return (f"download it once with `huggingface-cli download {repo} --local-dir pretrained_models/{name}` "
            f"and set sd.pretrained: pretrained_models/{name} (or put it in the HF cache)")


def _check_local_part(root: Path, part: str, variant: Optional[str]) -> None:
    """Raise SDLoadError naming the first missing file of ``part`` under ``root``."""
    required, weights = _PART_FILES[part]
    for name in required:
        if not (root / name).is_file():
            raise SDLoadError(f"missing {root / name} (the {part} of a diffusers-format Stable Diffusion dir; "
                              f"expected layout: <dir>/{{unet,vae,text_encoder,tokenizer,scheduler}}/...)")
    if weights:
        names = list(weights)
        if variant:
            names = [n.replace('.safetensors', f'.{variant}.safetensors').replace('.bin', f'.{variant}.bin')
                     for n in weights] + names
        if not any((root / n).is_file() for n in names):
            what = 'files' if part == 'tokenizer' else 'weights'
            raise SDLoadError(f"missing {root / names[0]} ({what} of the {part}; also accepted: "
                              f"{', '.join(names[1:])})")


def _resolve(cfg: Dict[str, Any], part: str):
    """-> (path_or_id, subfolder or None, is_local) for ``part``."""
    override = cfg.get(part)
    if override:
        return str(override), None, _is_local(override)
    base = cfg.get('pretrained') or DEFAULT_SD
    return str(base), part, _is_local(base)


def _load_part(loader, cfg: Dict[str, Any], part: str, **kwargs):
    path, sub, local = _resolve(cfg, part)
    variant = cfg.get('variant')
    if local:
        root = Path(os.path.expanduser(path)) / (sub or '')
        _check_local_part(root, part, variant if part in ('unet', 'vae', 'text_encoder') else None)
        path = os.path.expanduser(path)
    extra = {}
    if sub:
        extra['subfolder'] = sub
    if not local and cfg.get('revision'):
        extra['revision'] = cfg['revision']
    if variant and part in ('unet', 'vae', 'text_encoder'):
        extra['variant'] = variant
    try:
        return loader(path, **extra, **kwargs)
    except SDLoadError:
        raise
    except (OSError, EnvironmentError, ValueError) as err:
        where = f"{path}/{sub}" if sub else path
        if local:
            raise SDLoadError(f"could not load the {part} from {where}: {str(err).splitlines()[0]}") from None
        raise SDLoadError(f"could not load the {part} of '{path}' (not in the local HF cache"
                          f"{' and HF_HUB_OFFLINE=1' if os.environ.get('HF_HUB_OFFLINE') == '1' else ''}); "
                          f"{_download_hint(path)}") from None


def load_sd_components(cfg: Optional[Dict[str, Any]] = None, device=None) -> SDComponents:
    """Load VAE, UNet, text encoder, tokenizer and the DDPM noise scheduler.

    ``cfg``: the ``sd`` options block (keys :data:`SD_KEYS`; ``pretrained`` defaults to
    :data:`DEFAULT_SD`). Parts are loaded in ``cfg['dtype']`` (default fp32) and moved to
    ``device`` if given. Returns unfrozen modules in eval mode; call ``.freeze()`` to freeze.
    Raises :class:`SDLoadError` (one line naming the missing file and where to put it).
    """
    from dalpsr.utils.options import check_keys
    cfg = dict(cfg or {})
    check_keys(cfg, SD_KEYS, 'sd block')
    dtype = parse_dtype(cfg.get('dtype') or 'fp32')

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    def _sched_loader(path, **kw):
        kw.pop('variant', None)
        return DDPMScheduler.from_pretrained(path, **kw)

    noise_scheduler = _load_part(_sched_loader, cfg, 'scheduler')
    tokenizer = _load_part(CLIPTokenizer.from_pretrained, cfg, 'tokenizer')
    if len(tokenizer) < 1000:  # transformers 5 silently builds an empty tokenizer from missing files
        path, sub, _ = _resolve(cfg, 'tokenizer')
        raise SDLoadError(f"the tokenizer at {path}{'/' + sub if sub else ''} has only {len(tokenizer)} tokens "
                          f"(its vocab.json/merges.txt or tokenizer.json is missing); " + _download_hint(path))
    text_encoder = _load_part(CLIPTextModel.from_pretrained, cfg, 'text_encoder', dtype=dtype)
    vae = _load_part(AutoencoderKL.from_pretrained, cfg, 'vae', torch_dtype=dtype)
    unet = _load_part(UNet2DConditionModel.from_pretrained, cfg, 'unet', torch_dtype=dtype)
    if getattr(tokenizer, 'model_max_length', 0) > 1000:  # some dirs lack it; diffusers needs 77
        tokenizer.model_max_length = text_encoder.config.max_position_embeddings
    for m in (vae, unet, text_encoder):
        m.eval()
        if device is not None:
            m.to(device)
    source = {k: cfg.get(k) for k in SD_KEYS if cfg.get(k) is not None}
    source.setdefault('pretrained', DEFAULT_SD)
    return SDComponents(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                        noise_scheduler=noise_scheduler, scheduler_config=dict(noise_scheduler.config),
                        source=source)


# ---------------------------------------------------------------------------------------------
# Tiny stand-in with the real layout

#: Configs of the tiny stand-in (CPU-trainable; same block types and latent factor 8 as SD).
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                 block_out_channels=(32, 64), down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                 up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), cross_attention_dim=32,
                 attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                block_out_channels=(8, 16, 16, 16), norm_num_groups=8,
                down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4,
                sample_size=64, scaling_factor=0.18215)
TINY_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=77, projection_dim=32, hidden_act='gelu',
                 bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
#: SD 2.x noise schedule (scaled-linear betas 0.00085..0.012, 1000 steps, eps prediction).
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                   clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type='epsilon')


def build_tiny_sd(out_dir, seed: int = 0, prediction_type: str = 'epsilon', overwrite: bool = False) -> str:
    """Write a tiny randomly initialised SD model in diffusers format to ``out_dir``.

    Layout: ``model_index.json``, ``unet/``, ``vae/`` (latent factor 8, 4 channels),
    ``text_encoder/`` (2-layer 32-dim CLIP text model, full 49,408 vocab), ``tokenizer/``
    (offline CLIP BPE, ``model_max_length`` 77), ``scheduler/`` (DDPM, SD 2.x betas).
    Deterministic given ``seed``. Refuses a non-empty ``out_dir`` unless ``overwrite``.
    Loadable by :func:`load_sd_components` and by diffusers' ``StableDiffusionPipeline``.
    Returns ``out_dir`` as a string.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dalpsr.utils.clip_tokenizer import offline_clip_tokenizer

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; refusing to overwrite it (pass --overwrite / overwrite=True)")
    tmp = out.with_name(f'.{out.name}.tmp{os.getpid()}')
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**TINY_VAE)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    finally:
        torch.random.set_rng_state(gen_state)
    scheduler = DDPMScheduler.from_config(dict(SD_SCHEDULE, prediction_type=prediction_type))
    tokenizer = offline_clip_tokenizer(77)
    unet.save_pretrained(tmp / 'unet')
    vae.save_pretrained(tmp / 'vae')
    text_encoder.save_pretrained(tmp / 'text_encoder')
    tokenizer.save_pretrained(tmp / 'tokenizer')
    scheduler.save_pretrained(tmp / 'scheduler')
    import diffusers
    index = {'_class_name': 'StableDiffusionPipeline', '_diffusers_version': diffusers.__version__,
             'feature_extractor': [None, None], 'requires_safety_checker': False, 'safety_checker': [None, None],
             'scheduler': ['diffusers', 'DDPMScheduler'], 'text_encoder': ['transformers', 'CLIPTextModel'],
             'tokenizer': ['transformers', 'CLIPTokenizer'], 'unet': ['diffusers', 'UNet2DConditionModel'],
             'vae': ['diffusers', 'AutoencoderKL']}
    (tmp / 'model_index.json').write_text(json.dumps(index, indent=2) + '\n')
    (tmp / 'README.md').write_text('Tiny randomly initialised Stable Diffusion stand-in written by '
                                   f'dalpsr.archs.sd_components.build_tiny_sd(seed={seed}). NOT a real model.\n')
    if out.exists():
        import shutil
        shutil.rmtree(out)  # empty (checked above) or overwrite requested
    os.replace(tmp, out)
    return str(out)


def set_attention(modules, mode: str = 'sdpa') -> None:
    """Attention processors of diffusers ``modules`` (UNet, ControlNet): ``sdpa`` =
    ``AttnProcessor2_0`` (PyTorch's fused scaled-dot-product attention), ``default`` = diffusers'
    default choice. Processors installed by wrappers elsewhere are replaced too, so call this
    before installing method-specific processors."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    if mode not in ('sdpa', 'default'):
        raise ValueError(f"attention must be 'sdpa' or 'default', got {mode!r}")
    for m in modules:
        if mode == 'sdpa':
            m.set_attn_processor(AttnProcessor2_0())
        else:
            m.set_default_attn_processor()


def encode_images(vae, images: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
    """Images [B,3,H,W] in [0,1] -> scaled latents [B,C,H/f,W/f] (``mean`` or a sample, times
    ``vae.config.scaling_factor``), computed in the VAE's dtype."""
    x = images.to(device=vae.device, dtype=vae.dtype) * 2 - 1
    dist = vae.encode(x).latent_dist
    z = dist.sample(generator) if sample else dist.mean
    return z * vae.config.scaling_factor


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images [B,3,H,W] in [0,1] (float32)."""
    z = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
    return (vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# The real SD 2.1-base architecture with random weights (benchmarks; no download)

#: Folder of the published SD 2.1-base part configs (``sd21_base_{unet,vae,text_encoder,scheduler}.json``).
SD21_BASE_CONFIG_DIR = Path(__file__).resolve().parent / 'configs'


def _scaled(c: int, s: float, multiple: int, what: str) -> int:
    v = c * s
    if abs(v - round(v)) > 1e-6 or round(v) % multiple:
        raise ValueError(f"channel_scale {s} gives {v:g} channels for the {what} ({c} at scale 1); it must be a "
                         f"whole multiple of {multiple} (use e.g. 1, 0.5 or 0.25)")
    return int(round(v))


def _narrow(cfg: Dict[str, Any], s: float, heads, what: str) -> None:
    """Scale ``block_out_channels`` by ``s``; keep 32 GroupNorm groups when the widths allow it."""
    import math
    chans = [_scaled(c, s, 1, what) for c in cfg['block_out_channels']]
    for c, h in zip(chans, heads or [1] * len(chans)):
        if c % h:
            raise ValueError(f'channel_scale {s}: {c} {what} channels do not split into {h} heads')
    cfg['block_out_channels'] = chans
    cfg['norm_num_groups'] = math.gcd(cfg['norm_num_groups'], *chans)


def sd21_base_configs(channel_scale: float = 1.0) -> Dict[str, Dict[str, Any]]:
    """Configs of the SD 2.1-base parts, read from :data:`SD21_BASE_CONFIG_DIR`.

    ``{'unet': ..., 'vae': ..., 'text_encoder': ..., 'scheduler': ...}`` (plain dicts, ``_``-keys
    dropped). ``channel_scale`` < 1 narrows every width (UNet/VAE channels, text hidden size;
    depth, head counts, block types and the latent factor 8 unchanged; GroupNorm groups drop
    below 32 only where the narrowed widths need it) for machines that cannot hold the full
    model: 1 is the published architecture (UNet 866 M parameters).
    """
    out = {}
    for part in ('unet', 'vae', 'text_encoder', 'scheduler'):
        cfg = json.loads((SD21_BASE_CONFIG_DIR / f'sd21_base_{part}.json').read_text())
        out[part] = {k: v for k, v in cfg.items() if not k.startswith('_')}
    s = float(channel_scale)
    if s <= 0 or s > 1:
        raise ValueError(f'channel_scale must be in (0, 1], got {channel_scale!r}')
    if s != 1:
        u, v, t = out['unet'], out['vae'], out['text_encoder']
        heads = u['attention_head_dim']
        _narrow(u, s, heads, 'UNet')
        _narrow(v, s, None, 'VAE')
        t['hidden_size'] = _scaled(t['hidden_size'], s, t['num_attention_heads'], 'text encoder')
        t['intermediate_size'] = _scaled(t['intermediate_size'], s, 1, 'text encoder MLP')
        t['projection_dim'] = _scaled(t['projection_dim'], s, 1, 'text projection')
        u['cross_attention_dim'] = t['hidden_size']
    return out


def build_sd21_base_random(seed: int = 0, channel_scale: float = 1.0, dtype: Any = 'fp32', device=None,
                           parts: tuple = ('unet', 'vae', 'text_encoder')) -> SDComponents:
    """SD 2.1-base (UNet, VAE, OpenCLIP-H text encoder, scheduler) with random weights.

    The architecture comes from the published configs in :data:`SD21_BASE_CONFIG_DIR`
    (optionally narrowed by ``channel_scale``, see :func:`sd21_base_configs`) in ``dtype``
    ('fp32' | 'fp16' | 'bf16') on ``device``; weights are
    drawn from ``seed`` on ``device`` (the global CPU torch RNG state is restored afterwards;
    weights drawn on a GPU differ from CPU ones). Parts not named in
    ``parts`` are ``None`` (the text encoder is 340 M parameters; leave it out when a benchmark
    feeds random embeddings). The tokenizer is the offline CLIP BPE tokenizer (77 tokens), the
    noise scheduler a ``DDPMScheduler`` from the published scheduler config (eps prediction).
    For timing and memory only: the outputs are meaningless.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dalpsr.utils.clip_tokenizer import offline_clip_tokenizer

    cfgs = sd21_base_configs(channel_scale)
    dt = parse_dtype(dtype)
    mods: Dict[str, Any] = {'unet': None, 'vae': None, 'text_encoder': None}
    state = torch.random.get_rng_state()
    try:
        for k, part in enumerate(('unet', 'vae', 'text_encoder')):
            if part not in parts:
                continue
            torch.manual_seed(seed + k)
            with torch.device(device if device is not None else 'cpu'):  # initialise in place (fast on GPU)
                if part == 'unet':
                    m = UNet2DConditionModel.from_config(cfgs['unet'])
                elif part == 'vae':
                    m = AutoencoderKL.from_config(cfgs['vae'])
                else:
                    m = CLIPTextModel(CLIPTextConfig(**cfgs['text_encoder']))
            if dt != torch.float32:
                m.to(dtype=dt)
            m.eval()
            mods[part] = m
    finally:
        torch.random.set_rng_state(state)
    sched = DDPMScheduler.from_config(cfgs['scheduler'])
    return SDComponents(vae=mods['vae'], unet=mods['unet'], text_encoder=mods['text_encoder'],
                        tokenizer=offline_clip_tokenizer(77), noise_scheduler=sched,
                        scheduler_config=dict(sched.config),
                        source={'pretrained': f'random SD 2.1-base architecture (seed {seed}, '
                                              f'channel_scale {channel_scale})'})
