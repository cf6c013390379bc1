"""The DaLPSR sampler (paper IV-B; interface C9): LR -> SR with a ControlNet on frozen SD.

Per image (``lq`` [B,3,h,w] in [0,1], output [B,3,h*scale,w*scale] in [0,1]):

1. ``x_up`` = bicubic x``scale`` upsampling of the LR, replicate-padded to a multiple of
   ``pad_multiple`` px (64: three UNet downsamplings of the latent); cropped again at the end.
2. ``z_lr`` = VAE posterior mean of ``2*x_up-1`` times ``scaling_factor`` (tiled VAE encoder).
   It is the ControlNet condition in ``latent`` mode; in ``image`` mode the condition is ``x_up``.
3. Start (``start``):
   ``lr``             LR-embedded start (SeeSR; DaLPSR "LR images with initial noise"):
                      ``x = sqrt(a_s) z_lr + sqrt(1-a_s) eps`` at ``start_step`` (999), and only
                      scheduler timesteps ``<= start_step`` are run;
   ``noise``          pure Gaussian noise;
   ``noise_guidance`` DeeDSR: pure noise, and for the first ``noise_guidance_steps`` steps the
                      model prediction is replaced by ``eps = (x_t - sqrt(a_t) z_lr)/sqrt(1-a_t)``
                      (converted to the scheduler's prediction type).
4. Each step: classifier-free guidance with the negative prompt, batched (one UNet/ControlNet
   call on ``[uncond; cond]``); ``eps = eps_u + g (eps_c - eps_u)``. With a latent larger than
   ``tile.latent_size`` the prediction is computed per latent tile and Gaussian-blended.
5. Tiled VAE decode, [-1,1] -> [0,1], crop, color fix against ``x_up`` (adain|wavelet|none).

Randomness: one CPU ``torch.Generator`` per image seeded with its seed (initial noise and the
ancestral noise of stochastic schedulers), so an image's output depends only on its seed, its
inputs and the settings, not on batch composition or device. Latents and scheduler arithmetic
stay float32; networks run in ``dtype`` (fp16/bf16 on GPU).
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from dalpsr.pipelines.schedulers import alphas_cumprod, build_scheduler
from dalpsr.pipelines.tiling import blend_tiles, tiled_vae_decode, tiled_vae_encode
from dalpsr.utils.color_fix import COLOR_FIX_MODES, color_fix as apply_color_fix

#: SeeSR defaults (REFERENCE.md section 4).
DEFAULT_NEGATIVE_PROMPT = 'dotted, noise, blur, lowres, smooth'
DEFAULT_ADDED_PROMPT = 'clean, high-resolution, 8k'
START_MODES = ('lr', 'noise', 'noise_guidance')

_DTYPES = {'fp32': torch.float32, 'float32': torch.float32, 'fp16': torch.float16, 'float16': torch.float16,
           'bf16': torch.bfloat16, 'bfloat16': torch.bfloat16}


def parse_dtype(d: Union[str, torch.dtype, None], default: torch.dtype = torch.float32) -> torch.dtype:
    if d is None:
        return default
    if isinstance(d, torch.dtype):
        return d
    key = str(d).lower().replace('torch.', '')
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype '{d}': use fp32, fp16 or bf16")
    return _DTYPES[key]


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


def _encode_prompts_fallback(tokenizer, text_encoder, prompts: List[str], max_chunks: int = 3,
                             device=None) -> torch.Tensor:
    """Chunked CLIP encoding (interface C5), used when dalpsr.archs.text_encoding is absent."""
    device = device or next(text_encoder.parameters()).device
    L = int(getattr(tokenizer, 'model_max_length', 77) or 77)
    body = L - 2
    ids_list = [tokenizer(p, add_special_tokens=False, truncation=False)['input_ids'] for p in prompts]
    n = max(1, min(max_chunks, max(math.ceil(len(ids) / body) for ids in ids_list) if ids_list else 1))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    chunks = []
    for c in range(n):
        rows = []
        for ids in ids_list:
            part = ids[c * body:(c + 1) * body]
            row = [bos] + part + [eos]
            row += [pad] * (L - len(row))
            rows.append(row)
        t = torch.tensor(rows, dtype=torch.long, device=device)
        chunks.append(text_encoder(t)[0])
    return torch.cat(chunks, dim=1)


def encode_text(tokenizer, text_encoder, prompts: List[str], max_chunks: int = 3, device=None) -> torch.Tensor:
    """[B, 77*n, D] text embeddings (C5: dalpsr.archs.text_encoding.encode_prompts when present)."""
    try:
        from dalpsr.archs.text_encoding import encode_prompts
    except ImportError:
        encode_prompts = _encode_prompts_fallback
    return encode_prompts(tokenizer, text_encoder, list(prompts), max_chunks=max_chunks, device=device)


def _move(module, device, dtype) -> None:
    """Move a module; cast only when its dtype differs (diffusers warns on every ``.to(dtype)``)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)


