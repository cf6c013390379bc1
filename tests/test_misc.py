"""Shared helpers: atomic writes, folders never overwritten silently, JSONL, seeding, scans."""
import json
import os

import numpy as np
import pytest
import torch

from dalpsr.utils.misc import (append_jsonl, atomic_path, atomic_write_json, mkdir_and_rename, read_jsonl,
                               sample_rng, scan_images, set_random_seed)


def test_atomic_path_success_and_failure(tmp_path):
    target = tmp_path / 'a' / 'out.json'
    atomic_write_json(target, {'x': np.int64(3), 'y': np.float32(0.5), 'z': np.arange(2)})
    assert json.loads(target.read_text()) == {'x': 3, 'y': 0.5, 'z': [0, 1]}
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp.name.startswith('.') and tmp.suffix == '.json'
            tmp.write_text('half')
            raise RuntimeError('crash')
    assert json.loads(target.read_text())['x'] == 3
    assert os.listdir(target.parent) == ['out.json']
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / 'b.json', {'f': object()})
    assert not (tmp_path / 'b.json').exists()


def test_mkdir_and_rename(tmp_path):
    d = tmp_path / 'exp'
    mkdir_and_rename(d)
    (d / 'keep.txt').write_text('1')
    with pytest.raises(FileExistsError, match='refusing to overwrite'):
        mkdir_and_rename(d, rename=False)
    mkdir_and_rename(d)  # archives
    mkdir_and_rename(d)  # empty folder: reused, nothing archived
    archived = [p for p in tmp_path.iterdir() if p.name.startswith('exp_archived_')]
    assert len(archived) == 1 and (archived[0] / 'keep.txt').read_text() == '1'
    (d / 'again.txt').write_text('2')
    mkdir_and_rename(d)  # a second archive in the same second gets a distinct name
    assert len([p for p in tmp_path.iterdir() if p.name.startswith('exp_archived_')]) == 2
    assert d.is_dir() and not any(d.iterdir())


def test_jsonl_truncated_last_line(tmp_path):
    p = tmp_path / 'log.jsonl'
    append_jsonl(p, {'a': 1})
    append_jsonl(p, {'a': 2})
    with open(p, 'a') as f:
        f.write('{"a": 3')  # interrupted writer
    assert read_jsonl(p) == [{'a': 1}, {'a': 2}]
    p.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(ValueError, match='line 2'):
        read_jsonl(p)


def test_sample_rng_and_seed():
    a = sample_rng(0, 5).random(3)
    assert np.array_equal(a, sample_rng(0, 5).random(3))
    assert not np.array_equal(a, sample_rng(0, 6).random(3))
    assert not np.array_equal(a, sample_rng(1, 5).random(3))
    set_random_seed(3)
    x = (np.random.rand(), torch.rand(1).item())
    set_random_seed(3)
    assert x == (np.random.rand(), torch.rand(1).item())


def test_scan_images(tmp_path):
    for name in ['b.PNG', 'a.jpg', '.hidden.png', 'notes.txt', 'sub/c.bmp']:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b'')
    assert [p.name for p in scan_images(tmp_path)] == ['a.jpg', 'b.PNG', 'c.bmp']
    assert [p.name for p in scan_images(tmp_path, recursive=False)] == ['a.jpg', 'b.PNG']
    with pytest.raises(FileNotFoundError):
        scan_images(tmp_path / 'none')


def test_resolve_device(monkeypatch):
    import torch
    from dalpsr.utils.misc import resolve_device
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert resolve_device('auto') == 'cpu' and resolve_device('cpu') == 'cpu'
    with pytest.raises(ValueError, match='cuda:1: no CUDA device'):
        resolve_device('cuda:1')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert resolve_device('auto') == 'cuda' and resolve_device('cuda:1') == 'cuda:1'
