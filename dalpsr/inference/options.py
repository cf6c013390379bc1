"""Test options: defaults, checks, the method, the fingerprint of a result folder, per-image seeds.

Every key is documented once in options/reference/test.yml. The method (``method: {type: ...}``)
is a restorer of ``RESTORER_REGISTRY`` (default ``DaLPSRDiffusion``); the blocks it reads
(``Restorer.option_blocks``, e.g. ``model`` and ``sampler``) are resolved here with their
defaults and handed to its constructor. A block that the chosen method does not read is refused
(it would be silently ignored otherwise).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, Optional

from dalpsr.inference.prompt_spec import check_irpad_matches_model
from dalpsr.utils.experiment import merge_defaults
from dalpsr.utils.options import OptionError, check_keys

#: Defaults of every block test.py reads (each key is documented in options/reference/test.yml).
TEST_DEFAULTS: Dict[str, Any] = {
    'seed': 0,
    'path': {'results_root': 'results'},
    'method': {'type': 'DaLPSRDiffusion'},
    'model': {'path': None, 'sd': None, 'device': 'auto', 'dtype': 'auto', 'vae_dtype': None,
              'vae_fp32_fallback': True, 'channels_last': False, 'compile': False, 'max_chunks': None},
    'sampler': {'start': 'lr', 'start_step': 999, 'start_noise': 'first_step', 'scheduler': 'ddpm', 'num_steps': 50, 'guidance_scale': 5.5,
                'eta': 0.0, 'negative_prompt': 'dotted, noise, blur, lowres, smooth',
                'added_prompt': 'clean, high-resolution, 8k', 'conditioning_scale': 1.0,
                'noise_guidance_steps': 1, 'scheduler_overrides': None, 'color_fix': 'adain', 'prompt': None,
                'tile': None, 'batch_size': 1},
    'irpad': {'source': 'irpad', 'path': 'pretrained_models/irpad', 'device': None},
    'captioner': {'mode': 'none', 'tagger': 'ram', 'tagger_opts': None, 'llava_opts': None,
                  'instruction': None, 'instruction_no_tags': None, 'batch_size': 4, 'device': None,
                  'dtype': 'auto', 'free_after_use': True},
    'metrics': {'names': ['psnr', 'ssim'], 'crop_border': 4, 'device': 'auto', 'weights_dir': None,
                'options': None},
    'test': {'min_size': 16, 'max_lr_pixels': 2048 * 2048, 'huge': 'skip', 'recursive': False, 'ext': 'png',
             'progress_bar': True, 'gt_modcrop': True, 'batch_size': None},
}
DATASET_KEYS = ('name', 'dataroot_lq', 'dataroot_gt', 'caption_file', 'restoration_file')
TOP_KEYS = ('name', 'seed', 'path', 'method', 'model', 'sampler', 'irpad', 'captioner', 'metrics', 'test',
            'datasets', 'imports', 'manual_seed', 'is_train')
#: Blocks a method may read (``Restorer.option_blocks``); the others are shared by every method.
METHOD_BLOCKS = ('model', 'sampler')
IRPAD_SOURCES = ('irpad', 'file', 'none')
#: Keys left out of the options fingerprint (they do not change the pixels of an output).
NON_OUTPUT_KEYS = {'model': ('device', 'compile'), 'sampler': ('batch_size',), 'irpad': ('device',),
                   'captioner': ('device', 'batch_size', 'free_after_use'), 'test': ('progress_bar', 'batch_size')}
IMAGE_EXTS = ('png', 'jpg', 'jpeg', 'bmp', 'tif', 'tiff', 'webp')


def method_class(opt: Dict[str, Any], src: str):
    """The restorer class named by ``opt['method']['type']`` (after ``import dalpsr.restorers``)."""
    import dalpsr.restorers  # noqa: F401 - registers the restorers
    from dalpsr.utils.registry import RESTORER_REGISTRY
    block = opt.get('method') or TEST_DEFAULTS['method']
    if not isinstance(block, dict) or not block.get('type'):
        raise OptionError(f"method in {src} needs a 'type:' key naming a registered restorer "
                          f"(known: {', '.join(sorted(RESTORER_REGISTRY.keys()))})")
    try:
        return RESTORER_REGISTRY.get(block['type'])
    except KeyError as err:
        raise OptionError(f'method in {src}: {err.args[0]}') from None


def resolve_test_opt(opt: Dict[str, Any]) -> Dict[str, Any]:
    """Fill defaults, check every key and value; returns a new dict (``opt`` is not changed)."""
    src = opt.get('_source', 'the options')
    check_keys(opt, TOP_KEYS, f'top level of {src} (test.py)')
    if not opt.get('name'):
        raise OptionError(f"missing required key 'name' in {src}")
    res: Dict[str, Any] = {'name': str(opt['name']), '_source': src, 'imports': list(opt.get('imports') or [])}
    seed = opt.get('seed', 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise OptionError(f"'seed' must be an integer in {src}, got {seed!r}")
    res['seed'] = seed
    if res['imports']:  # user plugins may register their own restorers
        from dalpsr.utils.plugins import import_plugins
        import_plugins(res)
    cls = method_class(opt, src)
    res['method'] = dict(opt.get('method') or TEST_DEFAULTS['method'])
    for block in ('path', 'model', 'sampler', 'irpad', 'captioner', 'metrics', 'test'):
        res[block] = merge_defaults(TEST_DEFAULTS[block], opt.get(block), f'{block} block of {src}')
    reads = tuple(getattr(cls, 'option_blocks', ()))
    for block in METHOD_BLOCKS:
        given = {k for k in (opt.get(block) or {}) if not (block == 'model' and k == 'device')}
        if block not in reads and given:
            raise OptionError(f"method {res['method']['type']} does not read the {block} block "
                              f"({', '.join(sorted(given))}) in {src}; remove it")
    if 'sampler' in reads:
        _check_sampler(res['sampler'], src)
    cls.check_options(res, src)
    _check_shared(res, src)
    check_irpad_matches_model(res, src)  # the IRPAD must write p_r as the model learned it
    res['datasets'] = _datasets(opt.get('datasets'), src)
    return res


def _check_sampler(s: Dict[str, Any], src: str) -> None:
    """The shared denoising loop's settings (dalpsr.pipelines.loop.SamplingSettings)."""
    from dalpsr.pipelines.loop import START_MODES, START_NOISE, SamplingSettings
    from dalpsr.pipelines.tiling import TileOptions
    from dalpsr.utils.color_fix import COLOR_FIX_MODES
    if s['start'] not in START_MODES:
        raise OptionError(f"sampler.start must be one of {', '.join(START_MODES)} in {src}, got {s['start']!r}")
    if s['start_noise'] not in START_NOISE:
        raise OptionError(f"sampler.start_noise must be one of {', '.join(START_NOISE)} in {src}, "
                          f"got {s['start_noise']!r}")
    if s['color_fix'] not in COLOR_FIX_MODES:
        raise OptionError(f"sampler.color_fix must be one of {', '.join(COLOR_FIX_MODES)} in {src}, "
                          f"got {s['color_fix']!r}")
    for key, lo in (('num_steps', 1), ('batch_size', 1), ('start_step', 0), ('noise_guidance_steps', 0)):
        if not isinstance(s[key], int) or isinstance(s[key], bool) or s[key] < lo:
            raise OptionError(f'sampler.{key} must be an integer >= {lo} in {src}, got {s[key]!r}')
    for key in ('guidance_scale', 'conditioning_scale', 'eta'):
        if not isinstance(s[key], (int, float)) or isinstance(s[key], bool):
            raise OptionError(f'sampler.{key} must be a number in {src}, got {s[key]!r}')
    if s['eta'] < 0:
        raise OptionError(f"sampler.eta must be >= 0 in {src}, got {s['eta']!r}")
    try:
        TileOptions.from_opt(s['tile'])
    except ValueError as err:
        raise OptionError(f'sampler.tile in {src}: {err}') from None
    try:
        SamplingSettings.check_scheduler_name(s['scheduler'])
    except ValueError as err:
        raise OptionError(f'sampler.scheduler in {src}: {err}') from None


