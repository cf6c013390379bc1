"""DeeDSR's restorer (``method: {type: DeeDSR}``) on the shared denoising loop.

The loop (:class:`dalpsr.pipelines.loop.DenoisingLoop`) upsamples the LR (bicubic x4), pads it
to a multiple of 64 (``pad_multiple``), VAE-encodes it into ``z_lr``, runs the scheduler and
decodes. DeeDSR supplies :class:`DeeDSRDenoiser`: per call, the adapter turns ``z_lr`` (cropped
to the latent tile), the timestep and the degradation representation ``d`` (the frozen learner on
the whole raw LR, computed once per batch) into SPADE maps and 64 global tokens, and the UNet
predicts eps. No prompt, no text encoder, no classifier-free guidance.

The paper's inference (options/test/test_deedsr_sd21.yml)::

    sampler: {scheduler: ddim, num_steps: 50, eta: 1.0, start: noise_guidance, noise_guidance_steps: 1,
              guidance_scale: 1.0, color_fix: none, tile: {latent_size: 128, latent_overlap: 28}}

``start: noise_guidance`` starts from noise and replaces the first step's model output by
``(x_t - sqrt(a_t) z_lr) / sqrt(1 - a_t)``. Large inputs: the code cuts the upsampled image into
1024 px tiles with stride 800 and AdaIN-matches each tile to its LR; here the loop's latent tiles of
128 latent px (= 1024 px) overlapping by 28 (stride 100 = 800 px) are Gaussian-blended instead,
and ``color_fix: adain`` (on the whole image) is the option that corresponds to the per-tile AdaIN.

Options: ``model`` block: ``path`` (a DeeDSR export: deedsr.json, adapter.pth,
unet_trained.pth, degradation_learner.*), ``sd`` (overrides the export's SD source), ``dtype``
(auto | fp32 | fp16 | bf16), ``vae_dtype``, ``vae_fp32_fallback``; ``sampler`` block: the loop's
settings (:class:`~dalpsr.pipelines.loop.SamplingSettings`); DaLPSR's prompt keys are ignored.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Sequence

import torch

from dalpsr.pipelines.denoiser import Conditions, Denoiser
from dalpsr.restorers.base import Restorer
from dalpsr.utils.options import OptionError
from dalpsr.utils.registry import RESTORER_REGISTRY

logger = logging.getLogger('dalpsr')

#: sampler keys that are the loop's settings (other keys of a shared sampler block are ignored).
LOOP_KEYS = ('num_steps', 'scheduler', 'eta', 'start', 'start_step', 'guidance_scale', 'noise_guidance_steps',
             'scheduler_overrides', 'color_fix', 'tile')
#: DeeDSR's inference (the authors' code): DDIM 50 steps, eta 1, noise guidance at the first step.
SAMPLER_DEFAULTS: Dict[str, Any] = {'scheduler': 'ddim', 'num_steps': 50, 'eta': 1.0, 'start': 'noise_guidance',
                                    'noise_guidance_steps': 1, 'guidance_scale': 1.0, 'color_fix': 'none',
                                    'tile': {'latent_size': 128, 'latent_overlap': 28}}
MODEL_DEFAULTS: Dict[str, Any] = {'path': None, 'sd': None, 'dtype': 'auto', 'vae_dtype': None,
                                  'vae_fp32_fallback': True}


class DeeDSRDenoiser(Denoiser):
    """Adapter + SPADE/attn2 UNet as one eps prediction per loop call.

    Conditions: ``spatial['z_lr']`` ``[B, 4, h, w]`` (cropped per tile by the loop) and
    ``shared['d']`` ``[B, d_dim]``."""

    prediction_type = 'epsilon'

    def __init__(self, nets, dtype: torch.dtype = torch.float32):
        self.nets = nets
        self.dtype = dtype

    @torch.no_grad()
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, conditions: Conditions) -> torch.Tensor:
        z_lr, d = conditions['z_lr'], conditions['d']
        if d.shape[0] != x_t.shape[0]:
            raise ValueError(f"DeeDSR has no classifier-free guidance: got {x_t.shape[0]} rows for {d.shape[0]} "
                             f"images (set sampler.guidance_scale: 1)")
        return self.nets.predict(x_t.to(self.dtype), t, z_lr.to(self.dtype), d.to(self.dtype))

    def modules(self):
        return [self.nets.unet, self.nets.adapter]


@RESTORER_REGISTRY.register()
class DeeDSR(Restorer):
    """DeeDSR as a test.py restorer (module doc). Networks load on the first ``restore``."""

    option_blocks = ('model', 'sampler')

    @classmethod
    def check_options(cls, opt: Dict[str, Any], src: str) -> None:
        m = opt.get('model') or {}
        if not m.get('path'):
            raise OptionError(f"missing required key 'model.path' in {src} (a DeeDSR export folder)")
        g = (opt.get('sampler') or {}).get('guidance_scale', 1.0)
        if g is not None and float(g) > 1.0:
            raise OptionError(f'sampler.guidance_scale in {src}: DeeDSR has no classifier-free guidance (no prompt); '
                              f'set it to 1, got {g}')

    def __init__(self, model: Optional[Dict[str, Any]] = None, sampler: Optional[Dict[str, Any]] = None,
                 device: str = 'cpu', components=None) -> None:
        """``components``: ``(unet, vae, scheduler)`` already built (benchmarks); else loaded
        from ``model.sd`` or the export's SD source."""
        super().__init__()
        import json
        from pathlib import Path

        from dalpsr.pipelines.loop import SamplingSettings
        m = dict(MODEL_DEFAULTS)
        m.update({k: v for k, v in (model or {}).items() if k in MODEL_DEFAULTS})
        s = dict(SAMPLER_DEFAULTS)
        s.update({k: v for k, v in (sampler or {}).items() if k in LOOP_KEYS and v is not None})
        self.check_options({'model': m, 'sampler': s}, 'the DeeDSR options')
        p = Path(str(m['path']))
        if (p / 'export' / 'deedsr.json').is_file():
            p = p / 'export'
        if not (p / 'deedsr.json').is_file():
            raise FileNotFoundError(f'missing {p / "deedsr.json"} (model.path must be a DeeDSR export folder)')
        self.meta = json.loads((p / 'deedsr.json').read_text())
        self.path, self.model_opt, self.device = p, m, str(device)
        self.scale = int(self.meta.get('scale', 4))
        self.settings = SamplingSettings.from_opt({k: s[k] for k in LOOP_KEYS if k in s})
        self._components = components
        self._loop = None
        self._denoiser = None

    def describe(self) -> Dict[str, Any]:
        return {'type': type(self).__name__, 'scale': self.scale, 'deedsr_json': self.meta,
                'path': str(self.path)}

    def _load(self):
        from dalpsr.models.deedsr_model import load_deedsr
        from dalpsr.pipelines.loop import DenoisingLoop, parse_dtype
        dt = self.model_opt['dtype']
        dtype = parse_dtype(('fp16' if self.device.startswith('cuda') else 'fp32') if dt in (None, 'auto') else dt)
        nets = load_deedsr(self.path, sd=self.model_opt['sd'], device=self.device, components=self._components)
        for mod in (nets.unet, nets.adapter):
            mod.to(dtype=dtype)
        self._denoiser = DeeDSRDenoiser(nets, dtype)
        self._loop = DenoisingLoop(nets.vae, nets.scheduler_config, scale=self.scale, device=self.device,
                                   vae_dtype=self.model_opt['vae_dtype'] or dtype,
                                   vae_fp32_fallback=bool(self.model_opt['vae_fp32_fallback']), pad_multiple=64,
                                   logger=logger)
        logger.info(f'DeeDSR {self.path}: SD {self.meta.get("sd", {}).get("pretrained")}, device {self.device}, {dtype}')

    @torch.no_grad()
    def restore(self, lq: torch.Tensor, *, seeds: Sequence[int], captions: Sequence[str] = (),
                restoration: Sequence[str] = ()) -> torch.Tensor:
        if self._loop is None:
            self._load()
        nets, loop = self._denoiser.nets, self._loop

        def make_conditions(lr):
            learner = nets.learner
            d = learner(lr.lq.to(loop.device, dtype=next(learner.parameters()).dtype)).float()
            return Conditions(spatial={'z_lr': lr.z_lr}, shared={'d': d})
        out = loop(lq, self._denoiser, make_conditions, seeds, self.settings)
        self.last_stats = dict(loop.last_stats)
        return out
