"""The denoising loop shared by every latent-diffusion SR method (DaLPSR, SSP-IR, DeeDSR, ...).

Per batch of LR images (``lq`` [B,3,h,w] in [0,1] -> SR [B,3,h*scale,w*scale] in [0,1]):

1. :meth:`DenoisingLoop.prepare`: ``x_up`` = bicubic x``scale`` of the LR (clamped), replicate-
   padded to a multiple of ``pad_multiple`` px (``x_pad``); ``z_lr`` = VAE posterior mean of
   ``2*x_pad-1`` times ``scaling_factor`` (tiled VAE encoder). -> :class:`LRLatents`.
2. The method builds its :class:`~dalpsr.pipelines.denoiser.Conditions` from the LRLatents
   (text embeddings, ControlNet condition ``z_lr`` or ``x_pad``, image tokens, ...).
3. :meth:`DenoisingLoop.denoise`: the start latent (``start``):

   ``lr``             LR-embedded start (SeeSR; DaLPSR "LR images with initial noise"): only
                      scheduler timesteps ``<= start_step`` are run and
                      ``x = sqrt(a_s) z_lr + sqrt(1-a_s) eps`` is noised to the level ``s`` of the
                      first timestep run (``start_noise: first_step``; e.g. 981 for 50 DDPM steps
                      with SD's leading spacing), or to ``start_step`` itself
                      (``start_noise: start_step``: SeeSR's code, t=999, one level above the
                      first step; the behaviour before issue 13.5);
   ``noise``          pure Gaussian noise (times the scheduler's ``init_noise_sigma``);
   ``noise_guidance`` DeeDSR: pure noise, and for the first ``noise_guidance_steps`` steps the
                      model output is replaced by ``eps = (x_t - sqrt(a_t) z_lr)/sqrt(1-a_t)``
                      (converted to the scheduler's prediction type);

   then every scheduler step calls the method's ``Denoiser.predict`` with classifier-free
   guidance batched (``[uncond; cond]`` in one call; ``out = u + g (c - u)``) when
   ``guidance_scale > 1``; a latent larger than ``tile.latent_size`` is predicted per latent
   tile (guided per tile) and Gaussian-blended (:func:`dalpsr.pipelines.tiling.blend_tiles`).
4. :meth:`DenoisingLoop.decode`: tiled VAE decode, [-1,1] -> [0,1], crop to ``h*scale x w*scale``,
   color fix against ``x_up`` (adain | wavelet | none).

On a CPU device every call runs inside :func:`dalpsr.pipelines.cpu_memory.reuse_freed_memory`
(freed activations stay in the heap: no page faults for every large layer output; same outputs).

Randomness: one CPU ``torch.Generator`` per image seeded with its seed (initial noise and the
ancestral noise of stochastic schedulers), so an image's output depends only on its seed, its
inputs and the settings. Latents and scheduler arithmetic stay float32 on ``device``.
``last_stats`` after each call: ``encode_s``, ``denoise_s``, ``decode_s`` (seconds of the three
stages, CUDA-synchronised), ``unet_calls`` (denoiser evaluations), ``max_latent_tile``,
``timesteps``, and ``vae_fp32_fallback`` when it happened.
"""
from __future__ import annotations

import inspect
import logging
import math
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from dalpsr.pipelines.cpu_memory import reuse_freed_memory
from dalpsr.pipelines.denoiser import Conditions, Denoiser
from dalpsr.pipelines.schedulers import SCHEDULERS, alphas_cumprod, build_scheduler, canonical_name
from dalpsr.pipelines.tiling import TileOptions, blend_tiles, tiled_vae_decode, tiled_vae_encode
from dalpsr.utils.color_fix import COLOR_FIX_MODES, color_fix as apply_color_fix

START_MODES = ('lr', 'noise', 'noise_guidance')
#: noise level of the LR-embedded start: the first timestep run, or start_step itself (SeeSR's code)
START_NOISE = ('first_step', 'start_step')

_DTYPES = {'fp32': torch.float32, 'float32': torch.float32, 'fp16': torch.float16, 'float16': torch.float16,
           'bf16': torch.bfloat16, 'bfloat16': torch.bfloat16}


def parse_dtype(d: Union[str, torch.dtype, None], default: torch.dtype = torch.float32) -> torch.dtype:
    """``'fp32' | 'fp16' | 'bf16'`` (or a torch dtype, or None -> ``default``) -> torch dtype."""
    if d is None:
        return default
    if isinstance(d, torch.dtype):
        return d
    key = str(d).lower().replace('torch.', '')
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype '{d}': use fp32, fp16 or bf16")
    return _DTYPES[key]


