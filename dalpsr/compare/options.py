"""Options of a comparison (``scripts/compare.py -opt options/compare/<x>.yml``): defaults and checks.

Every key is documented in options/reference/compare.yml. A comparison lists **methods** (each a
test options file of ``dalpsr/test.py`` with ``--set``-style overrides) and **sets** (LR folders,
optional GT, the protocol that made them, the published datasets to show beside them), one
**metrics** block for every method (the metric code of ``scripts/iqa.py``), the **published**
numbers file and the **figure**.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List

from dalpsr.utils.experiment import merge_defaults
from dalpsr.utils.options import OptionError, apply_overrides, check_keys, load_yaml

TOP_KEYS = ('name', 'path', 'device', 'progress', 'metrics', 'published', 'sets', 'methods', 'figure')
DEFAULTS: Dict[str, Any] = {
    'path': {'results_root': 'results/compare'},
    'device': None,
    'progress': False,
    'metrics': {'names': ['psnr', 'ssim'], 'crop_border': 4, 'device': 'cpu', 'weights_dir': None, 'options': None,
                'batch_size': 8, 'seed': 0, 'strip_suffixes': None},
    'published': 'options/compare/published.yml',
    'figure': {'set': None, 'images': None, 'crop': 128, 'at': None, 'max_images': 2},
}
SET_DEFAULTS: Dict[str, Any] = {'name': None, 'dataroot_lq': None, 'dataroot_gt': None, 'protocol': 'custom',
                                'published_as': [], 'caption_file': None, 'restoration_file': None}
METHOD_DEFAULTS: Dict[str, Any] = {'options': None, 'set': [], 'label': None, 'stand_in': False, 'published': None}


def _name(key: str, where: str) -> str:
    key = str(key)
    if not key or '/' in key or key in ('.', '..') or key.startswith('.'):
        raise OptionError(f'{where}: {key!r} is not usable as a folder name')
    return key


def load_compare_options(path: str, overrides: List[str] = ()) -> Dict[str, Any]:
    """Load ``path`` with ``--set`` overrides; returns the resolved options (defaults filled,
    every key checked; one-line :class:`OptionError` naming the key and the file)."""
    opt = load_yaml(path)
    apply_overrides(opt, list(overrides), source=path, top_keys=TOP_KEYS)
    return resolve_compare_options(opt, path)


def resolve_compare_options(opt: Dict[str, Any], src: str = 'the compare options') -> Dict[str, Any]:
    """Defaults and checks of a compare options dict (see the module doc)."""
    if not isinstance(opt, dict):
        raise OptionError(f'{src}: the options must be a mapping')
    check_keys(opt, TOP_KEYS, f'top level of {src} (compare.py)')
    if not opt.get('name'):
        raise OptionError(f"missing required key 'name' in {src}")
    res: Dict[str, Any] = {'name': _name(opt['name'], f'name in {src}'), '_source': str(src)}
    for key in ('path', 'metrics', 'figure'):
        res[key] = merge_defaults(DEFAULTS[key], opt.get(key), f'{key} block of {src}')
    for key in ('device', 'progress', 'published'):
        res[key] = copy.deepcopy(opt.get(key, DEFAULTS[key]))
    mt = res['metrics']
    if isinstance(mt['names'], str):
        mt['names'] = mt['names'].replace(',', ' ').split()
    if not mt['names']:
        raise OptionError(f'metrics.names in {src} must list one or more metrics (docs/metrics.md)')
    if not isinstance(mt['crop_border'], int) or mt['crop_border'] < 0:
        raise OptionError(f"metrics.crop_border must be an integer >= 0 in {src}, got {mt['crop_border']!r}")
    res['sets'] = _blocks(opt.get('sets'), SET_DEFAULTS, 'sets', src)
    for key, s in res['sets'].items():
        if not s['dataroot_lq']:
            raise OptionError(f"missing required key 'dataroot_lq' in sets.{key} of {src}")
        s['name'] = _name(s['name'] or key, f'sets.{key}.name in {src}')
        if isinstance(s['published_as'], str):
            s['published_as'] = [s['published_as']]
        s['published_as'] = list(s['published_as'] or [])
        s['protocol'] = str(s['protocol'])
    res['methods'] = _blocks(opt.get('methods'), METHOD_DEFAULTS, 'methods', src)
    for key, m in res['methods'].items():
        _name(key, f'methods.{key} in {src}')
        if not m['options']:
            raise OptionError(f"missing required key 'options' (a test options file) in methods.{key} of {src}")
        if isinstance(m['set'], str):
            m['set'] = [m['set']]
        if not isinstance(m['set'], list) or not all(isinstance(s, str) and '=' in s for s in m['set']):
            raise OptionError(f'methods.{key}.set in {src} must be a list of key.sub=value overrides, got {m["set"]!r}')
        m['label'] = str(m['label'] or key)
        m['stand_in'] = bool(m['stand_in'])
    fig = res['figure']
    if fig['set'] is not None and fig['set'] not in res['sets']:
        raise OptionError(f"figure.set in {src} names no set of 'sets' ({', '.join(res['sets'])}): {fig['set']!r}")
    if not isinstance(fig['crop'], int) or fig['crop'] < 8:
        raise OptionError(f"figure.crop must be an integer >= 8 in {src}, got {fig['crop']!r}")
    return res


def _blocks(blocks: Any, defaults: Dict[str, Any], what: str, src: str) -> Dict[str, Dict[str, Any]]:
    if not isinstance(blocks, dict) or not blocks:
        raise OptionError(f"missing required block '{what}' in {src} (a mapping of one or more entries)")
    out = {}
    for key, block in blocks.items():
        out[str(key)] = merge_defaults(defaults, block, f'{what}.{key} in {src}')
    return out


def check_inputs(opt: Dict[str, Any]) -> None:
    """The files a comparison reads exist (before any folder is touched)."""
    src = opt['_source']
    for key, s in opt['sets'].items():
        for k in ('dataroot_lq', 'dataroot_gt'):
            if s[k] and not Path(s[k]).is_dir():
                raise FileNotFoundError(f'sets.{key}.{k} in {src}: folder not found: {s[k]}')
        for k in ('caption_file', 'restoration_file'):
            if s[k] and not Path(s[k]).is_file():
                raise FileNotFoundError(f'sets.{key}.{k} in {src}: file not found: {s[k]}')
    for key, m in opt['methods'].items():
        if not Path(m['options']).is_file():
            raise FileNotFoundError(f"methods.{key}.options in {src}: test options file not found: {m['options']}")
    if opt['published'] and not Path(opt['published']).is_file():
        raise FileNotFoundError(f"published in {src}: file not found: {opt['published']}")
