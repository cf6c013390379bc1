"""data: importing this package registers every dataset in ``DATASET_REGISTRY``.

Modules are listed explicitly (no file-system scanning); add new ones here.
"""
import importlib

from dalpsr.utils.registry import DATASET_REGISTRY

_MODULES = ['degradations', 'prompt_labels', 'triplet_dataset', 'lr_cache', 'deedsr_dataset', 'deplsr_degradation', 'deplsr_datasets']

for _m in _MODULES:
    importlib.import_module(f'{__name__}.{_m}')


def build_dataset(cfg, where: str = '', **extra):
    """Build the registered dataset named by ``cfg['type']`` (other keys are kwargs)."""
    return DATASET_REGISTRY.build(cfg, where=where, **extra)