def move_module(module, device, dtype) -> None:
    """Move a module; cast only when its dtype differs (diffusers warns on every ``.to(dtype)``)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)


@dataclass
class SamplingSettings:
    """How the loop samples (every field is a ``sampler:`` option of the test options).

    num_steps: scheduler steps; scheduler: a name of :data:`dalpsr.pipelines.schedulers.SCHEDULERS`
    (or a diffusers class name); eta: DDIM's eta (0 deterministic; passed to every scheduler whose
    ``step`` takes it); start / start_step / start_noise / noise_guidance_steps: the start (module doc);
    guidance_scale: CFG weight (<= 1: no CFG, one branch); scheduler_overrides: extra scheduler
    config keys (e.g. ``{timestep_spacing: trailing}``); color_fix: adain | wavelet | none;
    tile: :class:`TileOptions` (or its mapping).
    """

    num_steps: int = 50
    scheduler: str = 'ddpm'
    eta: float = 0.0
    start: str = 'lr'
    start_step: int = 999
    guidance_scale: float = 5.5
    start_noise: str = 'first_step'
    noise_guidance_steps: int = 1
    scheduler_overrides: Optional[Dict[str, Any]] = None
    color_fix: str = 'adain'
    tile: TileOptions = field(default_factory=TileOptions)

    def __post_init__(self) -> None:
        self.tile = TileOptions.from_opt(self.tile)
        if self.start not in START_MODES:
            raise ValueError(f"start must be one of {', '.join(START_MODES)}, got '{self.start}'")
        if self.start_noise not in START_NOISE:
            raise ValueError(f"start_noise must be one of {', '.join(START_NOISE)}, got '{self.start_noise}'")
        if self.color_fix not in COLOR_FIX_MODES:
            raise ValueError(f"color_fix must be one of {', '.join(COLOR_FIX_MODES)}, got '{self.color_fix}'")
        if not isinstance(self.num_steps, int) or isinstance(self.num_steps, bool) or self.num_steps < 1:
            raise ValueError(f'num_steps must be an integer >= 1, got {self.num_steps!r}')
        for k in ('start_step', 'noise_guidance_steps'):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f'{k} must be an integer >= 0, got {v!r}')
        for k in ('guidance_scale', 'eta'):
            v = getattr(self, k)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ValueError(f'{k} must be a number, got {v!r}')
        if self.eta < 0:
            raise ValueError(f'eta must be >= 0, got {self.eta}')

    @classmethod
    def from_opt(cls, opt: Optional[Dict[str, Any]]) -> 'SamplingSettings':
        """From a mapping of field names (unknown names raise ``ValueError`` naming them)."""
        opt = dict(opt or {})
        known = {f.name for f in fields(cls)}
        bad = sorted(k for k in opt if k not in known)
        if bad:
            raise ValueError(f"unknown sampling setting '{bad[0]}' (known: {', '.join(sorted(known))})")
        return cls(**opt)

    @staticmethod
    def check_scheduler_name(name: str) -> None:
        """``ValueError`` unless ``name`` is one of the offered schedulers."""
        if canonical_name(str(name)) not in SCHEDULERS:
            raise ValueError(f"unknown '{name}' (use one of {', '.join(SCHEDULERS)})")


@dataclass
class LRLatents:
    """What the loop computed from a batch of LR images (handed to the method's conditions).

    lq: [B,3,h,w] in [0,1] (CPU); x_up: bicubic x``scale`` [B,3,H,W] in [0,1] (CPU, H = h*scale);
    x_pad: ``x_up`` replicate-padded to [B,3,Hp,Wp] (multiples of ``pad_multiple``; on the device);
    z_lr: scaled VAE latent of ``x_pad`` [B,C,Hp/8,Wp/8] (float32, on the device).
    """

    lq: torch.Tensor
    x_up: torch.Tensor
    x_pad: torch.Tensor
    z_lr: torch.Tensor

    @property
    def size(self):
        """(H, W) of the SR output."""
        return tuple(self.x_up.shape[-2:])


class DenoisingLoop:
    """LR -> SR by latent diffusion around a method's :class:`Denoiser` (module doc).

    Args:
        vae: diffusers ``AutoencoderKL`` (frozen).
        scheduler_config: the SD model's scheduler config (dict); schedulers are built from it by name.
        scale: SR factor. pad_multiple: the upsampled image is padded to a multiple of this (64).
        device: where the VAE and the latents live. vae_dtype: VAE precision; a non-finite
            fp16/bf16 VAE result is recomputed in fp32 when ``vae_fp32_fallback``.
        prepare_modules: freeze the VAE, ``eval()`` it and move/cast it (default); ``False``
            uses it as it is (it must already be on ``device`` in ``vae_dtype``).
    """

    def __init__(self, vae, scheduler_config: Dict[str, Any], *, scale: int = 4,
                 device: Union[str, torch.device, None] = None, vae_dtype: Union[str, torch.dtype] = 'fp32',
                 vae_fp32_fallback: bool = True, pad_multiple: int = 64, logger: Optional[logging.Logger] = None,
                 prepare_modules: bool = True):
        self.logger = logger or logging.getLogger('dalpsr')
        self.device = torch.device(device) if device is not None else (
            torch.device('cuda') if torch.cuda.is_available() else torch.device('cpu'))
        self.vae = vae
        self.vae_dtype = parse_dtype(vae_dtype)
        self.vae_fp32_fallback = bool(vae_fp32_fallback)
        self.scheduler_config = dict(scheduler_config)
        self.scale = int(scale)
        self.pad_multiple = int(pad_multiple)
        if prepare_modules:
            self.vae.requires_grad_(False)
            self.vae.eval()
            move_module(self.vae, self.device, self.vae_dtype)
        self.vae_scale = float(getattr(self.vae.config, 'scaling_factor', 0.18215))
        self.last_stats: Dict[str, Any] = {}

    # ------------------------------------------------------------------ the whole call
    @torch.no_grad()
    def __call__(self, lq: torch.Tensor, denoiser: Denoiser, make_conditions: Callable[[LRLatents], Conditions],
                 seeds: Sequence[int], settings: Union[SamplingSettings, Dict[str, Any], None] = None,
                 output: str = 'image', callback: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
        """Super-resolve ``lq`` [B,3,h,w] in [0,1] -> [B,3,h*scale,w*scale] in [0,1] (float32, CPU).

        ``make_conditions(lr)`` builds the denoiser's conditions from the :class:`LRLatents`;
        ``seeds``: one int per image. ``output='latent'`` returns the final scaled latent
        [B,C,Hp/8,Wp/8] (padded size, float32, on the device) instead of decoding it.
        ``callback(i, n)`` is called after each step.
        """
        if not isinstance(lq, torch.Tensor) or lq.dim() != 4 or lq.shape[1] != 3:
            raise ValueError(f'lq must be a [B, 3, h, w] tensor, got '
                             f'{tuple(lq.shape) if isinstance(lq, torch.Tensor) else type(lq).__name__}')
        if output not in ('image', 'latent'):
            raise ValueError(f"output must be 'image' or 'latent', got '{output}'")
        settings = settings if isinstance(settings, SamplingSettings) else SamplingSettings.from_opt(settings)
        seeds = [int(s) for s in seeds]
        if len(seeds) != lq.shape[0]:
            raise ValueError(f'seeds: expected {lq.shape[0]} values (one per image), got {len(seeds)}')
        self.last_stats = {'unet_calls': 0, 'max_latent_tile': None}
        with reuse_freed_memory(self.device.type == 'cpu'):  # outputs unchanged (cpu_memory module doc)
            return self._run(lq, denoiser, make_conditions, seeds, settings, output, callback)

    def _run(self, lq, denoiser, make_conditions, seeds, settings, output, callback) -> torch.Tensor:
        t0 = self._now()
        lr = self.prepare(lq, settings.tile)
        self.last_stats['encode_s'] = self._now() - t0
        conditions = make_conditions(lr)
        t0 = self._now()
        lat = self.denoise(denoiser, lr, conditions, seeds, settings, callback)
        self.last_stats['denoise_s'] = self._now() - t0
        if output == 'latent':
            return lat
        t0 = self._now()
        img = self.decode(lat, lr, settings)
        self.last_stats['decode_s'] = self._now() - t0
        return img

    def _now(self) -> float:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ------------------------------------------------------------------ stages
    def upsample(self, lq: torch.Tensor) -> torch.Tensor:
        """Bicubic x``scale`` of ``lq`` [B,3,h,w] in [0,1] -> [B,3,h*s,w*s] clamped to [0,1]."""
        x = F.interpolate(lq.float(), scale_factor=self.scale, mode='bicubic', align_corners=False)
        return x.clamp(0, 1)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Replicate-pad [B,C,H,W] on the bottom/right to multiples of ``pad_multiple``."""
        m = self.pad_multiple
        H, W = x.shape[-2:]
        ph, pw = (-H) % m, (-W) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode='replicate')
        return x

    @torch.no_grad()
    def prepare(self, lq: torch.Tensor, tile: Optional[TileOptions] = None) -> LRLatents:
        """Upsample, pad and VAE-encode a batch of LR images (module doc step 1)."""
        x_up = self.upsample(lq.cpu())
        x_pad = self.pad(x_up)
        z_lr = self.encode(x_pad, TileOptions.from_opt(tile))
        return LRLatents(lq=lq.cpu(), x_up=x_up, x_pad=x_pad.to(self.device), z_lr=z_lr)

    def _vae_run(self, fn: Callable[[], torch.Tensor], what: str) -> torch.Tensor:
        out = fn()
        if self.vae_dtype != torch.float32 and self.vae_fp32_fallback and not torch.isfinite(out).all():
            self.logger.warning(f'VAE {what} in {self.vae_dtype} gave non-finite values; recomputing in fp32')
            move_module(self.vae, self.device, torch.float32)
            try:
                out = fn()
            finally:
                move_module(self.vae, self.device, self.vae_dtype)
            self.last_stats['vae_fp32_fallback'] = True
        return out

    @torch.no_grad()
    def encode(self, x: torch.Tensor, tile: TileOptions) -> torch.Tensor:
        """``x`` [B,3,H,W] in [0,1] (H,W multiples of 8) -> scaled latent [B,C,H/8,W/8] (float32)."""
        img = (x * 2 - 1).to(self.device)
        z = self._vae_run(lambda: tiled_vae_encode(self.vae, img.to(self.vae.dtype), tile.vae_encoder_tile,
                                                   tile.vae_encoder_overlap, shared_norm=tile.vae_encoder_norm),
                          'encode')
        return z.float() * self.vae_scale

    @torch.no_grad()
    def decode_latent(self, z: torch.Tensor, tile: TileOptions) -> torch.Tensor:
        """Scaled latent [B,C,h,w] -> image [B,3,8h,8w] in [0,1] (float32, on the device)."""
        zz = (z / self.vae_scale).to(self.device)
        x = self._vae_run(lambda: tiled_vae_decode(self.vae, zz.to(self.vae.dtype), tile.vae_decoder_tile,
                                                   tile.vae_decoder_overlap, shared_norm=tile.vae_decoder_norm),
                          'decode')
        return ((x.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def decode(self, lat: torch.Tensor, lr: LRLatents, settings: SamplingSettings) -> torch.Tensor:
        """Final latent -> SR [B,3,H,W] in [0,1] on the CPU (crop, color fix; module doc step 4)."""
        H, W = lr.size
        img = self.decode_latent(lat, settings.tile)[:, :, :H, :W].cpu()
        img = apply_color_fix(img, lr.x_up, settings.color_fix)
        return img.float().clamp(0, 1)

    # ------------------------------------------------------------------ the denoising steps
    def scheduler(self, settings: SamplingSettings):
        """A fresh scheduler with its timesteps set (and the begin index for the LR start)."""
        sched = build_scheduler(settings.scheduler, self.scheduler_config, settings.scheduler_overrides)
        sched.set_timesteps(settings.num_steps, device=self.device)
        return sched

    def start_latent(self, sched, lr: LRLatents, gens: List[torch.Generator], settings: SamplingSettings):
        """(x_T float32 [B,C,h,w] on the device, the timesteps to run) for ``settings.start``."""
        timesteps = sched.timesteps
        acp = alphas_cumprod(sched)
        z_lr = lr.z_lr
        if settings.start == 'lr':
            if not 0 <= int(settings.start_step) < len(acp):
                raise ValueError(f'start_step must be in [0, {len(acp) - 1}], got {settings.start_step}')
            keep = [i for i, t in enumerate(timesteps.tolist()) if t <= settings.start_step]
            if not keep:
                raise ValueError(f'start_step {settings.start_step} is below every timestep of the schedule')
            if keep[0] > 0:
                timesteps = timesteps[keep[0]:]
                if hasattr(sched, 'set_begin_index'):
                    sched.set_begin_index(keep[0])
        noise = torch.cat([torch.randn((1,) + tuple(z_lr.shape[1:]), generator=g) for g in gens]).to(self.device)
        if settings.start == 'lr':
            level = int(timesteps[0]) if settings.start_noise == 'first_step' else int(settings.start_step)
            self.last_stats['start_noise_t'] = level
            a = acp[level]
            lat = (math.sqrt(a) * z_lr + math.sqrt(1 - a) * noise).float()
        else:
            lat = noise.float() * float(getattr(sched, 'init_noise_sigma', 1.0))
        return lat, timesteps

    def guided(self, denoiser: Denoiser, x: torch.Tensor, t, conditions: Conditions, settings: SamplingSettings,
               box=None, latent_hw=None) -> torch.Tensor:
        """One guided model output for latents ``x`` [B,C,h,w] (float32 in, float32 out)."""
        cfg = settings.guidance_scale > 1.0
        view = conditions.for_step(cfg, latent_hw or tuple(x.shape[-2:]), box)
        xin = torch.cat([x, x]) if cfg else x
        tt = torch.as_tensor(t, device=self.device)
        out = denoiser.predict(xin, tt, view).float()
        self.last_stats['unet_calls'] = self.last_stats.get('unet_calls', 0) + 1
        shape = tuple(xin.shape[-2:])
        best = self.last_stats.get('max_latent_tile')
        if best is None or shape[0] * shape[1] > math.prod(best):
            self.last_stats['max_latent_tile'] = shape
        if cfg:
            u, c = out.chunk(2)
            out = u + settings.guidance_scale * (c - u)
        return out

    def guided_tiled(self, denoiser: Denoiser, x: torch.Tensor, t, conditions: Conditions,
                     settings: SamplingSettings) -> torch.Tensor:
        """:meth:`guided` per latent tile (Gaussian-blended) when the latent exceeds the tile."""
        tile = settings.tile
        hw = tuple(x.shape[-2:])
        if max(hw) <= tile.latent_size:
            return self.guided(denoiser, x, t, conditions, settings)
        return blend_tiles(lambda xt, box: self.guided(denoiser, xt, t, conditions, settings, box, hw), x,
                           tile.latent_size, tile.latent_overlap, out_dtype=torch.float32)

    @staticmethod
    def lr_direction(x_t: torch.Tensor, z_lr: torch.Tensor, a: float, prediction_type: str) -> torch.Tensor:
        """The model output that points from ``x_t`` exactly at ``z_lr`` (noise guidance)."""
        eps = (x_t - math.sqrt(a) * z_lr) / math.sqrt(1 - a)
        if prediction_type == 'v_prediction':
            return math.sqrt(a) * eps - math.sqrt(1 - a) * z_lr
        if prediction_type == 'sample':
            return z_lr.clone()
        return eps

    @torch.no_grad()
    def denoise(self, denoiser: Denoiser, lr: LRLatents, conditions: Conditions, seeds: Sequence[int],
                settings: SamplingSettings, callback: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
        """The scheduler loop (module doc step 3) -> final scaled latent (float32, on the device)."""
        sched = self.scheduler(settings)
        gens = [torch.Generator('cpu').manual_seed(int(s)) for s in seeds]
        lat, timesteps = self.start_latent(sched, lr, gens, settings)
        acp = alphas_cumprod(sched)
        pred_type = denoiser.prediction_type or sched.config.get('prediction_type', 'epsilon')
        params = inspect.signature(sched.step).parameters
        kw: Dict[str, Any] = {}
        if 'generator' in params:
            kw['generator'] = gens if len(gens) > 1 else gens[0]
        if 'eta' in params and settings.eta:
            kw['eta'] = float(settings.eta)
        n = len(timesteps)
        for i, t in enumerate(timesteps):
            inp = sched.scale_model_input(lat, t)
            if settings.start == 'noise_guidance' and i < int(settings.noise_guidance_steps):
                out = self.lr_direction(inp, lr.z_lr, float(acp[int(t)]), pred_type)
            else:
                out = self.guided_tiled(denoiser, inp, t, conditions, settings)
            lat = sched.step(out, t, lat, return_dict=False, **kw)[0].float()
            if callback is not None:
                callback(i, n)
        self.last_stats['timesteps'] = [int(t) for t in timesteps]
        return lat


__all__ = ['DenoisingLoop', 'SamplingSettings', 'LRLatents', 'TileOptions', 'Conditions', 'Denoiser',
           'START_MODES', 'START_NOISE', 'parse_dtype', 'move_module']
