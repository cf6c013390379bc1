"""SSP-IR's restorer for test.py (``method: {type: SSPIR}``) on the shared denoising loop.

Per batch (spec ../shared/specs/related-methods.md section 1, inference):

- the loop upsamples the LR (bicubic x scale), pads it and encodes ``z_lr`` (LR-embedded start at
  ``start_step`` 999);
- conditions: the text of each image's caption (test.py captions the LR inputs, or reads a
  dataset's ``caption_file``) + ``sampler.added_prompt``, encoded in up to ``max_chunks`` x 75
  tokens, against ``sampler.negative_prompt`` (CFG); the image prior ``T_img`` = Refine(CLIP(LR up))
  and the Processor feature ``F`` of the padded upsampled LR are the same in both CFG branches
  (``shared`` / ``spatial``: F is cropped per latent tile);
- every step: ControlNet(x_t, t, text, F, T_img) then UNet(x_t, t, text, + residuals, T_img,
  structure = residuals): :class:`SSPIRDenoiser`.

Paper settings (options/test/test_sspir_sd15.yml): DDPM 50 steps, CFG 7.5, latent tiles of 96
(SeeSR); negative prompt and colour fix are not stated by the paper: SeeSR's defaults.
The networks are loaded on the first ``restore`` call.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Sequence

import torch

from dalpsr.restorers.base import Restorer
from dalpsr.utils.options import OptionError
from dalpsr.utils.registry import RESTORER_REGISTRY

logger = logging.getLogger('dalpsr')


def loop_settings(sampler: Dict[str, Any]):
    """The sampler-block keys that are fields of the loop's ``SamplingSettings`` -> SamplingSettings."""
    from dataclasses import fields

    from dalpsr.pipelines.loop import SamplingSettings
    names = {f.name for f in fields(SamplingSettings)}
    return SamplingSettings.from_opt({k: v for k, v in sampler.items() if k in names})

from dalpsr.pipelines.denoiser import Conditions, Denoiser  # noqa: E402 - the shared loop's method interface


def model_dtype(name: Any, device: str) -> str:
    """``auto`` -> fp16 on CUDA, fp32 elsewhere; other names as given."""
    if name in (None, 'auto'):
        return 'fp16' if str(device).startswith('cuda') else 'fp32'
    return str(name)


class SSPIRDenoiser(Denoiser):
    """ControlNet then UNet with SSP-IR's priors, one evaluation per ``predict``.

    Conditions: ``text`` [N, 77k, D] (per CFG branch), ``image`` = T_img [N, n, D_img] (shared),
    ``feat`` = the Processor's F [N, C0, h, w] (spatial, ratio 1 to the latent; cropped per tile).
    """

    def __init__(self, unet, controlnet, *, dtype: torch.dtype = torch.float32, conditioning_scale: float = 1.0):
        self.unet, self.controlnet = unet, controlnet
        self.dtype = dtype
        self.conditioning_scale = float(conditioning_scale)

    def modules(self):
        return [self.unet, self.controlnet]

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, conditions) -> torch.Tensor:
        from dalpsr.archs.sspir_attention import prior_kwargs
        x = x_t.to(self.dtype)
        emb = conditions['text'].to(self.dtype)
        t_img = conditions['image'].to(self.dtype)
        feat = conditions['feat'].to(self.dtype)
        scale = float(conditions.shared.get('conditioning_scale', self.conditioning_scale))
        tt = t.expand(x.shape[0])
        down, mid = self.controlnet(x, tt, encoder_hidden_states=emb, controlnet_cond=feat, conditioning_scale=scale,
                                    return_dict=False, cross_attention_kwargs=prior_kwargs(t_img))
        return self.unet(x, tt, encoder_hidden_states=emb, down_block_additional_residuals=list(down),
                         mid_block_additional_residual=mid, return_dict=False,
                         cross_attention_kwargs=prior_kwargs(t_img, down))[0]