def _check_shared(res: Dict[str, Any], src: str) -> None:
    ir, cap, te = res['irpad'], res['captioner'], res['test']
    if ir['source'] not in IRPAD_SOURCES:
        raise OptionError(f"irpad.source must be one of {', '.join(IRPAD_SOURCES)} in {src}, got {ir['source']!r}")
    if ir['source'] == 'irpad' and not ir['path']:
        raise OptionError(f"irpad.source: irpad needs irpad.path (an IRPAD export folder) in {src}")
    from dalpsr.captioning.pipeline import CAPTIONER_MODES
    if cap['mode'] not in CAPTIONER_MODES:
        raise OptionError(f"captioner.mode must be one of {', '.join(CAPTIONER_MODES)} in {src}, "
                          f"got {cap['mode']!r}")
    if te['huge'] not in ('skip', 'resize'):
        raise OptionError(f"test.huge must be 'skip' or 'resize' in {src}, got {te['huge']!r}")
    for key in ('min_size', 'max_lr_pixels'):
        if not isinstance(te[key], int) or te[key] < 1:
            raise OptionError(f'test.{key} must be an integer >= 1 in {src}, got {te[key]!r}')
    if te['batch_size'] is not None and (not isinstance(te['batch_size'], int) or te['batch_size'] < 1):
        raise OptionError(f"test.batch_size must be null or an integer >= 1 in {src}, got {te['batch_size']!r}")
    te['ext'] = str(te['ext']).lower().lstrip('.')
    if te['ext'] not in IMAGE_EXTS:
        raise OptionError(f"test.ext must be an image format (png, jpg, bmp, tif, webp) in {src}, got {te['ext']!r}")
    mt = res['metrics']
    if isinstance(mt['names'], str):
        mt['names'] = [mt['names']]
    mt['names'] = list(mt['names'] or [])


