"""DeeDSR stage 2: ``DeeDSRModel``, the degradation-aware adapter on the frozen SD UNet.

Training step (items of :class:`~dalpsr.data.deedsr_dataset.DeeDSRDataset`: ``gt`` [B,3,H,W],
``lq`` [B,3,H/4,W/4] in [0,1])::

    z0    = VAE(gt) * scaling_factor                  # frozen VAE (posterior sample)
    z_lr  = VAE(bicubic_x4(lq)) * scaling_factor       # posterior mean
    d     = learner(lq)                                # frozen stage-1 learner on the raw LR, [B, d_dim]
    t ~ U{0..T-1}, eps ~ N(0, I), z_t = sqrt(a_t) z0 + sqrt(1-a_t) eps
    local, tokens = adapter(z_lr, t, d)               # maps at h, h/2, h/4, h/8; [B, 64, 512] tokens
    eps_hat = UNet(z_t, t, context=tokens; SPADE(local) on every ResnetBlock2D)
    loss  = || eps - eps_hat ||^2

Trained (the spec, not an option): the whole adapter and the UNet's ``*spade*`` and ``*attn2*``
parameters (SPADE layers; cross-attention q, rebuilt k/v, out). No text encoder is loaded.

Options (``model:`` block; every key documented in options/reference/deedsr.yml)::

    type: DeeDSRModel
    sd: {pretrained: stabilityai/stable-diffusion-2-1-base, ...}   # unet, vae, scheduler are used
    learner: experiments/deedsr_stage1/export                     # stage-1 export (required)
    adapter: {model_channels: 256, channel_mult: [1, 1, 2, 2], ...}
    spade_hidden: 128
    scale: 4
    gradient_checkpointing: false
    frozen_dtype: auto        # VAE and learner precision (auto: the mixed-precision dtype)
    latent_sample: true
    val: {loss_timesteps: [100, 500, 900], seed: 0}

``export``: ``deedsr.json`` + ``adapter.pth`` + ``unet_trained.pth`` (the SPADE and attn2
tensors) + the learner (``degradation_learner.*``); :func:`load_deedsr` rebuilds the networks.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dalpsr.models.base_model import BaseModel, resolve_model_block
from dalpsr.utils.options import OptionError, check_keys
from dalpsr.utils.registry import MODEL_REGISTRY

ADAPTER_DEFAULTS: Dict[str, Any] = {'model_channels': 256, 'channel_mult': [1, 1, 2, 2], 'attention_levels': [1, 2, 4],
                                    'num_heads': 4, 'out_channels': 256, 'reduction': 32, 'norm_groups': 32,
                                    'dropout': 0.0}
DEFAULTS: Dict[str, Any] = {
    'sd': {'pretrained': 'stabilityai/stable-diffusion-2-1-base'},
    'learner': None,
    'adapter': ADAPTER_DEFAULTS,
    'spade_hidden': 128,
    'scale': 4,
    'gradient_checkpointing': False,
    'frozen_dtype': 'auto',
    'latent_sample': True,
    'val': {'loss_timesteps': [100, 500, 900], 'seed': 0},
}
TRAINABLE = ('adapter', 'unet.*spade*', 'unet.*attn2*')
EXPORT_FILES = ('deedsr.json', 'adapter.pth', 'unet_trained.pth')


def load_sd_parts(cfg: Dict[str, Any]):
    """(unet, vae, DDPM noise scheduler) of the ``sd`` options block (no text encoder or tokenizer;
    same files, overrides and one-line errors as :func:`dalpsr.archs.sd_components.load_sd_components`)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from dalpsr.archs.sd_components import SD_KEYS, _load_part, parse_dtype
    cfg = dict(cfg or {})
    check_keys(cfg, SD_KEYS, 'sd block')
    dtype = parse_dtype(cfg.get('dtype') or 'fp32')

    def sched_loader(path, **kw):
        kw.pop('variant', None)
        return DDPMScheduler.from_pretrained(path, **kw)
    sched = _load_part(sched_loader, cfg, 'scheduler')
    vae = _load_part(AutoencoderKL.from_pretrained, cfg, 'vae', torch_dtype=dtype)
    unet = _load_part(UNet2DConditionModel.from_pretrained, cfg, 'unet', torch_dtype=dtype)
    return unet, vae, sched


