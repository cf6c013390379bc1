"""Diffusers sampling schedulers by name, built from the SD model's scheduler config.

==============  =========================================  =====================================
name            diffusers class                            notes
==============  =========================================  =====================================
ddpm            ``DDPMScheduler``                          ancestral (stochastic); SeeSR default
ddim            ``DDIMScheduler``                          eta 0 (deterministic); DeeDSR default
dpmsolver++     ``DPMSolverMultistepScheduler``            ``algorithm_type='dpmsolver++'``, order 2
unipc           ``UniPCMultistepScheduler``                predictor-corrector, order 2
==============  =========================================  =====================================

Aliases: ``dpm++``, ``dpmsolver``, ``dpm-solver++``, ``uni_pc``. Any other name is tried as a
diffusers scheduler class name (e.g. ``EulerAncestralDiscreteScheduler``); it must be a
variance-preserving scheduler (``init_noise_sigma == 1``) because the LR-embedded start
noises the LR latent with ``sqrt(a_t) z + sqrt(1 - a_t) eps``.

The beta schedule, prediction type, ``steps_offset`` and timestep spacing come from the SD
model's ``scheduler_config`` (SD 2.1-base: scaled_linear 0.00085..0.012, epsilon); extra
``overrides`` win over both the config and the per-name defaults.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

SCHEDULERS: Dict[str, tuple] = {
    'ddpm': ('DDPMScheduler', {}),
    'ddim': ('DDIMScheduler', {}),
    'dpmsolver++': ('DPMSolverMultistepScheduler', {'algorithm_type': 'dpmsolver++', 'solver_order': 2}),
    'unipc': ('UniPCMultistepScheduler', {}),
}
ALIASES = {'dpm++': 'dpmsolver++', 'dpmsolver': 'dpmsolver++', 'dpm-solver++': 'dpmsolver++',
           'dpm_solver++': 'dpmsolver++', 'uni_pc': 'unipc', 'uni-pc': 'unipc'}

#: Keys that a training-side scheduler config may carry but a sampler class does not take.
_DROP = ('_class_name', '_diffusers_version', 'skip_prk_steps')


def canonical_name(name: str) -> str:
    key = str(name).strip().lower()
    return ALIASES.get(key, key)


def build_scheduler(name: str, config: Optional[Dict[str, Any]] = None,
                    overrides: Optional[Dict[str, Any]] = None):
    """A fresh diffusers scheduler ``name`` configured from ``config`` (a scheduler_config dict,
    e.g. ``SDComponents.scheduler_config`` or ``noise_scheduler.config``) plus ``overrides``.

    Raises ``ValueError`` with the list of known names for an unknown name.
    """
    import diffusers
    cfg = {k: v for k, v in dict(config or {}).items() if k not in _DROP}
    key = canonical_name(name)
    if key in SCHEDULERS:
        cls_name, defaults = SCHEDULERS[key]
    elif hasattr(diffusers, str(name)) and str(name).endswith('Scheduler'):
        cls_name, defaults = str(name), {}
    else:
        raise ValueError(f"unknown scheduler '{name}': use one of {', '.join(SCHEDULERS)} "
                         "or a diffusers scheduler class name")
    cls = getattr(diffusers, cls_name)
    cfg.update(defaults)
    cfg.update(overrides or {})
    sched = cls.from_config(cfg)
    if float(getattr(sched, 'init_noise_sigma', 1.0)) != 1.0:
        raise ValueError(f"scheduler '{name}' is not variance-preserving (init_noise_sigma="
                         f"{sched.init_noise_sigma}); use ddpm, ddim, dpmsolver++ or unipc")
    return sched


def alphas_cumprod(scheduler):
    """The scheduler's cumulative alpha products (float64 CPU tensor of num_train_timesteps)."""
    import torch
    ac = getattr(scheduler, 'alphas_cumprod', None)
    if ac is None:
        raise ValueError(f'{type(scheduler).__name__} has no alphas_cumprod')
    return torch.as_tensor(ac, dtype=torch.float64).cpu()