class SSPIRNets:
    """The networks SSP-IR samples with (frozen SD parts, CLIP prior, trained parts), on one device."""

    def __init__(self, components, clip_prior, controlnet, processor, refine, *, scale: int, max_chunks: int,
                 device: str, dtype: str):
        from dalpsr.pipelines.loop import move_module, parse_dtype
        self.components, self.clip = components, clip_prior
        self.controlnet, self.processor, self.refine = controlnet, processor, refine
        self.scale, self.max_chunks = int(scale), int(max_chunks)
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype)
        from dalpsr.archs.sd_components import set_attention
        set_attention((components.unet, controlnet), 'sdpa')
        for m in (components.unet, components.text_encoder, controlnet, processor, refine, clip_prior):
            m.requires_grad_(False)
            m.eval()
            move_module(m, self.device, self.dtype)

    @classmethod
    def from_export(cls, path: str, device: str, dtype: str, sd: Optional[Dict[str, Any]] = None,
                    clip: Optional[str] = None, max_chunks: Optional[int] = None) -> 'SSPIRNets':
        from dalpsr.archs.sd_components import load_sd_components
        from dalpsr.archs.sspir_arch import (CLIPImagePrior, build_sspir_networks, load_clip_vision,
                                             load_export_weights, load_trainable_state_dict, read_export_meta)
        meta = read_export_meta(path)
        sd_cfg = dict(meta.get('sd') or {})
        sd_cfg.update(sd or {})
        sd_cfg.pop('dtype', None)
        comps = load_sd_components(sd_cfg)
        ccfg = dict(meta.get('clip') or {})
        vision = load_clip_vision(clip or ccfg.get('pretrained'))
        prior = CLIPImagePrior(vision, int(ccfg.get('layer', -1)))
        parts = build_sspir_networks(comps.unet, prior.hidden_size, comps.vae_scale_factor, meta.get('arch'))
        load_trainable_state_dict(parts, comps.unet, load_export_weights(path))
        mc = max_chunks or int((meta.get('text') or {}).get('max_chunks', 4))
        return cls(comps, prior, parts['controlnet'], parts['processor'], parts['refine'],
                   scale=int(meta.get('scale', 4)), max_chunks=mc, device=device, dtype=dtype)

    @torch.no_grad()
    def conditions(self, lr, prompts: Sequence[str], negative: Sequence[str]):
        """The loop's LRLatents + prompts -> :class:`Conditions` (see the module doc)."""
        from dalpsr.archs.text_encoding import encode_prompts
        b = lr.x_pad.shape[0]
        emb = encode_prompts(self.components.tokenizer, self.components.text_encoder,
                             list(prompts) + list(negative), self.max_chunks, self.device)
        x_up = lr.x_up.to(self.device, torch.float32)
        t_img = self.refine(self.clip(x_up).to(self.dtype))
        feat, _ = self.processor(lr.x_pad.to(self.device, self.dtype))
        return Conditions(cond={'text': emb[:b]}, uncond={'text': emb[b:]}, shared={'image': t_img},
                          spatial={'feat': feat})


