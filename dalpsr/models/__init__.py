"""models: importing this package registers every model in ``MODEL_REGISTRY``.

Modules are listed explicitly (no file-system scanning); add new ones here.
"""
import importlib

from dalpsr.utils.registry import MODEL_REGISTRY

_MODULES = ['irpad_model', 'caption_align_model', 'dalpsr_model', 'sspir_model', 'deedsr_moco_model', 'deedsr_supervised_model', 'deedsr_model', 'srclip_model', 'realdat_model']

for _m in _MODULES:
    importlib.import_module(f'{__name__}.{_m}')


def build_model(opt, accelerator=None):
    """Build the model named by ``opt['model']['type']`` (see models/base_model.py)."""
    from dalpsr.utils.options import OptionError, get_opt
    mtype = get_opt(opt, 'model.type')
    try:
        cls = MODEL_REGISTRY.get(mtype)
    except KeyError as err:
        raise OptionError(f"model.type in {opt.get('_source', 'the options')}: {err.args[0]}") from None
    return cls(opt, accelerator)
