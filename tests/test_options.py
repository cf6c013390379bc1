"""YAML options: key checks naming key and file, --set overrides, the train reference file."""
import json
import re
from pathlib import Path

import pytest
import yaml

from dalpsr.train import parse_args
from dalpsr.training.options import TRAIN_DEFAULTS, resolve_train_opt
from dalpsr.utils.options import (OptionError, apply_overrides, check_keys, dump_options, get_opt, load_options,
                                  load_yaml)


def _write(tmp_path, text, name='opt.yml'):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_unknown_top_level_key_names_key_and_file(tmp_path):
    p = _write(tmp_path, 'name: a\nmodle: {type: X}\n')
    with pytest.raises(OptionError) as err:
        load_options(str(p))
    msg = str(err.value)
    assert "'modle'" in msg and str(p) in msg and "did you mean 'model'" in msg


def test_missing_name_and_bad_yaml(tmp_path):
    with pytest.raises(OptionError, match=r"missing required key 'name' in .*opt.yml"):
        load_options(str(_write(tmp_path, 'model: {type: X}\n')))
    with pytest.raises(OptionError, match='not valid YAML'):
        load_yaml(str(_write(tmp_path, 'a: [1, 2\n', 'bad.yml')))
    with pytest.raises(OptionError, match="duplicate key 'a'"):
        load_yaml(str(_write(tmp_path, 'a: 1\na: 2\n', 'dup.yml')))
    with pytest.raises(OptionError, match='not found'):
        load_yaml(str(tmp_path / 'nope.yml'))
    with pytest.raises(OptionError, match="missing required key 'datasets.train.type' in f.yml"):
        get_opt({'_source': 'f.yml', 'datasets': {'train': {}}}, 'datasets.train.type')


def test_set_overrides(tmp_path):
    p = _write(tmp_path, 'name: a\nseed: 1\ntrain: {total_iter: 10, optimizer: {type: AdamW, lr: 1.0e-4}}\n'
                         'model: {type: X}\n')
    opt = parse_args(['-opt', str(p), '--set', 'train.total_iter=5', '--set', 'train.optimizer.lr=3e-4',
                      '--set', 'train.ema={decay: 0.9}', '--set', 'seed=4', '--set', 'train.stop_after_iter=null',
                      '--resume', 'no', '--force'])
    assert opt['train']['total_iter'] == 5 and opt['seed'] == 4
    # YAML 1.1 reads '3e-4' as a string; the optimizer builder accepts it as a number
    import torch
    from dalpsr.utils.optim import build_optimizer
    optim = build_optimizer(torch.nn.Linear(1, 1).parameters(), resolve_train_opt(opt)['optimizer'])
    assert optim.param_groups[0]['lr'] == pytest.approx(3e-4)
    assert opt['train']['ema'] == {'decay': 0.9} and opt['train']['stop_after_iter'] is None
    assert opt['_args']['resume'] == 'no' and opt['_args']['force'] is True
    t = resolve_train_opt(opt)
    assert t['total_iter'] == 5 and t['grad_accum'] == 1 and t['optimizer']['betas'] == [0.9, 0.999]
    # a typo in the path of an override fails, naming the missing block and the file
    with pytest.raises(OptionError, match=r"no block 'trian' in .*opt.yml"):
        parse_args(['-opt', str(p), '--set', 'trian.total_iter=5'])
    # an override that adds an unknown leaf to a checked block is caught by the block check
    opt = parse_args(['-opt', str(p), '--set', 'train.totl_iter=5'])
    with pytest.raises(OptionError, match="unknown key 'totl_iter'"):
        resolve_train_opt(opt)
    with pytest.raises(OptionError, match='key.sub=value'):
        apply_overrides({}, ['novalue'])


def test_train_values_are_checked():
    for bad, pat in [({'total_iter': 0}, 'total_iter'), ({'batch_size': 2.5}, 'batch_size'),
                     ({'grad_accum': -1}, 'grad_accum'), ({'mixed_precision': 'fp32'}, 'mixed_precision'),
                     ({'checkpoint_freq': -3}, 'checkpoint_freq'), ({'optimizer': 'adam'}, 'optimizer')]:
        with pytest.raises(OptionError, match=pat):
            resolve_train_opt({'_source': 'x.yml', 'train': bad})
    t = resolve_train_opt({'train': {'optimizer': {'type': 'SGD', 'lr': 0.1}, 'val_freq': None}})
    assert t['optimizer'] == {'type': 'SGD', 'lr': 0.1}  # no AdamW defaults leak into SGD
    assert t['val_freq'] == 0


def test_check_keys_ignores_private_and_suggests():
    check_keys({'a': 1, '_private': 2}, {'a'}, 'blk')
    with pytest.raises(OptionError, match="blk: unknown key 'bb' \\(did you mean 'b'\\?\\)"):
        check_keys({'bb': 1}, {'a', 'b'}, 'blk')


