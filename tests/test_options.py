"""YAML options: key checks naming key and file, --set overrides, the train reference file."""
import re

import pytest
import yaml

from dalpsr.train import TRAIN_DEFAULTS, parse_args, resolve_train_opt
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
