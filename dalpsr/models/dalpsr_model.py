"""DaLPSR diffusion model (paper III-A, III-D, Algorithm 1): a ControlNet on frozen SD 2.1-base,
conditioned on the LR latent z_LR and on a text prompt composed of the semantic prompt p_s
(caption) and the restoration prompt p_r.

Training step (one batch of C3 items: ``gt`` [B,3,H,W], ``lq`` [B,3,H/s,W/s] in [0,1],
``prompt`` p_r, ``caption`` p_s, ``index``)::

    z0   = VAE(gt) * scaling_factor                     # frozen VAE, [B,4,H/8,W/8]
    cond = prepare_condition(mode, lq)                   # z_LR (latent mode) or upsampled LR
    t ~ U{0..T-1}, eps ~ N(0, I), z_t = sqrt(a_t) z0 + sqrt(1-a_t) eps
    text = compose(p_s, p_r) with per-part dropout       # dalpsr/data/prompt_compose.py
    pred = UNet(z_t, t, CLIP(text), + ControlNet(z_t, t, CLIP(text), cond))
    loss = || target - pred ||^2,  target = eps | v | z0 per the scheduler's prediction_type

Options: ``model:`` block, every key documented in options/reference/diffusion.yml.
The training loop is dalpsr/train.py (Accelerate: mixed precision, accumulation, EMA, resume).
"""
from __future__ import annotations

import fnmatch
import logging
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dalpsr.archs.sd_components import set_attention
from dalpsr.models.base_model import BaseModel, resolve_model_block
from dalpsr.utils.misc import sample_rng
from dalpsr.utils.options import OptionError, check_keys, get_opt
from dalpsr.utils.registry import MODEL_REGISTRY

logger = logging.getLogger('dalpsr')

PART_NAMES = ('controlnet', 'unet', 'vae', 'text_encoder')
CONTROLNET_KEYS = ('condition_mode', 'conditioning_embedding_out_channels', 'pretrained')
TEXT_KEYS = ('max_chunks',)
VAL_KEYS = ('num_images', 'num_steps', 'guidance_scale', 'negative_prompt', 'conditioning_scale', 'seed',
            'loss_timesteps', 'start_step')
RESTORATION_SOURCES = ('labels', 'irpad', 'none')

DEFAULTS: Dict[str, Any] = {
    'sd': {'pretrained': 'stabilityai/stable-diffusion-2-1-base'},
    'controlnet': {'condition_mode': 'latent', 'conditioning_embedding_out_channels': None, 'pretrained': None},
    'scale': 4,
    'trainable': ['controlnet'],
    'prompt': None,
    'text': {'max_chunks': 3},
    'restoration_prompt_source': 'labels',
    'irpad': None,
    'gradient_checkpointing': True,
    'attention': 'sdpa',
    'frozen_dtype': 'auto',
    'latent_sample': True,
    'noise_offset': 0.0,
    'snr_gamma': None,
    'val': {'num_images': 2, 'num_steps': 20, 'guidance_scale': 5.5,
            'negative_prompt': 'dotted, noise, blur, lowres, smooth', 'conditioning_scale': 1.0, 'seed': 0,
            'loss_timesteps': [100, 500, 900], 'start_step': 999, 'start_noise': 'first_step'},
}


def match_patterns(name: str, patterns: Sequence[str]) -> bool:
    """True if a dotted parameter name (``controlnet.down_blocks.0...``) matches any pattern.

    A pattern matches a name equal to it, a name under it (``unet.up_blocks`` matches
    ``unet.up_blocks.1.resnets.0.conv1.weight``) or by shell glob (``unet.*attn2*``).
    """
    for p in patterns:
        if name == p or name.startswith(p + '.') or fnmatch.fnmatchcase(name, p):
            return True
    return False


