"""SSP-IR (TCSVT 2025) as a dalpsr model: ControlNet with image and structure priors.

Spec: ../shared/specs/related-methods.md section 1; networks: dalpsr/archs/sspir_arch.py and
dalpsr/archs/sspir_attention.py. Training step (a batch of ``gt`` [B,3,H,W], ``lq``
[B,3,H/s,W/s] in [0,1], ``caption`` strings, ``index``)::

    z0    = VAE(gt) * scaling_factor                        # frozen
    up    = bicubic(lq -> H x W)                            # [0, 1]
    T_img = Refine(CLIP(up))                                # frozen CLIP, trainable Refine  [B, N, 512]
    F, I  = Processor(up)                                   # F [B,320,H/8,W/8]; I = [I_1/2, I_1/4, I_1/8]
    text  = CLIP_text(caption or '' with p = caption_dropout), chunks of 75 tokens   [B, 77k, D]
    down, mid = ControlNet(z_t, t, text, F, image prior T_img)
    eps^  = UNet(z_t, t, text, + down/mid, image prior T_img, structure prior = down)
    loss  = ||eps - eps^||^2 + 0.1 sum_s ||I_s - GT_s||_1 + 0.01 sum_s ||FFT(I_s) - FFT(GT_s)||_1

``GT_s``: bilinear downsample of GT in [-1, 1]; FFT: ``rfft2``, real and imaginary parts stacked,
mean L1. Trainable: ControlNet, Processor, Refine layer and the UNet's new image/structure
attentions (997.80 M parameters at SD 1.5 size); VAE, UNet, text encoder and CLIP are frozen.
Options: the ``model:`` block, every key in options/reference/sspir.yml.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dalpsr.archs.sd_components import set_attention
from dalpsr.models.base_model import BaseModel, resolve_model_block
from dalpsr.utils.experiment import merge_defaults
from dalpsr.utils.misc import sample_rng
from dalpsr.utils.options import OptionError
from dalpsr.utils.registry import MODEL_REGISTRY

logger = logging.getLogger('dalpsr')

DEFAULTS: Dict[str, Any] = {
    'sd': {'pretrained': 'stable-diffusion-v1-5/stable-diffusion-v1-5'},
    'clip': {'pretrained': 'openai/clip-vit-large-patch14', 'layer': -1},
    'arch': None,                       # keys of dalpsr.archs.sspir_arch.ARCH_DEFAULTS
    'pretrained': None,                 # an SSP-IR export dir to start from
    'scale': 4,
    'caption_dropout': 0.5,
    'text': {'max_chunks': 4},
    'loss': {'rgb_weight': 0.1, 'fft_weight': 0.01},
    'gradient_checkpointing': True,
    'attention': 'sdpa',
    'frozen_dtype': 'auto',
    'latent_sample': True,
    'val': {'seed': 0, 'loss_timesteps': [100, 500, 900]},
}
PART_NAMES = ('controlnet', 'processor', 'refine', 'unet')


def fft_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 between the ``rfft2`` spectra (real and imaginary parts stacked), float32."""
    a, b = torch.fft.rfft2(pred.float()), torch.fft.rfft2(target.float())
    return F.l1_loss(torch.stack([a.real, a.imag], -1), torch.stack([b.real, b.imag], -1))


def multiscale_losses(rgbs: Sequence[torch.Tensor], gt: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sum_s L1, sum_s FFT-L1)`` of the Processor's RGB heads against GT ([0,1] in; compared in
    [-1, 1] after a bilinear downsample to each head's size)."""
    g = gt.float() * 2 - 1
    l1 = g.new_zeros(())
    ff = g.new_zeros(())
    for rgb in rgbs:
        gs = F.interpolate(g, size=rgb.shape[-2:], mode='bilinear', align_corners=False)
        l1 = l1 + F.l1_loss(rgb.float(), gs)
        ff = ff + fft_l1(rgb, gs)
    return l1, ff




def _place(module: nn.Module, device, dtype) -> None:
    """Move to ``device``; cast only when a parameter has another dtype (diffusers warns on casts)."""
    module.to(device=device)
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype=dtype)


