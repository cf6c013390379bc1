"""Import a file of scripts/ as a module (scripts are not a package), for tests that call main()."""
import importlib.util
import os

_SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts')


def load_script(name: str):
    """``load_script('eval_irpad')`` -> the module of ``scripts/eval_irpad.py`` (freshly executed)."""
    spec = importlib.util.spec_from_file_location(f'script_{name}', os.path.join(_SCRIPTS, f'{name}.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