@MODEL_REGISTRY.register()
class DaLPSRModel(BaseModel):
    """ControlNet (+ optional trainable SD parts) on Stable Diffusion; see the module docstring.

    ``opt['model']`` keys: ``sd``, ``controlnet``, ``scale``, ``trainable``, ``prompt``, ``text``,
    ``restoration_prompt_source``, ``irpad``, ``gradient_checkpointing``, ``attention``,
    ``frozen_dtype``, ``latent_sample``, ``noise_offset``, ``snr_gamma``, ``val``.
    """

    def __init__(self, opt: Dict[str, Any], accelerator=None, components=None):
        """``components``: already loaded :class:`~dalpsr.archs.sd_components.SDComponents` to use
        instead of loading ``model.sd`` (benchmarks build random SD 2.1-base parts in memory)."""
        super().__init__(opt, accelerator)
        from dalpsr.archs.controlnet_arch import get_controlnet_class
        from dalpsr.archs.sd_components import load_sd_components, parse_dtype
        from dalpsr.data.prompt_compose import PromptComposer

        cfg, src = resolve_model_block(opt, DEFAULTS, nested=('controlnet', 'text', 'val'))
        self.cfg = cfg
        if cfg['restoration_prompt_source'] not in RESTORATION_SOURCES:
            raise OptionError(f"model.restoration_prompt_source must be one of {RESTORATION_SOURCES} in {src}, "
                              f"got {cfg['restoration_prompt_source']!r}")
        if cfg['attention'] not in ('sdpa', 'default'):
            raise OptionError(f"model.attention must be 'sdpa' or 'default' in {src}, got {cfg['attention']!r}")
        trainable = cfg['trainable']
        if isinstance(trainable, str):
            trainable = [trainable]
        if not trainable or not all(isinstance(p, str) for p in trainable):
            raise OptionError(f"model.trainable must be a non-empty list of module patterns in {src}")
        self.trainable_patterns = list(trainable)
        self.scale = int(cfg['scale'])
        self.seed = int(opt.get('seed', opt.get('manual_seed', 0)))
        try:
            self.composer = PromptComposer.from_opt(cfg['prompt'])
        except ValueError as err:
            raise OptionError(f'model.prompt in {src}: {err}') from None

        # ---- SD parts and ControlNet (weights from the loop's seed)
        comps = components if components is not None else load_sd_components(cfg['sd'])
        self.components = comps
        self.sd_source = comps.source
        self.noise_scheduler = comps.noise_scheduler
        self.prediction_type = comps.prediction_type
        self.tokenizer = comps.tokenizer
        self.vae, self.unet, self.text_encoder = comps.vae, comps.unet, comps.text_encoder
        ccfg = cfg['controlnet']
        cls = get_controlnet_class()
        if ccfg['pretrained']:
            from pathlib import Path
            path = Path(ccfg['pretrained'])
            if (path / 'controlnet' / 'config.json').is_file():  # an export dir
                path = path / 'controlnet'
            if not (path / 'config.json').is_file():
                raise OptionError(f"model.controlnet.pretrained in {src}: no ControlNet at {ccfg['pretrained']} "
                                  "(expected a save_pretrained folder or an export dir with controlnet/)")
            self.controlnet = cls.from_pretrained(path)
        else:
            self.controlnet = cls.from_unet(comps.unet, condition_mode=ccfg['condition_mode'],
                                            conditioning_embedding_out_channels=ccfg['conditioning_embedding_out_channels'])
        self.condition_mode = self.controlnet.condition_mode

        # ---- what trains
        parts = {'controlnet': self.controlnet, 'unet': self.unet, 'vae': self.vae, 'text_encoder': self.text_encoder}
        self._trainable_parts: List[str] = []
        for name, module in parts.items():
            module.requires_grad_(False)
            hit = False
            for pname, p in module.named_parameters():
                if match_patterns(f'{name}.{pname}', self.trainable_patterns):
                    p.requires_grad_(True)
                    hit = True
            if hit:
                self._trainable_parts.append(name)
        if not self._trainable_parts:
            raise OptionError(f"model.trainable {self.trainable_patterns} in {src} matches no parameter "
                              f"(parameter names start with one of {list(PART_NAMES)})")
        if 'vae' in self._trainable_parts:
            raise OptionError(f"model.trainable in {src}: training the VAE is not supported (latents would drift)")

        # ---- dtypes: trainable parts fp32 (mixed precision autocasts), frozen parts in frozen_dtype
        mp = getattr(accelerator, 'mixed_precision', 'no') if accelerator is not None else 'no'
        fd = cfg['frozen_dtype']
        frozen_dtype = (parse_dtype({'fp16': 'fp16', 'bf16': 'bf16'}.get(mp, 'fp32')) if fd in (None, 'auto')
                        else parse_dtype(fd))
        self.frozen_dtype = frozen_dtype
        for name, module in parts.items():
            dtype = torch.float32 if name in self._trainable_parts else frozen_dtype
            module.to(device=self.device, dtype=dtype)
            module.train(name in self._trainable_parts)
        if self.device.type == 'cpu' and frozen_dtype == torch.float16:
            logger.warning('frozen parts in fp16 on CPU are slow; use frozen_dtype fp32 or bf16 on CPU')

        # ---- attention processors and gradient checkpointing
        set_attention((self.unet, self.controlnet), cfg['attention'])
        if cfg['gradient_checkpointing']:
            self.controlnet.enable_gradient_checkpointing()
            self.unet.enable_gradient_checkpointing()  # recomputes the frozen decoder in backward
            if 'text_encoder' in self._trainable_parts:
                self.text_encoder.gradient_checkpointing_enable()

        # ---- restoration prompt from IRPAD (optional)
        self.irpad = None
        if cfg['restoration_prompt_source'] == 'irpad':
            if isinstance(cfg['irpad'], dict):
                check_keys(cfg['irpad'], ('path',), f'model.irpad in {src}')
            ipath = (cfg['irpad'] or {}).get('path') if isinstance(cfg['irpad'], dict) else cfg['irpad']
            if not ipath:
                raise OptionError(f"model.restoration_prompt_source: irpad needs model.irpad.path in {src}")
            from dalpsr.models.irpad_model import IRPADPredictor
            self.irpad = IRPADPredictor.from_pretrained(str(ipath), device=self.device)
        self.max_chunks = int(cfg['text']['max_chunks'])
        self._empty_emb = None

    # ------------------------------------------------------------------------------------------
    def trainable_modules(self) -> Dict[str, nn.Module]:
        return {name: getattr(self, name) for name in self._trainable_parts}

    def _raw(self, name: str) -> nn.Module:
        return self.unwrap(getattr(self, name))

    # ---- text
    def restoration_prompts(self, batch: Dict[str, Any]) -> List[str]:
        """p_r per sample: recorded labels (``batch['prompt']``), IRPAD on ``batch['lq']`` or ''."""
        b = batch['lq'].shape[0]
        src = self.cfg['restoration_prompt_source']
        if src == 'none' or not self.composer.use_restoration:
            return [''] * b
        if src == 'irpad':
            with torch.no_grad():
                return list(self.irpad.predict_prompt(batch['lq']))
        prompts = batch.get('prompt')
        if prompts is None:
            raise KeyError("batch has no 'prompt' (restoration prompt from the recorded labels); "
                           "use a TripletDataset or restoration_prompt_source: none|irpad")
        return [str(p) for p in prompts]

    def compose_prompts(self, batch: Dict[str, Any], training: bool = True) -> List[str]:
        """Prompts of a batch; in training, dropout per sample drawn from
        ``sample_rng(seed, index, 7)`` (depends only on the sample's stream index)."""
        pr = self.restoration_prompts(batch)
        caps = batch.get('caption') or [''] * len(pr)
        out = []
        idx = batch.get('index')
        for i in range(len(pr)):
            drops = []
            if training:
                key = int(idx[i]) if idx is not None else i
                drops = self.composer.sample_drops(sample_rng(self.seed, key, 7))
            out.append(self.composer.compose(str(caps[i]), pr[i], drops))
        return out

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, 77*n, D] embeddings (chunked CLIP encoding of long prompts, C5)."""
        from dalpsr.archs.text_encoding import encode_prompts, encode_prompts_with_grad
        te = getattr(self, 'text_encoder')
        if 'text_encoder' in self._trainable_parts and torch.is_grad_enabled():
            return encode_prompts_with_grad(self.tokenizer, te, list(prompts), self.max_chunks, self.device)
        return encode_prompts(self.tokenizer, self._raw('text_encoder'), list(prompts), self.max_chunks, self.device)

    # ---- latents
    def encode_latents(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        from dalpsr.archs.sd_components import encode_images
        with torch.no_grad():
            return encode_images(self.vae, images, sample=sample).float()

    def condition(self, lq: torch.Tensor, size) -> torch.Tensor:
        from dalpsr.archs.controlnet_arch import prepare_condition
        return prepare_condition(self.condition_mode, lq, self.vae, self.scale, size=tuple(size)).float()

    def predict(self, z_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, cond: torch.Tensor,
                conditioning_scale: float = 1.0) -> torch.Tensor:
        """UNet + ControlNet output (in the scheduler's prediction type), float32."""
        from dalpsr.archs.controlnet_arch import controlled_unet
        dtype = self._raw('controlnet').dtype
        return controlled_unet(self.unet, self.controlnet, z_t.to(dtype), t, emb.to(dtype), cond.to(dtype),
                               conditioning_scale).float()

    def target(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == 'epsilon':
            return noise
        if self.prediction_type == 'v_prediction':
            return self.noise_scheduler.get_velocity(z0, noise, t)
        if self.prediction_type == 'sample':
            return z0
        raise ValueError(f'unsupported prediction_type {self.prediction_type!r}')

    def _snr_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma loss weights (Hang et al. 2023), per sample. SNR from diffusers'
        ``compute_snr`` (equal to ``abar / (1 - abar)`` within 3.4e-7 relative)."""
        from diffusers.training_utils import compute_snr
        snr = compute_snr(self.noise_scheduler, t).float()
        g = float(self.cfg['snr_gamma'])
        w = torch.minimum(snr, torch.full_like(snr, g))
        return w / snr if self.prediction_type == 'epsilon' else w / (snr + 1)

    # ---- steps
    def training_step(self, batch: Dict[str, Any], step: int) -> Dict[str, Any]:
        gt, lq = batch['gt'].to(self.device), batch['lq'].to(self.device)
        z0 = self.encode_latents(gt, sample=bool(self.cfg['latent_sample']))
        cond = self.condition(lq, gt.shape[-2:])
        noise = torch.randn_like(z0)
        if self.cfg['noise_offset']:
            noise = noise + float(self.cfg['noise_offset']) * torch.randn(z0.shape[0], z0.shape[1], 1, 1,
                                                                          device=z0.device)
        b = z0.shape[0]
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), device=z0.device).long()
        z_t = self.noise_scheduler.add_noise(z0, noise, t)
        prompts = self.compose_prompts(batch, training=True)
        emb = self.encode_text(prompts)
        pred = self.predict(z_t, t, emb, cond)
        target = self.target(z0, noise, t).float()
        if self.cfg['snr_gamma']:
            per = F.mse_loss(pred, target, reduction='none').mean(dim=(1, 2, 3))
            loss = (per * self._snr_weights(t)).mean()
        else:
            loss = F.mse_loss(pred, target)
        return {'loss': loss, 'empty_prompts': sum(1 for p in prompts if not p) / b}

    @torch.no_grad()
    def fixed_batch_loss(self, batch: Dict[str, Any], timesteps: Sequence[int] = (100, 500, 900),
                         seed: int = 0) -> float:
        """Mean loss over fixed ``timesteps`` with fixed noise from ``seed`` and no prompt
        dropout: a deterministic measure of fit on ``batch``."""
        gt, lq = batch['gt'].to(self.device), batch['lq'].to(self.device)
        g = torch.Generator().manual_seed(seed)
        z0 = self.encode_latents(gt, sample=False)
        cond = self.condition(lq, gt.shape[-2:])
        emb = self.encode_text(self.compose_prompts(batch, training=False))
        total = 0.0
        for tv in timesteps:
            noise = torch.randn(z0.shape, generator=g).to(z0.device)
            t = torch.full((z0.shape[0],), int(tv), device=z0.device, dtype=torch.long)
            z_t = self.noise_scheduler.add_noise(z0, noise, t)
            total += float(F.mse_loss(self.predict(z_t, t, emb, cond), self.target(z0, noise, t).float()))
        return total / len(timesteps)

    @torch.no_grad()
    def sample(self, lq: torch.Tensor, prompts: Sequence[str], num_steps: int = 20, guidance_scale: float = 5.5,
               negative_prompt: str = '', conditioning_scale: float = 1.0, seed: int = 0,
               start_step: int = 999, start_noise: str = 'first_step') -> torch.Tensor:
        """Validation samples through the one sampler (dalpsr.pipelines.DaLPSRSampler on this
        model's networks as they are): DDIM, LR-embedded start, classifier-free guidance, no color
        fix. ``lq`` [B,3,h,w] in [0,1] -> SR [B,3,h*s,w*s] in [0,1] (CPU); image ``i`` uses seed
        ``seed + i``."""
        import types

        from dalpsr.pipelines.sampler import DaLPSRSampler
        parts = types.SimpleNamespace(vae=self._raw('vae'), unet=self._raw('unet'),
                                      text_encoder=self._raw('text_encoder'), tokenizer=self.tokenizer,
                                      scheduler_config=dict(self.components.scheduler_config))
        cn = self._raw('controlnet')
        sampler = DaLPSRSampler(parts, cn, condition_mode=self.condition_mode, scale=self.scale, device=self.device,
                                dtype=cn.dtype, vae_dtype=parts.vae.dtype, max_chunks=self.max_chunks,
                                prepare_modules=False)
        b = lq.shape[0]
        return sampler(lq.float().cpu(), list(prompts), negative_prompt=negative_prompt, num_steps=int(num_steps),
                       guidance_scale=float(guidance_scale), scheduler='ddim', start='lr', start_step=int(start_step),
                       conditioning_scale=float(conditioning_scale), seed=[int(seed) + i for i in range(b)],
                       color_fix='none', start_noise=start_noise)

    @torch.no_grad()
    def validate(self, loader, step: int, writer=None) -> Dict[str, float]:
        """Fixed-noise loss over the val set and a few DDIM samples (LR-up | SR | GT) written to
        tensorboard; returns ``{'loss': ..., 'psnr': ...}`` (PSNR of the samples, RGB, [0,1])."""
        v = self.cfg['val']
        losses, psnrs, images = [], [], []
        n_img = int(v['num_images'])
        for batch in loader:
            losses.append(self.fixed_batch_loss(batch, v['loss_timesteps'], seed=int(v['seed'])))
            if len(images) < n_img:
                k = min(n_img - len(images), batch['lq'].shape[0])
                sub = {key: (val[:k] if hasattr(val, '__getitem__') else val) for key, val in batch.items()}
                prompts = self.compose_prompts(sub, training=False)
                sr = self.sample(sub['lq'], prompts, int(v['num_steps']), float(v['guidance_scale']),
                                 str(v['negative_prompt'] or ''), float(v['conditioning_scale']), int(v['seed']),
                                 int(v['start_step']), str(v['start_noise'])).cpu()
                gt = sub['gt'].float().cpu()
                mse = ((sr - gt) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
                psnrs += (10 * torch.log10(1 / mse)).tolist()
                from dalpsr.archs.controlnet_arch import upsample_lq
                up = upsample_lq(sub['lq'].float().cpu(), self.scale, gt.shape[-2:])
                for i in range(k):
                    images.append(torch.cat([up[i], sr[i], gt[i]], dim=-1))
        if writer is not None:
            for i, img in enumerate(images):
                writer.add_image(f'val/sample_{i}', img.clamp(0, 1), step)
        out = {'loss': float(np.mean(losses)) if losses else float('nan')}
        if psnrs:
            out['psnr'] = float(np.mean(psnrs))
        return out

    # ---- export
    def restoration_prompt_spec(self) -> Optional[Dict[str, Any]]:
        """The PromptSpec (``to_opt()``) the restoration prompts p_r were written with: the IRPAD's
        (``restoration_prompt_source: irpad``), the training data's ``prompt`` options
        (``labels``; default spec when the dataset gives none) or None (``none``)."""
        from dalpsr.data.prompt_labels import PromptSpec
        source = self.cfg['restoration_prompt_source']
        if source == 'none':
            return None
        if source == 'irpad':
            return self.irpad.spec.to_opt()
        train = get_opt(self.opt, 'datasets.train', None) or {}
        data_prompt = train['prompt'] if 'prompt' in train else (train.get('build') or {}).get('prompt')
        return PromptSpec.from_opt(data_prompt).to_opt()

    def export_meta(self) -> Dict[str, Any]:
        """``dalpsr.json`` content; ``restoration_prompt_spec`` is what test.py compares with the
        IRPAD export's spec (docs/inference.md)."""
        return {'sd': dict(self.sd_source), 'scale': self.scale, 'prompt': self.composer.to_opt(),
                'text': {'max_chunks': self.max_chunks}, 'prediction_type': self.prediction_type,
                'restoration_prompt_source': self.cfg['restoration_prompt_source'],
                'restoration_prompt_spec': self.restoration_prompt_spec(),
                'trainable': list(self.trainable_patterns), 'trained_parts': {}}

    def export(self, out_dir: str) -> None:
        """``<out_dir>/controlnet/`` + ``dalpsr.json`` (C8). Other trained SD parts are saved
        next to it (``unet/``, ``text_encoder/``) and listed in ``dalpsr.json['trained_parts']``
        (part -> folder relative to ``out_dir``)."""
        import os

        from dalpsr.archs.controlnet_arch import export_dalpsr
        meta = self.export_meta()
        for part in ('unet', 'text_encoder'):
            if part in self._trainable_parts:
                self._raw(part).save_pretrained(os.path.join(out_dir, part))
                meta['trained_parts'][part] = part
        export_dalpsr(out_dir, self._raw('controlnet'), meta)
