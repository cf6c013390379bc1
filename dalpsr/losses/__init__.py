"""losses: importing this package registers every loss in ``LOSS_REGISTRY``.

Modules are listed explicitly (no file-system scanning); add new ones here.
"""
import importlib

from dalpsr.utils.registry import LOSS_REGISTRY

_MODULES = ['losses', 'siglip_loss']

for _m in _MODULES:
    importlib.import_module(f'{__name__}.{_m}')


def build_loss(cfg, where: str = '', **extra):
    """Build the registered loss named by ``cfg['type']`` (other keys are kwargs)."""
    return LOSS_REGISTRY.build(cfg, where=where, **extra)
