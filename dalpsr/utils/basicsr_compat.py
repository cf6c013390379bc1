"""The one place where ``basicsr`` is imported.

basicsr 1.4.2 imports ``torchvision.transforms.functional_tensor``, which torchvision >= 0.17
removed, and its package ``__init__`` imports every submodule, so *any* ``import basicsr.x``
fails on current torchvision. :func:`import_basicsr` registers a small stand-in module under
that name (exposing ``rgb_to_grayscale``, the only function basicsr takes from it) before
importing basicsr. Always import basicsr helpers through this module::

    from dalpsr.utils.basicsr_compat import basicsr_degradations
    k = basicsr_degradations().random_mixed_kernels(...)

Importing basicsr costs a few seconds (it imports its archs/models too), so it is lazy.
"""
from __future__ import annotations

import importlib
import sys
import types
from functools import lru_cache

_SHIM_NAME = 'torchvision.transforms.functional_tensor'


def install_torchvision_shim() -> None:
    """Register ``torchvision.transforms.functional_tensor`` if torchvision lacks it."""
    if _SHIM_NAME in sys.modules:
        return
    try:
        importlib.import_module(_SHIM_NAME)
        return
    except ImportError:
        pass
    from torchvision.transforms import functional as F
    shim = types.ModuleType(_SHIM_NAME)
    shim.rgb_to_grayscale = F.rgb_to_grayscale
    shim.__doc__ = 'dalpsr shim: torchvision removed this module; basicsr 1.4.2 still imports it.'
    sys.modules[_SHIM_NAME] = shim


@lru_cache(maxsize=None)
def import_basicsr(submodule: str = ''):
    """Import ``basicsr`` (or ``basicsr.<submodule>``) with the torchvision shim in place."""
    install_torchvision_shim()
    name = 'basicsr' + (f'.{submodule}' if submodule else '')
    try:
        return importlib.import_module(name)
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"Could not import {name}: {err}. Install the pinned requirements "
                          "(see README: pip install --no-build-isolation -r requirements.txt).") from err


def basicsr_degradations():
    """``basicsr.data.degradations`` (random_mixed_kernels, circular_lowpass_kernel, noise...)."""
    return import_basicsr('data.degradations')


def basicsr_img_process():
    """``basicsr.utils.img_process_util`` (filter2D, USMSharp)."""
    return import_basicsr('utils.img_process_util')


def basicsr_diffjpeg():
    """``basicsr.utils.diffjpeg`` (DiffJPEG)."""
    return import_basicsr('utils.diffjpeg')


def basicsr_metrics():
    """``basicsr.metrics`` (calculate_psnr, calculate_ssim, calculate_niqe)."""
    return import_basicsr('metrics')