def _as_list(x, b: int, what: str) -> list:
    if isinstance(x, (list, tuple)):
        if len(x) != b:
            raise ValueError(f'{what}: expected {b} values (one per image), got {len(x)}')
        return list(x)
    return [x] * b


class DaLPSRSampler:
    """LR -> SR sampling with a (DaLPSR) ControlNet on frozen SD parts.

    Args:
        components: object with ``vae``, ``unet``, ``text_encoder``, ``tokenizer`` and
            ``scheduler_config`` (dict) or ``noise_scheduler`` (``SDComponents`` of C8).
        controlnet: the trained ControlNet (diffusers ``ControlNetModel`` or subclass).
        condition_mode: ``latent`` | ``image``; default: ``controlnet.condition_mode`` if set,
            else ``latent`` when ``controlnet.config.conditioning_channels == 4``, else ``image``.
        scale: SR factor (4).
        device, dtype: where/in which precision UNet, ControlNet and text encoder run.
        vae_dtype: VAE precision (default ``dtype``); a non-finite fp16/bf16 VAE result is
            recomputed in fp32 (``vae_fp32_fallback``).
        channels_last: UNet/ControlNet/VAE in channels_last memory format (faster convs on GPU).
        compile: ``torch.compile`` the UNet and ControlNet (first call slow): ``True`` (default
            mode) or a mode name (``'reduce-overhead'``: CUDA graphs, ``'max-autotune'``).
        max_chunks: 77-token chunks per prompt (long captions; C5).
        pad_multiple: the upsampled image is padded to a multiple of this many px.
    """

    def __init__(self, components, controlnet, *, condition_mode: Optional[str] = None, scale: int = 4,
                 device: Union[str, torch.device, None] = None, dtype: Union[str, torch.dtype] = 'fp32',
                 vae_dtype: Union[str, torch.dtype, None] = None, vae_fp32_fallback: bool = True,
                 channels_last: bool = False, compile: Union[bool, str] = False, max_chunks: int = 3,
                 pad_multiple: int = 64, logger: Optional[logging.Logger] = None):
        self.logger = logger or logging.getLogger('dalpsr')
        self.device = torch.device(device) if device is not None else (
            torch.device('cuda') if torch.cuda.is_available() else torch.device('cpu'))
        self.dtype = parse_dtype(dtype)
        self.vae_dtype = parse_dtype(vae_dtype, self.dtype)
        self.vae_fp32_fallback = bool(vae_fp32_fallback)
        self.vae, self.unet = components.vae, components.unet
        self.text_encoder, self.tokenizer = components.text_encoder, components.tokenizer
        cfg = getattr(components, 'scheduler_config', None)
        if cfg is None and getattr(components, 'noise_scheduler', None) is not None:
            cfg = components.noise_scheduler.config
        if cfg is None:
            raise ValueError('components carry no scheduler_config / noise_scheduler')
        self.scheduler_config = dict(cfg)
        self.controlnet = controlnet
        self.scale = int(scale)
        self.max_chunks = int(max_chunks)
        self.pad_multiple = int(pad_multiple)
        if condition_mode is None:
            condition_mode = getattr(controlnet, 'condition_mode', None)
            if condition_mode is None:
                cc = getattr(getattr(controlnet, 'config', None), 'conditioning_channels', 3)
                condition_mode = 'latent' if cc == 4 else 'image'
        if condition_mode not in ('latent', 'image'):
            raise ValueError(f"condition_mode must be 'latent' or 'image', got '{condition_mode}'")
        self.condition_mode = condition_mode
        for m in (self.vae, self.unet, self.text_encoder, self.controlnet):
            m.requires_grad_(False)
            m.eval()
        for m, dt in ((self.unet, self.dtype), (self.controlnet, self.dtype), (self.text_encoder, self.dtype),
                      (self.vae, self.vae_dtype)):
            _move(m, self.device, dt)
        if channels_last:
            for m in (self.unet, self.controlnet, self.vae):
                m.to(memory_format=torch.channels_last)
        self._unet_fn, self._cn_fn = self.unet, self.controlnet
        if compile:
            modes = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')
            mode = compile if isinstance(compile, str) else None
            if mode is not None and mode not in modes:
                raise ValueError(f"compile must be true/false or one of {', '.join(modes)}, got {compile!r}")
            self._unet_fn = torch.compile(self.unet, mode=mode)
            self._cn_fn = torch.compile(self.controlnet, mode=mode)
        # CUDA graphs reuse their output buffers: mark each network evaluation as a new step
        self._mark_step = compile in ('reduce-overhead', 'max-autotune')
        self.vae_scale = float(getattr(self.vae.config, 'scaling_factor', 0.18215))
        self.last_stats: Dict[str, Any] = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model_dir: str, sd: Optional[Dict[str, Any]] = None, **kwargs) -> 'DaLPSRSampler':
        """Load an exported model dir (``controlnet/`` + ``dalpsr.json``, C8) with its SD parts.

        ``sd`` (``{pretrained: ..., revision: ..., dtype: ...}``) overrides the SD source recorded
        in ``dalpsr.json``. The returned sampler has ``.meta`` (the parsed dalpsr.json).
        """
        meta = load_model_meta(model_dir)
        from dalpsr.archs.controlnet_arch import DaLPSRControlNet
        from dalpsr.archs.sd_components import load_sd_components
        sd_cfg = dict(meta.get('sd') or {})
        sd_cfg.update(sd or {})
        if not sd_cfg.get('pretrained'):
            raise ValueError(f"{model_dir}/dalpsr.json names no SD source; set sd.pretrained in the options")
        comps = load_sd_components(sd_cfg)
        controlnet = DaLPSRControlNet.from_pretrained(os.path.join(model_dir, 'controlnet'))
        kwargs.setdefault('condition_mode', meta.get('condition_mode'))
        kwargs.setdefault('scale', int(meta.get('scale', 4)))
        sampler = cls(comps, controlnet, **kwargs)
        sampler.meta = meta
        return sampler

    # ------------------------------------------------------------------ pieces
    def upsample(self, lq: torch.Tensor) -> torch.Tensor:
        """Bicubic x``scale`` of ``lq`` [B,3,h,w] in [0,1] -> [B,3,h*s,w*s] clamped to [0,1]."""
        x = F.interpolate(lq.float(), scale_factor=self.scale, mode='bicubic', align_corners=False)
        return x.clamp(0, 1)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        m = self.pad_multiple
        H, W = x.shape[-2:]
        ph, pw = (-H) % m, (-W) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode='replicate')
        return x

    def _vae_run(self, fn: Callable[[], torch.Tensor], what: str) -> torch.Tensor:
        out = fn()
        if self.vae_dtype != torch.float32 and self.vae_fp32_fallback and not torch.isfinite(out).all():
            self.logger.warning(f'VAE {what} in {self.vae_dtype} gave non-finite values; recomputing in fp32')
            _move(self.vae, self.device, torch.float32)
            try:
                out = fn()
            finally:
                _move(self.vae, self.device, self.vae_dtype)
            self.last_stats['vae_fp32_fallback'] = True
        return out

    @torch.no_grad()
    def encode_lr(self, x_up: torch.Tensor, tile: TileOptions) -> torch.Tensor:
        """``x_up`` [B,3,H,W] in [0,1] (H,W multiples of 8) -> scaled latent [B,4,H/8,W/8] (fp32)."""
        img = (x_up * 2 - 1).to(self.device)
        z = self._vae_run(lambda: tiled_vae_encode(self.vae, img.to(self.vae.dtype), tile.vae_encoder_tile,
                                                   tile.vae_encoder_overlap, shared_norm=tile.vae_encoder_norm),
                          'encode')
        return z.float() * self.vae_scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor, tile: TileOptions) -> torch.Tensor:
        """Scaled latent [B,4,h,w] -> image [B,3,8h,8w] in [0,1] (fp32)."""
        zz = (z / self.vae_scale).to(self.device)
        x = self._vae_run(lambda: tiled_vae_decode(self.vae, zz.to(self.vae.dtype), tile.vae_decoder_tile,
                                                   tile.vae_decoder_overlap, shared_norm=tile.vae_decoder_norm),
                          'decode')
        return ((x.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def text_embeddings(self, prompts: List[str], negative: List[str], cfg: bool) -> torch.Tensor:
        """[2B or B, 77*n, D]: negatives first when ``cfg`` (one encoder call, equal length)."""
        texts = (list(negative) + list(prompts)) if cfg else list(prompts)
        emb = encode_text(self.tokenizer, self.text_encoder, texts, self.max_chunks, self.device)
        return emb.to(self.dtype)

    def _predict(self, x: torch.Tensor, t, emb: torch.Tensor, cond: torch.Tensor, cfg: bool,
                 guidance_scale: float, conditioning_scale: float) -> torch.Tensor:
        """Guided model output for latents ``x`` [B,4,h,w] (fp32 in, fp32 out)."""
        xin = torch.cat([x, x]) if cfg else x
        cin = torch.cat([cond, cond]) if cfg else cond
        xin = xin.to(self.dtype)
        cin = cin.to(self.dtype)
        tt = torch.as_tensor(t, device=self.device).expand(xin.shape[0])
        if self._mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        down, mid = self._cn_fn(xin, tt, encoder_hidden_states=emb, controlnet_cond=cin,
                                conditioning_scale=float(conditioning_scale), return_dict=False)
        out = self._unet_fn(xin, tt, encoder_hidden_states=emb, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid, return_dict=False)[0].float()
        self.last_stats['unet_calls'] = self.last_stats.get('unet_calls', 0) + 1
        shape = tuple(xin.shape[-2:])
        if self.last_stats.get('max_latent_tile') is None or shape[0] * shape[1] > math.prod(self.last_stats['max_latent_tile']):
            self.last_stats['max_latent_tile'] = shape
        if cfg:
            u, c = out.chunk(2)
            out = u + guidance_scale * (c - u)
        return out

    def _predict_tiled(self, x, t, emb, cond, cfg, guidance_scale, conditioning_scale, tile: TileOptions):
        h, w = x.shape[-2:]
        if max(h, w) <= tile.latent_size:
            return self._predict(x, t, emb, cond, cfg, guidance_scale, conditioning_scale)
        cs = cond.shape[-1] // w  # 1 (latent condition) or 8 (image condition)

        def fn(xt, box):
            top, left, th, tw = box
            ct = cond[:, :, top * cs:(top + th) * cs, left * cs:(left + tw) * cs]
            return self._predict(xt, t, emb, ct, cfg, guidance_scale, conditioning_scale)

        return blend_tiles(fn, x, tile.latent_size, tile.latent_overlap, out_dtype=torch.float32)

    # ------------------------------------------------------------------ main call
    @torch.no_grad()
    def __call__(self, lq: torch.Tensor, prompts: Union[str, Sequence[str]] = '',
                 negative_prompt: Union[str, Sequence[str]] = DEFAULT_NEGATIVE_PROMPT,
                 num_steps: int = 50, guidance_scale: float = 5.5, scheduler: str = 'ddpm',
                 start: str = 'lr', start_step: int = 999, conditioning_scale: float = 1.0,
                 seed: Union[int, Sequence[int]] = 0, tile: Union[None, Dict[str, Any], TileOptions] = None,
                 color_fix: str = 'adain', noise_guidance_steps: int = 1,
                 scheduler_overrides: Optional[Dict[str, Any]] = None, output: str = 'image',
                 callback: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
        """Super-resolve ``lq`` [B,3,h,w] in [0,1] -> [B,3,h*scale,w*scale] in [0,1] (float32, CPU).

        ``prompts``/``negative_prompt``/``seed``: one value for all images or one per image.
        ``prompts`` are complete positive prompts (compose caption, restoration prompt and the
        added prompt before, e.g. with ``dalpsr.data.prompt_compose.compose_prompt``).
        ``guidance_scale <= 1`` disables classifier-free guidance (one branch only).
        ``output='latent'`` returns the final scaled latent [B,4,H'/8,W'/8] (padded size, fp32)
        instead of decoding it.
        """
        if not isinstance(lq, torch.Tensor) or lq.dim() != 4 or lq.shape[1] != 3:
            raise ValueError(f'lq must be a [B, 3, h, w] tensor, got '
                             f'{tuple(lq.shape) if isinstance(lq, torch.Tensor) else type(lq).__name__}')
        if start not in START_MODES:
            raise ValueError(f"start must be one of {', '.join(START_MODES)}, got '{start}'")
        if color_fix not in COLOR_FIX_MODES:
            raise ValueError(f"color_fix must be one of {', '.join(COLOR_FIX_MODES)}, got '{color_fix}'")
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f'num_steps must be an integer >= 1, got {num_steps!r}')
        tile = TileOptions.from_opt(tile)
        b = lq.shape[0]
        prompts = [str(p) for p in _as_list(prompts, b, 'prompts')]
        negative = [str(p) for p in _as_list(negative_prompt if negative_prompt is not None else '', b,
                                             'negative_prompt')]
        seeds = [int(s) for s in _as_list(seed, b, 'seed')]
        cfg = guidance_scale > 1.0
        self.last_stats = {'unet_calls': 0, 'max_latent_tile': None}

        x_up = self.upsample(lq.cpu())
        H, W = x_up.shape[-2:]
        x_pad = self._pad(x_up)
        z_lr = self.encode_lr(x_pad, tile)  # [B,4,Hp/8,Wp/8] fp32 on device
        cond = z_lr if self.condition_mode == 'latent' else x_pad.to(self.device)
        emb = self.text_embeddings(prompts, negative, cfg)

        sched = build_scheduler(scheduler, self.scheduler_config, scheduler_overrides)
        sched.set_timesteps(num_steps, device=self.device)
        timesteps = sched.timesteps
        acp = alphas_cumprod(sched)
        if start == 'lr':
            if not 0 <= int(start_step) < len(acp):
                raise ValueError(f'start_step must be in [0, {len(acp) - 1}], got {start_step}')
            keep = [i for i, t in enumerate(timesteps.tolist()) if t <= start_step]
            if not keep:
                raise ValueError(f'start_step {start_step} is below every timestep of the schedule')
            if keep[0] > 0:
                timesteps = timesteps[keep[0]:]
                if hasattr(sched, 'set_begin_index'):
                    sched.set_begin_index(keep[0])
        gens = [torch.Generator('cpu').manual_seed(s) for s in seeds]
        noise = torch.cat([torch.randn((1,) + tuple(z_lr.shape[1:]), generator=g) for g in gens]).to(self.device)
        if start == 'lr':
            a = acp[int(start_step)]
            lat = (math.sqrt(a) * z_lr + math.sqrt(1 - a) * noise).float()
        else:
            lat = noise.float() * float(getattr(sched, 'init_noise_sigma', 1.0))
        pred_type = sched.config.get('prediction_type', 'epsilon')
        step_takes_gen = 'generator' in inspect.signature(sched.step).parameters
        n = len(timesteps)
        for i, t in enumerate(timesteps):
            t_int = int(t)
            inp = sched.scale_model_input(lat, t)
            if start == 'noise_guidance' and i < int(noise_guidance_steps):
                a = float(acp[t_int])
                eps = (inp - math.sqrt(a) * z_lr) / math.sqrt(1 - a)
                if pred_type == 'v_prediction':
                    out = math.sqrt(a) * eps - math.sqrt(1 - a) * z_lr
                elif pred_type == 'sample':
                    out = z_lr.clone()
                else:
                    out = eps
            else:
                out = self._predict_tiled(inp, t, emb, cond, cfg, guidance_scale, conditioning_scale, tile)
            kw = {'generator': gens if len(gens) > 1 else gens[0]} if step_takes_gen else {}
            lat = sched.step(out, t, lat, return_dict=False, **kw)[0].float()
            if callback is not None:
                callback(i, n)
        self.last_stats['timesteps'] = [int(t) for t in timesteps]
        if output == 'latent':
            return lat
        if output != 'image':
            raise ValueError(f"output must be 'image' or 'latent', got '{output}'")
        img = self.decode(lat, tile)[:, :, :H, :W].cpu()
        img = apply_color_fix(img, x_up, color_fix)
        return img.float().clamp(0, 1)


def load_model_meta(model_dir: str) -> Dict[str, Any]:
    """Read ``<model_dir>/dalpsr.json`` (C8); one-line errors for a missing dir/file."""
    p = Path(model_dir)
    if not p.is_dir():
        raise FileNotFoundError(f'model folder not found: {model_dir} (expected controlnet/ and dalpsr.json '
                                'written by the DaLPSR model export)')
    meta_file = p / 'dalpsr.json'
    if not meta_file.is_file():
        raise FileNotFoundError(f'{meta_file} not found: export the trained model (dalpsr model export) '
                                'or point model_dir at a folder with controlnet/ and dalpsr.json')
    with open(meta_file, 'r', encoding='utf-8') as f:
        return json.load(f)
