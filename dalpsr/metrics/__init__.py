"""metrics: importing this package registers every metric in ``METRIC_REGISTRY``.

Modules are listed explicitly (no file-system scanning); add new ones here.
"""
import importlib

from dalpsr.utils.registry import METRIC_REGISTRY

_MODULES = ['backends']

for _m in _MODULES:
    importlib.import_module(f'{__name__}.{_m}')
