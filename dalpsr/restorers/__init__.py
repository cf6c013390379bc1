"""restorers: importing this package registers every LR -> SR restorer in ``RESTORER_REGISTRY``.

A restorer is what ``dalpsr/test.py`` runs per batch of LR images (``method: {type: ...}`` in the
test options): the DaLPSR diffusion sampler, the other methods' samplers, feed-forward networks
and bicubic. The contract is :class:`dalpsr.restorers.base.Restorer`.

Modules are listed explicitly (no file-system scanning); add new ones here.
"""
import importlib

from dalpsr.utils.registry import RESTORER_REGISTRY

_MODULES = ['base', 'dalpsr_diffusion', 'sspir', 'deedsr', 'realdat']

for _m in _MODULES:
    importlib.import_module(f'{__name__}.{_m}')


def build_restorer(cfg, where: str = '', **extra):
    """Build the registered restorer named by ``cfg['type']`` (other keys are kwargs)."""
    return RESTORER_REGISTRY.build(cfg, where=where, **extra)
