"""Inference pipelines: the DaLPSR sampler (C9), tiling helpers and schedulers by name.

Heavy libraries (diffusers) are imported inside functions; ``import dalpsr.pipelines`` is cheap.
"""
from dalpsr.pipelines.sampler import (DEFAULT_ADDED_PROMPT, DEFAULT_NEGATIVE_PROMPT, DaLPSRSampler,  # noqa: F401
                                      TileOptions)
from dalpsr.pipelines.schedulers import build_scheduler  # noqa: F401