def test_dump_options_roundtrip():
    opt = {'name': 'n', 'train': {'total_iter': 3}, '_source': 'x', '_args': {}}
    assert yaml.safe_load(dump_options(opt)) == {'name': 'n', 'train': {'total_iter': 3}}


def test_reference_train_yml_documents_every_key(repo_root):
    path = f'{repo_root}/options/reference/train.yml'
    opt = load_options(path)
    assert set(opt['train']) == set(TRAIN_DEFAULTS)
    resolve_train_opt(opt)  # valid as is
    text = open(path).read()
    for key in list(TRAIN_DEFAULTS) + ['name', 'seed', 'imports', 'experiments_root', 'decay', 'start_iter',
                                        'update_every', 'warmup_iter', 'min_lr_ratio', 'milestones', 'gamma']:
        lines = [ln for ln in text.splitlines() if re.match(rf'\s*#?\s*{key}:', ln)]
        assert lines, key
        assert any('#' in ln.split(f'{key}:', 1)[1] for ln in lines), f'{key} has no comment'


# ------------------------------------------------------------------ the whole train options tree
def documented_tree(text):
    """``{dotted key: has a comment}`` of a reference options file, commented-out keys included
    (``# key: value  # comment`` lines, nested by the column of the key, counted from one
    space after the ``#``)."""
    out, stack = {}, []
    for ln in text.splitlines():
        m = re.match(r'^(\s*)(#\s*)?([a-z_][a-z0-9_]*):(.*)$', ln)
        if not m:
            continue
        indent = len(m.group(1)) + (len(m.group(2)) - 2 if m.group(2) else 0)
        key, rest = m.group(3), m.group(4)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        out['.'.join(k for _, k in stack)] = '#' in rest
    return out


def train_schema():
    """Every key the loop accepts (dotted), from the code's own key sets."""
    from dalpsr.training.options import DATASET_PHASES, LOADER_KEYS, PATH_KEYS, TOP_KEYS
    from dalpsr.utils.ema import EMA_KEYS
    from dalpsr.utils.optim import _SCHED_KEYS
    keys = set(TOP_KEYS) | {f'path.{k}' for k in PATH_KEYS} | {f'datasets.{p}' for p in DATASET_PHASES}
    keys |= {f'datasets.train.{k}' for k in LOADER_KEYS}
    keys |= {f'train.{k}' for k in TRAIN_DEFAULTS} | {f'train.ema.{k}' for k in EMA_KEYS}
    keys |= {f'train.scheduler.{k}' for ks in _SCHED_KEYS.values() for k in ks}
    keys |= {f'train.optimizer.{k}' for k in TRAIN_DEFAULTS['optimizer']}
    return keys


def test_reference_train_yml_documents_the_whole_tree(repo_root):
    """Every key the loop accepts is documented (with a comment) at its place in the tree, and
    every documented key outside the model's and the dataset's own keys is accepted."""
    import inspect

    from dalpsr.utils.optim import OPTIMIZERS
    doc = documented_tree(open(f'{repo_root}/options/reference/train.yml').read())
    schema = train_schema()
    missing = sorted(k for k in schema if k not in doc)
    assert not missing, f'options/reference/train.yml does not document {missing}'
    bare = sorted(k for k in schema if not doc[k])
    assert not bare, f'keys without a comment in options/reference/train.yml: {bare}'
    torch_kwargs = {n for cls in OPTIMIZERS.values() for n in inspect.signature(cls.__init__).parameters}
    owned_elsewhere = re.compile(r'^(model\.|datasets\.(train|val)\.(?!batch_size$|num_workers$))')
    stale = sorted(k for k in doc if k not in schema and not owned_elsewhere.match(k)
                   and not (k.startswith('train.optimizer.') and k.rsplit('.', 1)[1] in torch_kwargs))
    assert not stale, f'options/reference/train.yml documents keys the loop does not accept: {stale}'