class DeeDSRNets:
    """The networks of a DeeDSR denoiser: ``unet`` (with SPADE and rebuilt attn2), ``adapter``,
    ``learner`` (frozen), ``vae``, ``scheduler_config``, ``scale`` and ``meta`` (deedsr.json)."""

    def __init__(self, unet, adapter, learner, vae, scheduler_config, scale: int = 4, meta=None):
        self.unet, self.adapter, self.learner, self.vae = unet, adapter, learner, vae
        self.scheduler_config = dict(scheduler_config)
        self.scale = int(scale)
        self.meta = dict(meta or {})

    def predict(self, z_t: torch.Tensor, t: torch.Tensor, z_lr: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """eps prediction ``[B, 4, h, w]`` for ``z_t`` at ``t`` given the LR latent and d."""
        return predict_eps(self.unet, self.adapter, z_t, t, z_lr, d)


def predict_eps(unet, adapter, z_t, t, z_lr, d) -> torch.Tensor:
    from dalpsr.archs.deedsr_unet import set_local_maps
    b = z_t.shape[0]
    t = torch.as_tensor(t, device=z_t.device)
    if t.ndim == 0:
        t = t.expand(b)
    local, tokens = adapter(z_lr, t, d)
    raw = unet.module if hasattr(unet, 'module') else unet
    set_local_maps(raw, local)
    return unet(z_t, t, encoder_hidden_states=tokens).sample


def build_deedsr_nets(unet, vae, scheduler_config, learner, adapter_cfg: Dict[str, Any], spade_hidden: int = 128,
                      scale: int = 4) -> DeeDSRNets:
    """Adapter from ``adapter_cfg`` (d_dim from the learner, in_channels from the UNet) and the
    DeeDSR changes on ``unet`` (:func:`dalpsr.archs.deedsr_unet.deedsr_unet`)."""
    from dalpsr.archs.deedsr_adapter_arch import DegradationAwareAdapter
    from dalpsr.archs.deedsr_unet import deedsr_unet
    cfg = dict(adapter_cfg)
    levels = len(unet.config.block_out_channels)
    if len(cfg.get('channel_mult', ADAPTER_DEFAULTS['channel_mult'])) != levels:
        raise ValueError(f"adapter.channel_mult needs one entry per UNet resolution ({levels}), got "
                         f"{cfg.get('channel_mult')}: every local map must reach a SPADE layer")
    cfg['d_dim'] = learner.dim
    cfg['in_channels'] = unet.config.in_channels
    adapter = DegradationAwareAdapter(**cfg).to(next(unet.parameters()).device)
    deedsr_unet(unet, context_dim=adapter.global_dim, label_nc=adapter.out_channels, hidden=int(spade_hidden))
    return DeeDSRNets(unet, adapter, learner, vae, scheduler_config, scale,
                      {'adapter': adapter.config, 'spade_hidden': int(spade_hidden), 'scale': int(scale)})


def export_deedsr(out_dir, nets: DeeDSRNets, sd_source: Dict[str, Any]) -> None:
    """Write a DeeDSR export (module doc) into ``out_dir`` (files written via temp + rename)."""
    from dalpsr.archs.deedsr_learner_arch import save_degradation_learner
    from dalpsr.archs.deedsr_unet import trained_unet_state
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, state in (('adapter.pth', {k: v.detach().cpu() for k, v in nets.adapter.state_dict().items()}),
                        ('unet_trained.pth', trained_unet_state(nets.unet))):
        tmp = out / f'.{name}.tmp'
        torch.save(state, tmp)
        os.replace(tmp, out / name)
    save_degradation_learner(out, nets.learner, {'stage': 1, 'method': 'DeeDSR'})
    meta = dict(nets.meta, sd=dict(sd_source), method='DeeDSR', prediction_type='epsilon')
    tmp = out / '.deedsr.json.tmp'
    tmp.write_text(json.dumps(meta, indent=2) + '\n')
    os.replace(tmp, out / 'deedsr.json')


def load_deedsr(path, sd: Optional[Dict[str, Any]] = None, device='cpu', components=None) -> DeeDSRNets:
    """Rebuild the networks of a DeeDSR export (``path`` or ``path/export``). ``sd`` overrides
    the export's ``sd`` block (e.g. a local SD folder); ``components`` = ``(unet, vae, scheduler)``
    already loaded (benchmarks). Frozen, eval mode. A missing file: one-line FileNotFoundError."""
    from dalpsr.archs.deedsr_learner_arch import load_degradation_learner
    p = Path(path)
    if (p / 'export' / 'deedsr.json').is_file():
        p = p / 'export'
    for name in EXPORT_FILES:
        if not (p / name).is_file():
            raise FileNotFoundError(f'missing {p / name} (a DeeDSR export: train options/train/'
                                    f'train_deedsr_stage2_sd21.yml and point at its export/ folder)')
    meta = json.loads((p / 'deedsr.json').read_text())
    learner = load_degradation_learner(p, device)
    if components is None:
        unet, vae, sched = load_sd_parts(sd if sd is not None else meta.get('sd', {}))
    else:
        unet, vae, sched = components
    unet.to(device)
    cfg = {k: v for k, v in meta['adapter'].items() if k not in ('d_dim', 'in_channels')}
    nets = build_deedsr_nets(unet, vae, dict(sched.config), learner, cfg, meta['spade_hidden'], meta['scale'])
    nets.adapter.load_state_dict(torch.load(p / 'adapter.pth', map_location='cpu'))
    missing = nets.unet.load_state_dict(torch.load(p / 'unet_trained.pth', map_location='cpu'), strict=False)
    if missing.unexpected_keys:
        raise ValueError(f'{p / "unet_trained.pth"} holds tensors this UNet does not have: {missing.unexpected_keys[:3]}')
    for m in (nets.unet, nets.adapter, nets.vae):
        m.requires_grad_(False)
        m.eval()
    nets.adapter.to(device)
    nets.meta = meta
    return nets


@MODEL_REGISTRY.register()
class DeeDSRModel(BaseModel):
    """Stage 2 of DeeDSR (module doc)."""

    def __init__(self, opt: Dict[str, Any], accelerator=None, components=None):
        """``components``: ``(unet, vae, noise_scheduler)`` to use instead of loading ``model.sd``."""
        super().__init__(opt, accelerator)
        from dalpsr.archs.deedsr_learner_arch import load_degradation_learner
        from dalpsr.archs.sd_components import parse_dtype
        from dalpsr.models.dalpsr_model import match_patterns
        cfg, src = resolve_model_block(opt, DEFAULTS, nested=('adapter', 'val'))
        self.cfg = cfg
        if not cfg['learner']:
            raise OptionError(f'model.learner in {src}: the stage-1 degradation learner (its export folder) is required')
        try:
            learner = load_degradation_learner(cfg['learner'], self.device)
        except FileNotFoundError as err:
            raise OptionError(f'model.learner in {src}: {err}') from None
        unet, vae, sched = components if components is not None else load_sd_parts(cfg['sd'])
        if len(cfg['adapter']['channel_mult']) != len(unet.config.block_out_channels):
            raise OptionError(f"model.adapter.channel_mult in {src} needs one entry per UNet resolution "
                              f"({len(unet.config.block_out_channels)}), got {cfg['adapter']['channel_mult']}")
        self.sd_source = dict(cfg['sd'])
        self.noise_scheduler = sched
        if sched.config.get('prediction_type', 'epsilon') != 'epsilon':
            raise OptionError(f"model.sd in {src}: DeeDSR trains eps-prediction; this scheduler predicts "
                              f"{sched.config.get('prediction_type')}")
        unet.to(self.device)
        if unet.dtype != torch.float32:  # trainable SPADE/attn2 live inside the UNet: fp32 (autocast does the rest)
            unet.to(dtype=torch.float32)
        self.nets = build_deedsr_nets(unet, vae, dict(sched.config), learner, cfg['adapter'], cfg['spade_hidden'],
                                      cfg['scale'])
        self.unet, self.adapter, self.vae, self.learner = self.nets.unet, self.nets.adapter, vae, learner
        self.scale = int(cfg['scale'])
        # ---- what trains: the spec's set, exactly
        unet.requires_grad_(False)
        for name, p in unet.named_parameters():
            if match_patterns(f'unet.{name}', TRAINABLE):
                p.requires_grad_(True)
        self.adapter.requires_grad_(True)
        learner.requires_grad_(False)
        vae.requires_grad_(False)
        mp = getattr(accelerator, 'mixed_precision', 'no') if accelerator is not None else 'no'
        fd = cfg['frozen_dtype']
        frozen = parse_dtype({'fp16': 'fp16', 'bf16': 'bf16'}.get(mp, 'fp32')) if fd in (None, 'auto') else parse_dtype(fd)
        for m in (vae, learner):
            m.to(self.device)
            if next(m.parameters()).dtype != frozen:
                m.to(dtype=frozen)
            m.eval()
        self.adapter.to(self.device)
        if cfg['gradient_checkpointing']:
            unet.enable_gradient_checkpointing()
        unet.train()
        self.adapter.train()

    def trainable_modules(self) -> Dict[str, nn.Module]:
        return {'adapter': self.adapter, 'unet': self.unet}

    def set_prepared(self, modules: Dict[str, nn.Module]) -> None:
        super().set_prepared(modules)
        self.unet.train()  # frozen parts have no dropout; keeps DDP's mode consistent

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def conditions(self, lq: torch.Tensor):
        """(z_lr [B,4,H/8,W/8], d [B,d_dim]) of LR images ``lq`` [B,3,h,w] in [0,1]."""
        from dalpsr.archs.sd_components import encode_images
        lq = lq.to(self.device).float()
        up = F.interpolate(lq, scale_factor=self.scale, mode='bicubic', align_corners=False).clamp(0, 1)
        z_lr = encode_images(self.vae, up).float()
        d = self.learner(lq.to(next(self.learner.parameters()).dtype)).float()
        return z_lr, d

    def training_step(self, batch: Dict[str, Any], step: int) -> Dict[str, Any]:
        from dalpsr.archs.sd_components import encode_images
        gt, lq = batch['gt'].to(self.device).float(), batch['lq'].to(self.device).float()
        with torch.no_grad():
            z0 = encode_images(self.vae, gt, sample=bool(self.cfg['latent_sample'])).float()
        z_lr, d = self.conditions(lq)
        noise = torch.randn_like(z0)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (z0.shape[0],), device=z0.device).long()
        z_t = self.noise_scheduler.add_noise(z0, noise, t)
        eps = predict_eps(self.unet, self.adapter, z_t, t, z_lr, d).float()
        return {'loss': F.mse_loss(eps, noise)}

    @torch.no_grad()
    def fixed_batch_loss(self, batch: Dict[str, Any], timesteps: Sequence[int] = (100, 500, 900), seed: int = 0) -> float:
        """Mean eps-MSE at fixed ``timesteps`` with fixed noise (deterministic measure of fit)."""
        from dalpsr.archs.sd_components import encode_images
        z0 = encode_images(self.vae, batch['gt'].to(self.device).float()).float()
        z_lr, d = self.conditions(batch['lq'])
        g = torch.Generator().manual_seed(int(seed))
        total = 0.0
        for tv in timesteps:
            noise = torch.randn(z0.shape, generator=g).to(z0.device)
            t = torch.full((z0.shape[0],), int(tv), device=z0.device, dtype=torch.long)
            z_t = self.noise_scheduler.add_noise(z0, noise, t)
            total += float(F.mse_loss(predict_eps(self.unet, self.adapter, z_t, t, z_lr, d).float(), noise))
        return total / len(timesteps)

    @torch.no_grad()
    def validate(self, loader, step: int, writer=None) -> Dict[str, float]:
        v = self.cfg['val']
        losses = [self.fixed_batch_loss(b, v['loss_timesteps'], v['seed']) for b in loader]
        return {'loss': float(np.mean(losses))} if losses else {}

    def export(self, out_dir: str) -> None:
        nets = DeeDSRNets(self.unwrap(self.unet), self.unwrap(self.adapter), self.learner, self.vae,
                          self.nets.scheduler_config, self.scale, self.nets.meta)
        export_deedsr(out_dir, nets, self.sd_source)
