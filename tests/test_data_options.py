"""options/reference/data.yml documents every data key once, with the code's defaults, and builds."""
import inspect
import math
import re

import pytest

from dalpsr.data import build_dataset
from dalpsr.data.degradations import RealESRGANDegradation
from dalpsr.data.lr_cache import CachedLRDataset, build_lr_cache
from dalpsr.data.prompt_labels import DEFAULT_TEMPLATES, PromptSpec
from dalpsr.data.triplet_dataset import TripletDataset, TripletFolderDataset
from dalpsr.utils.options import load_options

#: example values (paths) that are not code defaults
EXAMPLES = {'dataroot_gt', 'dataroot', 'cache_file', 'build', 'degradation', 'prompt', 'phase'}


def _defaults(fn):
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if n != 'self'}


def _same(a, b):
    if isinstance(b, (tuple, list)):
        return isinstance(a, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(b, float) or isinstance(a, float):
        return math.isclose(float(a), float(b), rel_tol=1e-12)
    return a == b


@pytest.fixture(scope='module')
def ref(repo_root):
    path = f'{repo_root}/options/reference/data.yml'
    return load_options(path), open(path, encoding='utf-8').read()


@pytest.mark.parametrize('block,fn', [('train', TripletDataset.__init__), ('val', TripletFolderDataset.__init__),
                                      ('irpad_train', CachedLRDataset.__init__)])
def test_dataset_blocks_match_the_code(ref, block, fn):
    cfg = dict(ref[0]['datasets'][block])
    assert _registered_name(cfg.pop('type')) == fn.__qualname__.split('.')[0]
    defaults = _defaults(fn)
    assert set(cfg) == set(defaults), block
    for k, v in cfg.items():
        if k not in EXAMPLES:
            assert _same(v, defaults[k]), (block, k, v, defaults[k])


def _registered_name(name):
    from dalpsr.utils.registry import DATASET_REGISTRY
    return DATASET_REGISTRY.get(name).__name__


def test_degradation_prompt_and_build_blocks_match_the_code(ref):
    ds = ref[0]['datasets']
    deg = ds['train']['degradation']
    defaults = _defaults(RealESRGANDegradation.__init__)
    assert set(deg) == set(defaults)
    for k, v in deg.items():
        assert _same(v, defaults[k]), k
    assert ds['train']['prompt'] == dict(PromptSpec().to_opt(), templates=DEFAULT_TEMPLATES)
    build = ds['irpad_train']['build']
    bdef = _defaults(build_lr_cache)
    bdef.pop('out_file')
    assert set(build) == set(bdef)
    for k, v in build.items():
        assert _same(v, bdef[k]), k


def test_every_key_is_commented_once(ref):
    _, text = ref
    keys = set()

    def walk(d):
        for k, v in d.items():
            keys.add(k)
            if isinstance(v, dict) and k != 'templates':
                walk(v)
    walk({k: v for k, v in ref[0].items() if not k.startswith('_') and k != 'is_train' and k != 'manual_seed'})
    for key in keys:
        lines = [ln for ln in text.splitlines() if re.match(rf'\s*{re.escape(str(key))}:', ln)]
        assert lines, key
        assert '#' in lines[0].split(f'{key}:', 1)[1], f'{key}: first occurrence has no comment'


def test_train_block_builds(ref):
    cfg = dict(ref[0]['datasets']['train'], gt_size=64)
    item = build_dataset(cfg)[0]
    assert item['gt'].shape == (3, 64, 64) and item['lq'].shape == (3, 16, 16)
    assert PromptSpec().parse(item['prompt']) == item['labels'].tolist()
