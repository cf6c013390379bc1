"""``imports:``: user modules imported before anything is built, so they can register models,
datasets and archs of their own without editing dalpsr (tests/toy_plugin.py is an example)::

    imports: [my_package.my_models, path/to/extra.py]

Module names are imported with :func:`importlib.import_module` (the working directory is on
the path); ``.py`` paths are loaded as ``dalpsr_plugin_<stem>`` (once per process).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict

from dalpsr.utils.options import OptionError


def import_plugins(opt: Dict[str, Any]) -> None:
    """Import ``opt['imports']`` (a name/path or a list of them); a module that cannot be
    imported raises :class:`OptionError` naming it and the options file."""
    mods = opt.get('imports') or []
    if isinstance(mods, str):
        mods = [mods]
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    for m in mods:
        try:
            if str(m).endswith('.py'):
                _import_file(str(m))
            else:
                importlib.import_module(m)
        except ImportError as err:
            raise OptionError(f"imports in {opt.get('_source', 'the options')}: cannot import '{m}': {err}") from None


def _import_file(path: str) -> None:
    path = os.path.abspath(path)
    name = 'dalpsr_plugin_' + re.sub(r'\W', '_', Path(path).stem)
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or not os.path.isfile(path):
        raise ImportError(f'no file {path}')
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
