"""DaLPSR's restorer for test.py (``method: {type: DaLPSRDiffusion}``, the default method).

Reads the ``model`` block (the DaLPSR export folder ``controlnet/`` + ``dalpsr.json`` and how it
runs) and the ``sampler`` block (the shared denoising loop's settings plus DaLPSR's prompts).
Per batch it composes each image's prompt as at training (``dalpsr.json``'s prompt options,
``sampler.prompt`` and ``sampler.added_prompt`` over them) from the caption p_s and the
restoration prompt p_r that test.py prepared, and samples with
:class:`dalpsr.pipelines.sampler.DaLPSRSampler`. The networks are loaded on the first ``restore``
call (a rerun with every image done loads nothing).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Sequence

import torch

from dalpsr.restorers.base import Restorer
from dalpsr.utils.options import OptionError
from dalpsr.utils.registry import RESTORER_REGISTRY

logger = logging.getLogger('dalpsr')

#: sampler-block keys that are the loop's SamplingSettings (the rest are DaLPSR's prompt keys).
LOOP_KEYS = ('num_steps', 'scheduler', 'eta', 'start', 'start_step', 'start_noise', 'guidance_scale',
             'noise_guidance_steps',
             'scheduler_overrides', 'color_fix', 'tile')


def model_dtype(name: Any, device: str) -> str:
    """``auto`` -> fp16 on CUDA, fp32 elsewhere; other names as given."""
    if name in (None, 'auto'):
        return 'fp16' if device.startswith('cuda') else 'fp32'
    return str(name)


def build_sampler(model: Dict[str, Any], meta: Dict[str, Any], device: str):
    """SD parts (``model.sd`` over the source in dalpsr.json; trained UNet/text encoder of the
    export when listed in ``trained_parts``) + the exported ControlNet -> DaLPSRSampler."""
    from dalpsr.archs.controlnet_arch import get_controlnet_class
    from dalpsr.archs.sd_components import load_sd_components
    from dalpsr.pipelines.sampler import DaLPSRSampler, parse_dtype
    model_dir = Path(model['path'])
    dtype = model_dtype(model['dtype'], device)
    sd_cfg = dict(meta.get('sd') or {})
    sd_cfg.update(model['sd'] or {})
    if not sd_cfg.get('pretrained'):
        raise OptionError(f"{model_dir}/dalpsr.json names no SD source; set model.sd.pretrained")
    for part, sub in (meta.get('trained_parts') or {}).items():
        if part in ('unet', 'text_encoder') and part not in (model['sd'] or {}):
            sd_cfg[part] = str(model_dir / sub)
    sd_cfg.setdefault('dtype', dtype)
    comps = load_sd_components(sd_cfg)
    controlnet = get_controlnet_class().from_pretrained(str(model_dir / 'controlnet'), torch_dtype=parse_dtype(dtype))
    max_chunks = model['max_chunks'] or int((meta.get('text') or {}).get('max_chunks', 3))
    sampler = DaLPSRSampler(comps, controlnet, condition_mode=meta.get('condition_mode'),
                            scale=int(meta.get('scale', 4)), device=device, dtype=dtype, vae_dtype=model['vae_dtype'],
                            vae_fp32_fallback=bool(model['vae_fp32_fallback']),
                            channels_last=bool(model['channels_last']), compile=model['compile'],
                            max_chunks=max_chunks, logger=logger)
    logger.info(f'sampler: SD {sd_cfg.get("pretrained")} + ControlNet {model_dir} ({sampler.condition_mode} '
                f'condition), device {device}, {dtype}')
    return sampler


@RESTORER_REGISTRY.register()
class DaLPSRDiffusion(Restorer):
    """The DaLPSR sampler as a test.py restorer (module doc)."""

    option_blocks = ('model', 'sampler')

    @classmethod
    def check_options(cls, opt: Dict[str, Any], src: str) -> None:
        m = opt['model']
        if not m['path']:
            raise OptionError(f"missing required key 'model.path' in {src} (a DaLPSR export folder: controlnet/ + "
                              'dalpsr.json)')
        modes = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')
        if not isinstance(m['compile'], bool) and m['compile'] not in modes:
            raise OptionError(f"model.compile must be true, false or one of {', '.join(modes)} in {src}, "
                              f"got {m['compile']!r}")

    def __init__(self, model: Dict[str, Any], sampler: Dict[str, Any], device: str = 'cpu') -> None:
        super().__init__()
        from dalpsr.data.prompt_compose import PromptComposer
        from dalpsr.pipelines.loop import SamplingSettings
        from dalpsr.pipelines.sampler import load_model_meta
        self.model_opt, self.sampler_opt, self.device = dict(model), dict(sampler), str(device)
        self.meta = load_model_meta(str(model['path']))
        self.scale = int(self.meta.get('scale', 4))
        pcfg = dict(self.meta.get('prompt') or {})
        pcfg.update(sampler.get('prompt') or {})
        if sampler.get('added_prompt') is not None:
            pcfg['added_prompt'] = sampler['added_prompt']
        self.composer = PromptComposer.from_opt(pcfg)
        self.needs = tuple(n for n, use in (('caption', self.composer.use_caption),
                                            ('restoration', self.composer.use_restoration)) if use)
        self.settings = SamplingSettings.from_opt({k: sampler[k] for k in LOOP_KEYS if k in sampler})
        self._sampler = None
        note = self.meta.get('note')
        if note:
            logger.info(f'DaLPSR model {model["path"]} [{note}]')

    def describe(self) -> Dict[str, Any]:
        return {'type': type(self).__name__, 'scale': self.scale, 'dalpsr_json': self.meta}

    def sampler(self):
        """The DaLPSRSampler (loaded on first use)."""
        if self._sampler is None:
            self._sampler = build_sampler(self.model_opt, self.meta, self.device)
        return self._sampler

    @torch.no_grad()
    def restore(self, lq: torch.Tensor, *, seeds: Sequence[int], captions: Sequence[str] = (),
                restoration: Sequence[str] = ()) -> torch.Tensor:
        b = lq.shape[0]
        captions = list(captions) or [''] * b
        restoration = list(restoration) or [''] * b
        prompts = [self.composer.compose(c, r) for c, r in zip(captions, restoration)]
        s = self.sampler_opt
        sampler = self.sampler()
        try:
            sr = sampler(lq, prompts, negative_prompt=s['negative_prompt'] or '', seed=list(seeds),
                         conditioning_scale=float(s['conditioning_scale']), **self._loop_kwargs())
        finally:
            stats = dict(sampler.last_stats)
        self.last_stats = {k: stats[k] for k in ('encode_s', 'denoise_s', 'decode_s', 'unet_calls') if k in stats}
        self.last_stats['per_image'] = [{'prompt': p} for p in prompts]
        if stats.get('vae_fp32_fallback'):
            self.last_stats['notes'] = ['VAE recomputed in fp32 (non-finite in low precision)']
        return sr

    def _loop_kwargs(self) -> Dict[str, Any]:
        st = self.settings
        return dict(num_steps=st.num_steps, scheduler=st.scheduler, eta=st.eta, start=st.start,
                    start_step=st.start_step, start_noise=st.start_noise, guidance_scale=float(st.guidance_scale),
                    noise_guidance_steps=st.noise_guidance_steps, scheduler_overrides=st.scheduler_overrides,
                    color_fix=st.color_fix, tile=st.tile)