@pytest.mark.parametrize('text,key', [
    ('num_gpu: 1\n', 'num_gpu'), ('logger: {print_freq: 10}\n', 'logger'), ('val: {val_freq: 10}\n', 'val'),
    ('path: {experiments_root: x, results_root: y}\n', 'results_root'),
    ('datasets: {train: {type: ToyRegression}, test: {type: ToyRegression}}\n', 'test'),
    ('train: {ema: {decay: 0.9, decy: 0.5}}\n', 'decy'),
    ('train: {scheduler: {type: cosine, warmup: 3}}\n', 'warmup'),
    ('train: {total_iters: 3}\n', 'total_iters'),
    ('model: {type: ToyModel, hiden: 4}\n', 'hiden'),
    ('datasets: {train: {type: ToyRegression, lenght: 4}}\n', 'lenght'),
])
def test_an_unknown_key_anywhere_stops_the_run_with_one_line(tmp_path, capsys, text, key):
    """A key the loop (or the model / the dataset) does not know stops the command with exit
    status 2 and one line naming the key, before any folder is created."""
    from dalpsr.train import main
    base = {'name': 'unk', 'imports': ['tests.toy_plugin'], 'path': {'experiments_root': str(tmp_path / 'exp')},
            'model': {'type': 'ToyModel'}, 'datasets': {'train': {'type': 'ToyRegression'}},
            'train': {'total_iter': 2, 'progress_bar': False, 'tensorboard': False}}
    extra = yaml.safe_load(text)
    for k, v in extra.items():  # merge one level deep so the bad key sits inside a valid block
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    f = _write(tmp_path, yaml.safe_dump(base))
    assert main(['-opt', str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"'{key}'" in err and 'unknown' in err, err
    assert not (tmp_path / 'exp').exists()


def test_a_documented_key_can_be_set_when_its_block_is_absent(repo_root, tmp_path):
    """--set reaches every documented key of the tree, also where the file lacks the block
    (the CPU IRPAD recipe has no path: block) or sets it to null (train.ema: null); a typo in a
    block name still fails with one line."""
    from dalpsr.training.options import check_train_options
    opt = parse_args(['-opt', f'{repo_root}/options/train/train_irpad_cpu.yml',
                      '--set', f'path.experiments_root={tmp_path}', '--set', 'train.ema.decay=0.9'])
    assert opt['path'] == {'experiments_root': str(tmp_path)} and opt['train']['ema'] == {'decay': 0.9}
    ref = load_options(f'{repo_root}/options/reference/train.yml')
    minimal = _write(tmp_path, 'name: m\nmodel: {type: ToyModel}\ndatasets: {train: {type: ToyRegression}}\n')
    for key in sorted(train_schema()):
        parts = key.split('.')
        if parts[0] in ('name', 'model') or key == 'datasets.train':
            continue
        value = get_opt(ref, key, None)
        if value is None:  # commented out in the reference: any valid value
            value = {'manual_seed': 3, 'is_train': True, 'datasets.val': {'type': 'ToyRegression'},
                     'datasets.train.batch_size': 2, 'datasets.train.num_workers': 0,
                     'train.scheduler.milestones': [10], 'train.scheduler.gamma': 0.5}.get(key, None)
        opt = parse_args(['-opt', str(minimal), '--set', f'{key}={json.dumps(value)}'])
        assert get_opt(opt, key) == value, key
        check_train_options(opt)
        resolve_train_opt(opt)
    with pytest.raises(OptionError, match=r"there is no block 'pth' in .*\(did you mean 'path'\?\)"):
        parse_args(['-opt', str(minimal), '--set', 'pth.experiments_root=x'])
    with pytest.raises(OptionError, match="'name' is not a block"):
        parse_args(['-opt', str(minimal), '--set', 'name.x=1'])


def test_caption_align_reference_documents_every_model_key(repo_root):
    """The model block of the third training recipe (the other two models have their own tests:
    test_dalpsr_model.py, test_irpad_options.py) is documented key by key in captioning.yml."""
    from dalpsr.models.caption_align_model import CaptionAlignModel
    text = open(f'{repo_root}/options/reference/captioning.yml').read()
    block = text[text.index('[dalpsr/train.py model block]'):]
    doc = {k.split('.', 1)[1]: c for k, c in documented_tree(block).items() if k.startswith('model.')}
    missing = sorted(k for k in CaptionAlignModel.KEYS if k != 'type' and not doc.get(k))
    assert not missing, f'options/reference/captioning.yml does not document {missing}'
    assert set(doc) <= set(CaptionAlignModel.KEYS), sorted(set(doc) - set(CaptionAlignModel.KEYS))


@pytest.mark.parametrize('sub,key', [({'prompt': {'typs': ['blur']}}, 'typs'),
                                     ({'degradation': {'blur_prb': 0.5}}, 'blur_prb')])
def test_an_unknown_key_in_a_dataset_sub_block_stops_the_run_with_one_line(tmp_path, capsys, sub, key):
    """Keys inside a dataset's own sub-blocks (the prompt spec, the degradation) too."""
    import skimage.data

    from dalpsr.train import main
    train = {'type': 'TripletDataset', 'dataroot_gt': str(Path(skimage.data.__file__).parent), 'gt_size': 64,
             'scale': 4, 'small_image': 'skip', **sub}
    opt = {'name': 'unk', 'path': {'experiments_root': str(tmp_path / 'exp')}, 'model': {'type': 'ToyModel'},
           'imports': ['tests.toy_plugin'], 'datasets': {'train': train}, 'train': {'total_iter': 1}}
    assert main(['-opt', str(_write(tmp_path, yaml.safe_dump(opt)))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err and 'datasets.train in' in err, err
    assert not (tmp_path / 'exp').exists()