def mark_trainable(parts: Dict[str, Any], unet) -> List[str]:
    """Freeze ``unet`` except its new SSP-IR layers; ControlNet, Processor and Refine fully
    trainable. Returns the names of the trainable UNet modules."""
    from dalpsr.archs.sspir_attention import prior_modules
    unet.requires_grad_(False)
    names = []
    for name, m in prior_modules(unet):
        m.requires_grad_(True)
        names.append(name)
    for k in ('controlnet', 'processor', 'refine'):
        parts[k].requires_grad_(True)
    return names


@MODEL_REGISTRY.register()
class SSPIRModel(BaseModel):
    """SSP-IR on Stable Diffusion (SD 1.5 as the paper; any SD with a diffusers UNet, e.g. 2.1-base)."""

    def __init__(self, opt: Dict[str, Any], accelerator=None, components=None, clip_vision=None):
        """``components`` / ``clip_vision``: already built SD parts and CLIP vision tower
        (benchmarks); otherwise ``model.sd`` / ``model.clip`` are loaded."""
        super().__init__(opt, accelerator)
        from dalpsr.archs.sd_components import load_sd_components, parse_dtype
        from dalpsr.archs.sspir_arch import (ARCH_DEFAULTS, CLIPImagePrior, build_sspir_networks, load_clip_vision,
                                             load_export_weights, load_trainable_state_dict, read_export_meta)
        cfg, src = resolve_model_block(opt, DEFAULTS, nested=('clip', 'text', 'loss', 'val'))
        cfg['arch'] = merge_defaults(ARCH_DEFAULTS, cfg['arch'], f'model.arch in {src}')
        if not 0 <= float(cfg['caption_dropout']) <= 1:
            raise OptionError(f"model.caption_dropout must be in [0, 1] in {src}, got {cfg['caption_dropout']!r}")
        if cfg['attention'] not in ('sdpa', 'default'):
            raise OptionError(f"model.attention must be 'sdpa' or 'default' in {src}, got {cfg['attention']!r}")
        pre_meta = None
        if cfg['pretrained']:
            try:
                pre_meta = read_export_meta(cfg['pretrained'])
            except (FileNotFoundError, ValueError) as err:
                raise OptionError(f'model.pretrained in {src}: {err}') from None
            if pre_meta.get('arch') != cfg['arch']:
                raise OptionError(f"model.pretrained in {src}: the export was trained with arch {pre_meta.get('arch')}, "
                                  f"the options ask for {cfg['arch']}")
        self.cfg = cfg
        self.scale = int(cfg['scale'])
        self.seed = int(opt.get('seed', opt.get('manual_seed', 0)))
        self.max_chunks = int(cfg['text']['max_chunks'])

        comps = components if components is not None else load_sd_components(cfg['sd'])
        self.components = comps
        self.noise_scheduler = comps.noise_scheduler
        self.prediction_type = comps.prediction_type
        self.tokenizer = comps.tokenizer
        self.vae, self.unet, self.text_encoder = comps.vae, comps.unet, comps.text_encoder
        vision = clip_vision if clip_vision is not None else load_clip_vision(cfg['clip']['pretrained'])
        self.clip = CLIPImagePrior(vision, cfg['clip']['layer'])
        parts = build_sspir_networks(self.unet, self.clip.hidden_size, comps.vae_scale_factor, cfg['arch'],
                                     seed=self.seed)
        self.controlnet, self.processor, self.refine = parts['controlnet'], parts['processor'], parts['refine']
        if cfg['pretrained']:
            load_trainable_state_dict(parts, self.unet, load_export_weights(cfg['pretrained']))
        self.unet_trainable = mark_trainable(parts, self.unet)
        for m in (self.vae, self.text_encoder, self.clip):
            m.requires_grad_(False)

        mp = getattr(accelerator, 'mixed_precision', 'no') if accelerator is not None else 'no'
        fd = cfg['frozen_dtype']
        frozen = (parse_dtype({'fp16': 'fp16', 'bf16': 'bf16'}.get(mp, 'fp32')) if fd in (None, 'auto')
                  else parse_dtype(fd))
        self.frozen_dtype = frozen
        # the UNet holds trainable layers: it stays fp32 (autocast runs it in half precision)
        for m in (self.controlnet, self.processor, self.refine, self.unet):
            _place(m, self.device, torch.float32)
            m.train()
        for m in (self.vae, self.text_encoder, self.clip):
            _place(m, self.device, frozen)
            m.eval()
        self.unet.eval()  # dropout-free; its new layers have no train-only behaviour
        set_attention((self.unet, self.controlnet), cfg['attention'])
        if cfg['gradient_checkpointing']:
            self.controlnet.enable_gradient_checkpointing()
            self.unet.enable_gradient_checkpointing()

    # ---- the loop contract ---------------------------------------------------------------------
    def trainable_modules(self) -> Dict[str, nn.Module]:
        return {'controlnet': self.controlnet, 'processor': self.processor, 'refine': self.refine,
                'unet': self.unet}

    def _raw(self, name: str) -> nn.Module:
        return self.unwrap(getattr(self, name))

    # ---- inputs --------------------------------------------------------------------------------
    def captions(self, batch: Dict[str, Any], training: bool) -> List[str]:
        """Captions of the batch; in training each is dropped to '' with p = caption_dropout,
        drawn from ``sample_rng(seed, index, 11)`` (depends only on the sample)."""
        b = batch['lq'].shape[0]
        caps = [str(c) for c in (batch.get('caption') or [''] * b)]
        if not training or not self.cfg['caption_dropout']:
            return caps
        idx = batch.get('index')
        p = float(self.cfg['caption_dropout'])
        return ['' if sample_rng(self.seed, int(idx[i]) if idx is not None else i, 11).random() < p else c
                for i, c in enumerate(caps)]

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        from dalpsr.archs.text_encoding import encode_prompts
        with torch.no_grad():
            return encode_prompts(self.tokenizer, self.text_encoder, list(prompts), self.max_chunks,
                                  self.device).float()

    def encode_latents(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        from dalpsr.archs.sd_components import encode_images
        with torch.no_grad():
            return encode_images(self.vae, images, sample=sample).float()

    def upsample(self, lq: torch.Tensor, size) -> torch.Tensor:
        from dalpsr.archs.controlnet_arch import upsample_lq
        return upsample_lq(lq.to(self.device).float(), self.scale, tuple(size))

    def priors(self, up: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        """LR upsampled to the output size [B,3,H,W] in [0,1] -> ``(T_img, F, rgb heads)``."""
        t_img = self.refine(self.clip(up))
        feat, rgbs = self.processor(up)
        return t_img, feat, rgbs

    def predict(self, z_t, t, emb, t_img, feat, conditioning_scale: float = 1.0) -> torch.Tensor:
        """UNet output with the ControlNet residuals and both priors (float32)."""
        from dalpsr.archs.sspir_attention import prior_kwargs
        down, mid = self.controlnet(z_t, t, encoder_hidden_states=emb, controlnet_cond=feat,
                                    conditioning_scale=conditioning_scale, return_dict=False,
                                    cross_attention_kwargs=prior_kwargs(t_img))
        return self.unet(z_t, t, encoder_hidden_states=emb, down_block_additional_residuals=list(down),
                         mid_block_additional_residual=mid,
                         cross_attention_kwargs=prior_kwargs(t_img, down)).sample.float()

    def target(self, z0, noise, t):
        if self.prediction_type == 'epsilon':
            return noise
        if self.prediction_type == 'v_prediction':
            return self.noise_scheduler.get_velocity(z0, noise, t)
        raise ValueError(f'unsupported prediction_type {self.prediction_type!r}')

    # ---- steps ---------------------------------------------------------------------------------
    def training_step(self, batch: Dict[str, Any], step: int) -> Dict[str, Any]:
        gt, lq = batch['gt'].to(self.device).float(), batch['lq'].to(self.device)
        z0 = self.encode_latents(gt, sample=bool(self.cfg['latent_sample']))
        up = self.upsample(lq, gt.shape[-2:])
        t_img, feat, rgbs = self.priors(up)
        noise = torch.randn_like(z0)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (z0.shape[0],), device=z0.device).long()
        z_t = self.noise_scheduler.add_noise(z0, noise, t)
        caps = self.captions(batch, training=True)
        emb = self.encode_text(caps)
        pred = self.predict(z_t, t, emb, t_img, feat)
        mse = F.mse_loss(pred, self.target(z0, noise, t).float())
        l1, ff = multiscale_losses(rgbs, gt)
        w = self.cfg['loss']
        loss = mse + float(w['rgb_weight']) * l1 + float(w['fft_weight']) * ff
        return {'loss': loss, 'mse': float(mse.detach()), 'rgb_l1': float(l1.detach()), 'fft_l1': float(ff.detach()),
                'empty_captions': sum(1 for c in caps if not c) / len(caps)}

    @torch.no_grad()
    def fixed_batch_loss(self, batch: Dict[str, Any], timesteps: Sequence[int] = (100, 500, 900),
                         seed: int = 0) -> float:
        """Total loss over fixed ``timesteps``, fixed noise from ``seed``, no caption dropout."""
        gt, lq = batch['gt'].to(self.device).float(), batch['lq'].to(self.device)
        g = torch.Generator().manual_seed(int(seed))
        z0 = self.encode_latents(gt)
        up = self.upsample(lq, gt.shape[-2:])
        t_img, feat, rgbs = self.priors(up)
        emb = self.encode_text(self.captions(batch, training=False))
        l1, ff = multiscale_losses(rgbs, gt)
        w = self.cfg['loss']
        total = 0.0
        for tv in timesteps:
            noise = torch.randn(z0.shape, generator=g).to(z0.device)
            t = torch.full((z0.shape[0],), int(tv), device=z0.device, dtype=torch.long)
            z_t = self.noise_scheduler.add_noise(z0, noise, t)
            total += float(F.mse_loss(self.predict(z_t, t, emb, t_img, feat), self.target(z0, noise, t).float()))
        return total / len(timesteps) + float(w['rgb_weight']) * float(l1) + float(w['fft_weight']) * float(ff)

    @torch.no_grad()
    def validate(self, loader, step: int, writer=None) -> Dict[str, float]:
        """Fixed-noise loss over the val set and the PSNR of the processor's 1/f RGB head."""
        v = self.cfg['val']
        losses, psnrs = [], []
        for batch in loader:
            losses.append(self.fixed_batch_loss(batch, v['loss_timesteps'], seed=int(v['seed'])))
            gt = batch['gt'].to(self.device).float()
            _, _, rgbs = self.priors(self.upsample(batch['lq'], gt.shape[-2:]))
            small = F.interpolate(gt, size=rgbs[-1].shape[-2:], mode='bilinear', align_corners=False)
            mse = (((rgbs[-1].float() + 1) / 2).clamp(0, 1) - small).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
            psnrs += (10 * torch.log10(1 / mse)).tolist()
        out = {'loss': float(np.mean(losses)) if losses else float('nan')}
        if psnrs:
            out['processor_psnr'] = float(np.mean(psnrs))
        return out

    # ---- export --------------------------------------------------------------------------------
    def export_meta(self) -> Dict[str, Any]:
        return {'method': 'SSP-IR', 'sd': dict(self.components.source), 'clip': dict(self.cfg['clip']),
                'arch': dict(self.cfg['arch']), 'scale': self.scale, 'text': {'max_chunks': self.max_chunks},
                'prediction_type': self.prediction_type}

    def export(self, out_dir: str) -> None:
        """``<out_dir>/sspir_trainable.safetensors`` + ``sspir.json`` (see sspir_arch.export_sspir)."""
        from dalpsr.archs.sspir_arch import export_sspir
        parts = {k: self._raw(k) for k in ('controlnet', 'processor', 'refine')}
        export_sspir(out_dir, parts, self._raw('unet'), self.export_meta())
