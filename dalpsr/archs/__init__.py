"""archs: importing this package registers every network in ``ARCH_REGISTRY``.

Modules are listed explicitly (no file-system scanning); add new ones here.
"""
import importlib

from dalpsr.utils.registry import ARCH_REGISTRY

_MODULES = ['irpad_arch', 'ram_arch', 'controlnet_arch', 'sd_components', 'sspir_arch', 'deedsr_learner_arch', 'deedsr_adapter_arch', 'dat_arch', 'realdat_arch', 'srclip_arch']

for _m in _MODULES:
    importlib.import_module(f'{__name__}.{_m}')


def build_network(cfg, where: str = '', **extra):
    """Build the registered network named by ``cfg['type']`` (other keys are kwargs)."""
    return ARCH_REGISTRY.build(cfg, where=where, **extra)