@RESTORER_REGISTRY.register()
class SSPIR(Restorer):
    """SSP-IR as a test.py restorer (module doc). ``model.path``: an SSP-IR export folder
    (``sspir.json`` + ``sspir_trainable.safetensors``); ``clip``: another location of the CLIP
    vision model than the one recorded in the export."""

    option_blocks = ('model', 'sampler')
    needs = ('caption',)

    @classmethod
    def check_options(cls, opt: Dict[str, Any], src: str) -> None:
        m, s = opt['model'], opt['sampler']
        if not m['path']:
            raise OptionError(f"missing required key 'model.path' in {src} (an SSP-IR export folder: sspir.json + "
                              'sspir_trainable.safetensors)')
        if s.get('prompt'):
            raise OptionError(f'sampler.prompt in {src}: SSP-IR has no prompt composition (caption + '
                              'sampler.added_prompt); remove it')
        if m.get('compile'):
            raise OptionError(f'model.compile in {src}: not supported by the SSP-IR restorer; set it to false')

    def __init__(self, model: Dict[str, Any], sampler: Dict[str, Any], device: str = 'cpu',
                 clip: Optional[str] = None) -> None:
        super().__init__()
        from dalpsr.archs.sspir_arch import read_export_meta
        self.model_opt, self.sampler_opt, self.device = dict(model), dict(sampler), str(device)
        self.clip_path = clip
        self.meta = read_export_meta(str(model['path']))
        self.scale = int(self.meta.get('scale', 4))
        self.settings = loop_settings(sampler)
        self._nets: Optional[SSPIRNets] = None
        self._loop = None

    @classmethod
    def from_model(cls, model, device: str, dtype: str = 'fp32', sampler: Optional[Dict[str, Any]] = None,
                   negative_prompt: str = '', added_prompt: str = '') -> 'SSPIR':
        """A restorer around the networks of an in-memory ``SSPIRModel`` (benchmarks, validation)."""
        from dalpsr.pipelines.loop import SamplingSettings
        self = cls.__new__(cls)
        Restorer.__init__(self)
        self.model_opt = {'path': None, 'dtype': dtype, 'vae_dtype': None, 'vae_fp32_fallback': True}
        self.sampler_opt = {'negative_prompt': negative_prompt, 'added_prompt': added_prompt,
                            'conditioning_scale': 1.0}
        self.device, self.clip_path, self.scale = str(device), None, int(model.scale)
        self.meta = model.export_meta()
        self.settings = SamplingSettings.from_opt(sampler or {})
        raw = {k: model.unwrap(getattr(model, k)) for k in ('controlnet', 'processor', 'refine')}
        self._nets = SSPIRNets(model.components, model.clip, raw['controlnet'], raw['processor'], raw['refine'],
                               scale=model.scale, max_chunks=model.max_chunks, device=device, dtype=dtype)
        self._loop = None
        return self

    def describe(self) -> Dict[str, Any]:
        return {'type': type(self).__name__, 'scale': self.scale, 'sspir_json': self.meta,
                'clip': self.clip_path}

    def nets(self) -> SSPIRNets:
        if self._nets is None:
            m = self.model_opt
            self._nets = SSPIRNets.from_export(str(m['path']), self.device, model_dtype(m['dtype'], self.device),
                                               sd=m.get('sd'), clip=self.clip_path, max_chunks=m.get('max_chunks'))
            logger.info(f"SSP-IR: {m['path']} on {self.device} ({self._nets.dtype})")
        return self._nets

    def loop(self):
        if self._loop is None:
            from dalpsr.pipelines.loop import DenoisingLoop
            n = self.nets()
            m = self.model_opt
            self._loop = DenoisingLoop(n.components.vae, n.components.scheduler_config, scale=self.scale,
                                       device=self.device, vae_dtype=m.get('vae_dtype') or n.dtype,
                                       vae_fp32_fallback=bool(m.get('vae_fp32_fallback', True)), logger=logger)
        return self._loop

    @torch.no_grad()
    def restore(self, lq: torch.Tensor, *, seeds: Sequence[int], captions: Sequence[str] = (),
                restoration: Sequence[str] = ()) -> torch.Tensor:
        b = lq.shape[0]
        s = self.sampler_opt
        added = str(s.get('added_prompt') or '').strip()
        caps = [str(c).strip() for c in (list(captions) or [''] * b)]
        prompts = [(f'{c}, {added}' if c and added else (c or added)) for c in caps]
        negative = [str(s.get('negative_prompt') or '')] * b
        nets = self.nets()
        loop = self.loop()
        den = SSPIRDenoiser(nets.components.unet, nets.controlnet, dtype=nets.dtype,
                            conditioning_scale=float(s.get('conditioning_scale', 1.0)))
        try:
            sr = loop(lq, den, lambda lr: nets.conditions(lr, prompts, negative), seeds, self.settings)
        finally:
            stats = dict(loop.last_stats)
        self.last_stats = {k: stats[k] for k in ('encode_s', 'denoise_s', 'decode_s', 'unet_calls') if k in stats}
        self.last_stats['per_image'] = [{'prompt': p} for p in prompts]
        if stats.get('vae_fp32_fallback'):
            self.last_stats['notes'] = ['VAE recomputed in fp32 (non-finite in low precision)']
        return sr
