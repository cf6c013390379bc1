"""The DaLPSR sampler (paper IV-B; interface C9): LR -> SR with a ControlNet on frozen SD.

DaLPSR's part of sampling is its :class:`DaLPSRDenoiser` (one ControlNet + UNet evaluation) and
its conditions (chunked CLIP text embeddings of the composed prompts; the ControlNet condition
``z_lr`` in ``latent`` mode or the upsampled LR image in ``image`` mode). Everything else (start
latent, scheduler, classifier-free guidance, latent and VAE tiling, color fix, seeds) is the
shared :class:`dalpsr.pipelines.loop.DenoisingLoop`; read its module doc for the steps.

Prompts of one batch are encoded together only when they need the same number of 77-token
chunks (negative prompt included under CFG); a batch mixing chunk counts is sampled in groups of
equal count, so an image's result does not depend on which images share its batch.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from dalpsr.pipelines.denoiser import Conditions, Denoiser
from dalpsr.pipelines.loop import (START_MODES, DenoisingLoop, LRLatents, SamplingSettings,  # noqa: F401
                                   move_module, parse_dtype)
from dalpsr.pipelines.tiling import TileOptions

#: SeeSR defaults (REFERENCE.md section 4).
DEFAULT_NEGATIVE_PROMPT = 'dotted, noise, blur, lowres, smooth'
DEFAULT_ADDED_PROMPT = 'clean, high-resolution, 8k'


def encode_text(tokenizer, text_encoder, prompts: List[str], max_chunks: int = 3, device=None) -> torch.Tensor:
    """[B, 77*n, D] text embeddings (``dalpsr.archs.text_encoding.encode_prompts``)."""
    from dalpsr.archs.text_encoding import encode_prompts
    return encode_prompts(tokenizer, text_encoder, list(prompts), max_chunks=max_chunks, device=device)


def _as_list(x, b: int, what: str) -> list:
    if isinstance(x, (list, tuple)):
        if len(x) != b:
            raise ValueError(f'{what}: expected {b} values (one per image), got {len(x)}')
        return list(x)
    return [x] * b


class DaLPSRDenoiser(Denoiser):
    """ControlNet then UNet (SD 2.1 + the DaLPSR ControlNet), one evaluation per ``predict``.

    Conditions: ``text`` [N, 77*n, D] (per branch), ``control`` (spatial: ``z_lr`` [N,4,h,w] or
    the upsampled LR [N,3,8h,8w] in [0,1]) and optionally ``conditioning_scale`` (shared float).
    Networks run in ``dtype``; ``compile``: ``torch.compile`` them (``True`` or a mode name).
    """

    COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')

    def __init__(self, unet, controlnet, *, dtype: torch.dtype = torch.float32, conditioning_scale: float = 1.0,
                 compile: Union[bool, str] = False):
        self.unet, self.controlnet = unet, controlnet
        self.dtype = dtype
        self.conditioning_scale = float(conditioning_scale)
        self._unet_fn, self._cn_fn = unet, controlnet
        if compile:
            mode = compile if isinstance(compile, str) else None
            if mode is not None and mode not in self.COMPILE_MODES:
                raise ValueError(f"compile must be true/false or one of {', '.join(self.COMPILE_MODES)}, "
                                 f'got {compile!r}')
            self._unet_fn = torch.compile(unet, mode=mode)
            self._cn_fn = torch.compile(controlnet, mode=mode)
        # CUDA graphs reuse their output buffers: mark each network evaluation as a new step
        self._mark_step = compile in ('reduce-overhead', 'max-autotune')

    def modules(self):
        return [self.unet, self.controlnet]

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, conditions: Conditions) -> torch.Tensor:
        xin = x_t.to(self.dtype)
        cin = conditions['control'].to(self.dtype)
        emb = conditions['text']
        scale = float(conditions.shared.get('conditioning_scale', self.conditioning_scale))
        tt = t.expand(xin.shape[0])
        if self._mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        down, mid = self._cn_fn(xin, tt, encoder_hidden_states=emb.to(self.dtype), controlnet_cond=cin,
                                conditioning_scale=scale, return_dict=False)
        udt = self.unet.dtype  # the UNet may run in another precision than the ControlNet (training: frozen bf16)
        return self._unet_fn(xin.to(udt), tt, encoder_hidden_states=emb.to(udt),
                             down_block_additional_residuals=[d.to(udt) for d in down],
                             mid_block_additional_residual=mid.to(udt), return_dict=False)[0]


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
        prepare_modules: freeze, ``eval()`` and move/cast the networks (default). ``False`` uses
            them as they are (validation inside training: the ControlNet is being trained).
    """

    def __init__(self, components, controlnet, *, condition_mode: Optional[str] = None, scale: int = 4,
                 device: Union[str, torch.device, None] = None, dtype: Union[str, torch.dtype] = 'fp32',
                 vae_dtype: Union[str, torch.dtype, None] = None, vae_fp32_fallback: bool = True,
                 channels_last: bool = False, compile: Union[bool, str] = False, max_chunks: int = 3,
                 pad_multiple: int = 64, logger: Optional[logging.Logger] = None, prepare_modules: bool = True):
        self.logger = logger or logging.getLogger('dalpsr')
        self.device = torch.device(device) if device is not None else (
            torch.device('cuda') if torch.cuda.is_available() else torch.device('cpu'))
        self.dtype = parse_dtype(dtype)
        self.vae, self.unet = components.vae, components.unet
        self.text_encoder, self.tokenizer = components.text_encoder, components.tokenizer
        cfg = getattr(components, 'scheduler_config', None)
        if cfg is None and getattr(components, 'noise_scheduler', None) is not None:
            cfg = components.noise_scheduler.config
        if cfg is None:
            raise ValueError('components carry no scheduler_config / noise_scheduler')
        self.controlnet = controlnet
        self.max_chunks = int(max_chunks)
        if condition_mode is None:
            condition_mode = getattr(controlnet, 'condition_mode', None)
            if condition_mode is None:
                cc = getattr(getattr(controlnet, 'config', None), 'conditioning_channels', 3)
                condition_mode = 'latent' if cc == 4 else 'image'
        if condition_mode not in ('latent', 'image'):
            raise ValueError(f"condition_mode must be 'latent' or 'image', got '{condition_mode}'")
        self.condition_mode = condition_mode
        for m in (self.unet, self.text_encoder, self.controlnet) if prepare_modules else ():
            m.requires_grad_(False)
            m.eval()
            move_module(m, self.device, self.dtype)
        self.loop = DenoisingLoop(self.vae, dict(cfg), scale=scale, device=self.device,
                                  vae_dtype=parse_dtype(vae_dtype, self.dtype), vae_fp32_fallback=vae_fp32_fallback,
                                  pad_multiple=pad_multiple, logger=self.logger, prepare_modules=prepare_modules)
        if channels_last and prepare_modules:
            for m in (self.unet, self.controlnet, self.vae):
                m.to(memory_format=torch.channels_last)
        self.denoiser = DaLPSRDenoiser(self.unet, self.controlnet, dtype=self.dtype, compile=compile)
        self.last_stats: Dict[str, Any] = {}

    @property
    def scale(self) -> int:
        return self.loop.scale

    @property
    def scheduler_config(self) -> Dict[str, Any]:
        return self.loop.scheduler_config

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

    # ------------------------------------------------------------------ pieces (the loop's)
    def upsample(self, lq: torch.Tensor) -> torch.Tensor:
        """Bicubic x``scale`` of ``lq`` [B,3,h,w] in [0,1] -> [B,3,h*s,w*s] clamped to [0,1]."""
        return self.loop.upsample(lq)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        return self.loop.pad(x)

    def encode_lr(self, x_up: torch.Tensor, tile: TileOptions) -> torch.Tensor:
        """``x_up`` [B,3,H,W] in [0,1] (H,W multiples of 8) -> scaled latent [B,4,H/8,W/8] (fp32)."""
        return self.loop.encode(x_up, tile)

    def decode(self, z: torch.Tensor, tile: TileOptions) -> torch.Tensor:
        """Scaled latent [B,4,h,w] -> image [B,3,8h,8w] in [0,1] (fp32)."""
        return self.loop.decode_latent(z, tile)

    @torch.no_grad()
    def text_embeddings(self, prompts: List[str], negative: List[str], cfg: bool) -> torch.Tensor:
        """[2B or B, 77*n, D]: negatives first when ``cfg`` (one encoder call, equal length)."""
        texts = (list(negative) + list(prompts)) if cfg else list(prompts)
        emb = encode_text(self.tokenizer, self.text_encoder, texts, self.max_chunks, self.device)
        return emb.to(self.dtype)

    def chunk_groups(self, prompts: List[str], negative: List[str], cfg: bool) -> List[List[int]]:
        """Indices of the batch grouped by the chunk count their prompts need (with CFG: the
        larger of prompt and negative prompt), in order of first appearance."""
        from dalpsr.archs.text_encoding import count_chunks
        n = count_chunks(self.tokenizer, prompts, self.max_chunks)
        if cfg:
            n = [max(a, b) for a, b in zip(n, count_chunks(self.tokenizer, negative, self.max_chunks))]
        groups: Dict[int, List[int]] = {}
        for i, k in enumerate(n):
            groups.setdefault(k, []).append(i)
        return list(groups.values())

    # ------------------------------------------------------------------ main call
    @torch.no_grad()
    def __call__(self, lq: torch.Tensor, prompts: Union[str, Sequence[str]] = '',
                 negative_prompt: Union[str, Sequence[str]] = DEFAULT_NEGATIVE_PROMPT,
                 num_steps: int = 50, guidance_scale: float = 5.5, scheduler: str = 'ddpm',
                 start: str = 'lr', start_step: int = 999, conditioning_scale: float = 1.0,
                 seed: Union[int, Sequence[int]] = 0, tile: Union[None, Dict[str, Any], TileOptions] = None,
                 color_fix: str = 'adain', noise_guidance_steps: int = 1,
                 scheduler_overrides: Optional[Dict[str, Any]] = None, output: str = 'image',
                 callback: Optional[Callable[[int, int], None]] = None, eta: float = 0.0,
                 start_noise: str = 'first_step') -> torch.Tensor:
        """Super-resolve ``lq`` [B,3,h,w] in [0,1] -> [B,3,h*scale,w*scale] in [0,1] (float32, CPU).

        ``prompts``/``negative_prompt``/``seed``: one value for all images or one per image.
        ``prompts`` are complete positive prompts (compose caption, restoration prompt and the
        added prompt before, e.g. with ``dalpsr.data.prompt_compose.compose_prompt``).
        ``guidance_scale <= 1`` disables classifier-free guidance (one branch only).
        ``output='latent'`` returns the final scaled latent [B,4,H'/8,W'/8] (padded size, fp32)
        instead of decoding it. Other arguments: :class:`dalpsr.pipelines.loop.SamplingSettings`.
        """
        if not isinstance(lq, torch.Tensor) or lq.dim() != 4 or lq.shape[1] != 3:
            raise ValueError(f'lq must be a [B, 3, h, w] tensor, got '
                             f'{tuple(lq.shape) if isinstance(lq, torch.Tensor) else type(lq).__name__}')
        settings = SamplingSettings(num_steps=num_steps, scheduler=scheduler, eta=eta, start=start,
                                    start_step=start_step, start_noise=start_noise, guidance_scale=guidance_scale,
                                    noise_guidance_steps=noise_guidance_steps,
                                    scheduler_overrides=scheduler_overrides, color_fix=color_fix, tile=tile)
        b = lq.shape[0]
        prompts = [str(p) for p in _as_list(prompts, b, 'prompts')]
        negative = [str(p) for p in _as_list(negative_prompt if negative_prompt is not None else '', b,
                                             'negative_prompt')]
        seeds = [int(s) for s in _as_list(seed, b, 'seed')]
        cfg = settings.guidance_scale > 1.0
        groups = self.chunk_groups(prompts, negative, cfg)
        if len(groups) == 1:
            return self._sample(lq, prompts, negative, seeds, settings, float(conditioning_scale), output, callback)
        outs, stats = [None] * b, []
        for idx in groups:
            res = self._sample(lq[idx], [prompts[i] for i in idx], [negative[i] for i in idx],
                               [seeds[i] for i in idx], settings, float(conditioning_scale), output, callback)
            stats.append(self.last_stats)
            for j, i in enumerate(idx):
                outs[i] = res[j:j + 1]
        self.last_stats = _merge_stats(stats)
        return torch.cat(outs)

    def _sample(self, lq, prompts, negative, seeds, settings, conditioning_scale, output, callback):
        cfg = settings.guidance_scale > 1.0
        b = lq.shape[0]

        def conditions(lr: LRLatents) -> Conditions:
            emb = self.text_embeddings(prompts, negative, cfg)
            control = lr.z_lr if self.condition_mode == 'latent' else lr.x_pad
            return Conditions(cond={'text': emb[b:] if cfg else emb}, uncond={'text': emb[:b]} if cfg else {},
                              shared={'conditioning_scale': conditioning_scale}, spatial={'control': control})

        try:
            return self.loop(lq, self.denoiser, conditions, seeds, settings, output=output, callback=callback)
        finally:
            self.last_stats = dict(self.loop.last_stats)


def _merge_stats(stats: List[Dict[str, Any]]) -> Dict[str, Any]:
    """last_stats of several group calls -> one: times and calls summed, the largest tile kept."""
    out: Dict[str, Any] = dict(stats[0])
    for s in stats[1:]:
        for k in ('unet_calls', 'encode_s', 'denoise_s', 'decode_s'):
            if k in s:
                out[k] = out.get(k, 0) + s[k]
        if s.get('max_latent_tile') and (not out.get('max_latent_tile') or
                                         s['max_latent_tile'][0] * s['max_latent_tile'][1] >
                                         out['max_latent_tile'][0] * out['max_latent_tile'][1]):
            out['max_latent_tile'] = s['max_latent_tile']
        if s.get('vae_fp32_fallback'):
            out['vae_fp32_fallback'] = True
    out['groups'] = len(stats)
    return out


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
