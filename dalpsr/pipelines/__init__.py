"""Inference pipelines: the shared denoising loop, the DaLPSR sampler (C9), tiling and schedulers.

* :mod:`dalpsr.pipelines.loop` — :class:`DenoisingLoop` (start latent, scheduler by name, CFG,
  latent/VAE tiling, color fix) around a method's denoiser; :class:`SamplingSettings`.
* :mod:`dalpsr.pipelines.denoiser` — what a method supplies: :class:`Denoiser` and :class:`Conditions`.
* :mod:`dalpsr.pipelines.sampler` — DaLPSR's denoiser (ControlNet + UNet) and :class:`DaLPSRSampler`.

Heavy libraries (diffusers) are imported inside functions; ``import dalpsr.pipelines`` is cheap.
The tiny random stand-ins of test.py live in :mod:`dalpsr.inference.tiny`.
"""
from dalpsr.pipelines.denoiser import Conditions, Denoiser  # noqa: F401
from dalpsr.pipelines.loop import DenoisingLoop, LRLatents, SamplingSettings  # noqa: F401
from dalpsr.pipelines.sampler import (DEFAULT_ADDED_PROMPT, DEFAULT_NEGATIVE_PROMPT, DaLPSRDenoiser,  # noqa: F401
                                      DaLPSRSampler)
from dalpsr.pipelines.schedulers import build_scheduler  # noqa: F401
from dalpsr.pipelines.tiling import TileOptions  # noqa: F401