def _datasets(sets: Any, src: str) -> Dict[str, Dict[str, Any]]:
    if not isinstance(sets, dict) or not sets:
        raise OptionError(f"missing required block 'datasets' in {src} (one or more test sets: "
                          '{set_name: {dataroot_lq: folder, dataroot_gt: optional}})')
    out = {}
    for key, block in sets.items():
        where = f'datasets.{key} in {src}'
        if not isinstance(block, dict):
            raise OptionError(f'{where} must be a mapping')
        check_keys(block, DATASET_KEYS, where)
        if not block.get('dataroot_lq'):
            raise OptionError(f"missing required key 'dataroot_lq' in {where}")
        d = {k: block.get(k) for k in DATASET_KEYS}
        d['name'] = str(d['name'] or key)
        if not d['name'] or '/' in d['name'] or d['name'] in ('.', '..'):
            raise OptionError(f'{where}: name {d["name"]!r} is not a folder name')
        out[key] = d
    names = [d['name'] for d in out.values()]
    if len(set(names)) != len(names):
        raise OptionError(f'two test sets share an output name in {src}: {names}')
    return out


def batch_size(opt: Dict[str, Any]) -> int:
    """Images per restore call: ``test.batch_size``, else ``sampler.batch_size`` (diffusion methods)."""
    return int(opt['test']['batch_size'] or opt['sampler']['batch_size'])


def fingerprint_payload(opt: Dict[str, Any], description: Dict[str, Any], reads=('model', 'sampler')
                        ) -> Dict[str, Any]:
    """The options that change output pixels: the seed, the method (its block and its
    ``describe()``), the blocks it reads and the shared prompt/input blocks."""
    out: Dict[str, Any] = {'seed': opt['seed'], 'method': {'options': opt['method'], 'describe': description}}
    for block in tuple(reads) + ('irpad', 'captioner', 'test'):
        out[block] = {k: v for k, v in opt[block].items() if k not in NON_OUTPUT_KEYS.get(block, ())}
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def image_seed(seed: int, key: str) -> int:
    """Seed of one image: depends only on the run ``seed`` and the image key (31 bits)."""
    h = hashlib.sha256(f'{int(seed)}/{key}'.encode('utf-8')).digest()
    return int.from_bytes(h[:4], 'big') & 0x7FFFFFFF


def device(name: Optional[str]) -> str:
    """A device name (``auto`` -> cuda when available); a bad one is an OptionError."""
    from dalpsr.utils.misc import resolve_device
    try:
        return resolve_device('auto' if name is None else name)
    except ValueError as err:
        raise OptionError(str(err)) from None
