"""TripletDataset: item contract, determinism across workers, bad inputs, captions, meta files."""
import json
import logging

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dalpsr.data import build_dataset
from dalpsr.data.prompt_labels import PromptSpec, degrees
from dalpsr.data.triplet_dataset import TripletDataset
from dalpsr.utils.options import OptionError


def _ds(root, **kw):
    cfg = {'type': 'TripletDataset', 'dataroot_gt': str(root), 'gt_size': 64, 'seed': 11}
    cfg.update(kw)
    return build_dataset(cfg)


def test_item_contract(hr_folder):
    ds = _ds(hr_folder, gt_size=128)
    assert len(ds) == 3
    it = ds[1]
    assert it['gt'].shape == (3, 128, 128) and it['lq'].shape == (3, 32, 32)
    assert it['gt'].dtype == torch.float32 and it['lq'].dtype == torch.float32
    for k in ('gt', 'lq'):
        assert 0 <= it[k].min() and it[k].max() <= 1
    assert it['labels'].dtype == torch.int64 and it['labels'].shape == (3,)
    params = json.loads(it['params'])
    spec = PromptSpec()
    lab = spec.labels_from_degrees(degrees(params))
    assert it['labels'].tolist() == lab and it['prompt'] == spec.prompt(lab)
    assert set(params['crop']) >= {'top', 'left', 'hflip', 'vflip', 'rot90', 'size'}
    assert it['caption'] == '' and it['index'] == 1 and it['key'] == sorted(p.stem for p in hr_folder.iterdir())[1]


def test_deterministic_any_index_and_workers(hr_folder):
    ds = _ds(hr_folder)
    a, b = ds[4], ds[4]
    assert torch.equal(a['lq'], b['lq']) and a['params'] == b['params']
    c = ds[1]  # same image (4 % 3), different sample
    assert c['key'] == a['key'] and c['params'] != a['params']
    other_seed = _ds(hr_folder, seed=12)[4]
    assert other_seed['params'] != a['params']
    idx = list(range(8))
    ref = [ds[i] for i in idx]
    loader = DataLoader(torch.utils.data.Subset(ds, idx), batch_size=2, num_workers=2)
    got = [x for batch in loader for x in _unbatch(batch)]
    assert len(got) == len(ref)
    for r, g in zip(ref, got):
        assert torch.equal(r['lq'], g['lq']) and torch.equal(r['gt'], g['gt'])
        assert r['prompt'] == g['prompt'] and r['params'] == g['params'] and r['index'] == g['index']


def _unbatch(batch):
    n = batch['gt'].shape[0]
    return [{k: (v[i] if not isinstance(v, torch.Tensor) or v.dim() else v) for k, v in batch.items()}
            | {'index': int(batch['index'][i])} for i in range(n)]


def _write(path, arr):
    ok, buf = cv2.imencode(path.suffix, arr)
    assert ok
    buf.tofile(str(path))


@pytest.fixture
def messy_folder(tmp_path, sample_paths):
    d = tmp_path / 'messy'
    d.mkdir()
    photo = cv2.imread(str(sample_paths['train'][0]))
    _write(d / 'a_rgb.png', photo[:100, :90])
    _write(d / 'b_gray.png', cv2.cvtColor(photo[:80, :80], cv2.COLOR_BGR2GRAY))
    rgba = np.dstack([photo[:70, :70], np.full((70, 70), 128, np.uint8)])
    _write(d / 'c_rgba.png', rgba)
    _write(d / 'd_16bit.png', (photo[:72, :72].astype(np.uint16) * 257))
    _write(d / 'e_small.png', photo[:20, :30])
    (d / 'f_corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'garbage' * 10)
    (d / 'g_text.jpg').write_text('not an image')
    (d / 'notes.txt').write_text('ignored: not an image suffix')
    (d / 'h_empty.png').write_bytes(b'')
    return d


def test_bad_inputs_follow_the_rules(messy_folder, caplog):
    ds = _ds(messy_folder)
    assert len(ds) == 8  # notes.txt is not listed
    with caplog.at_level(logging.WARNING, logger='dalpsr'):
        items = [ds[i] for i in range(16)]
    keys = {it['key'] for it in items}
    assert keys == {'a_rgb', 'b_gray', 'c_rgba', 'd_16bit', 'e_small'}
    for it in items:
        assert it['gt'].shape == (3, 64, 64) and it['lq'].shape == (3, 16, 16)
        assert torch.isfinite(it['gt']).all()
    small = next(it for it in items if it['key'] == 'e_small')
    assert json.loads(small['params'])['crop']['pad'] == [44, 34]
    gray = next(it for it in items if it['key'] == 'b_gray')
    assert torch.equal(gray['gt'][0], gray['gt'][1])
    msgs = ' '.join(r.getMessage() for r in caplog.records)
    for bad in ('f_corrupt.png', 'g_text.jpg', 'h_empty.png'):
        assert bad in msgs
    assert sum(r.getMessage().count('f_corrupt.png') for r in caplog.records) == 1  # once per file
    # skip rule for small images
    ds2 = _ds(messy_folder, small_image='skip')
    assert 'e_small' not in {ds2[i]['key'] for i in range(8)}


def test_all_unreadable_raises_clear_error(tmp_path):
    d = tmp_path / 'bad'
    d.mkdir()
    for i in range(3):
        (d / f'x{i}.png').write_bytes(b'nope')
    ds = _ds(d)
    with pytest.raises(RuntimeError, match='consecutive unusable images'):
        ds[0]


def test_meta_info_captions_length_and_whole_images(hr_folder, tmp_path):
    names = sorted(p.name for p in hr_folder.iterdir())
    meta = tmp_path / 'meta.txt'
    meta.write_text(f'# comment\n{names[2]} (512,512,3)\n\n{names[0]}\n')
    cap = tmp_path / 'caps.jsonl'
    stem = names[2].rsplit('.', 1)[0]
    cap.write_text(json.dumps({'key': stem, 'description': 'a photo of something', 'error': None}) + '\n')
    ds = _ds(hr_folder, meta_info=str(meta), caption_file=str(cap), length=10)
    assert len(ds) == 10 and [p.name for p in ds.paths] == [names[2], names[0]]
    assert ds[0]['caption'] == 'a photo of something' and ds[1]['caption'] == ''
    assert ds[12]['key'] == ds[0]['key']
    whole = _ds(hr_folder, gt_size=None, use_rot=False)
    it = whole[0]
    assert it['gt'].shape[1] == 4 * it['lq'].shape[1] and it['gt'].shape[1] >= 256


def test_option_errors(hr_folder, tmp_path):
    with pytest.raises(OptionError, match='unknown key'):
        build_dataset({'type': 'TripletDataset', 'dataroot_gt': str(hr_folder), 'gt_sz': 64})
    with pytest.raises(ValueError, match='dataroot_gt'):
        TripletDataset()
    with pytest.raises(ValueError, match='small_image'):
        TripletDataset(dataroot_gt=str(hr_folder), small_image='crop')
    with pytest.raises(ValueError, match='multiple of scale'):
        TripletDataset(dataroot_gt=str(hr_folder), gt_size=65)
    with pytest.raises(ValueError, match='differs'):
        TripletDataset(dataroot_gt=str(hr_folder), degradation={'scale': 2})
    with pytest.raises(ValueError, match='no images'):
        (tmp_path / 'empty').mkdir()
        TripletDataset(dataroot_gt=str(tmp_path / 'empty'))
    with pytest.raises(FileNotFoundError, match='caption_file'):
        TripletDataset(dataroot_gt=str(hr_folder), caption_file=str(tmp_path / 'none.jsonl'))


def test_prompt_and_degradation_options_flow_through(hr_folder):
    ds = _ds(hr_folder, prompt={'types': ['noise'], 'num_intervals': 2},
             degradation={'jpeg_range': [95, 95], 'jpeg_range2': [95, 95]})
    it = ds[0]
    p = json.loads(it['params'])
    assert p['order1']['jpeg'] == 95 and p['final']['jpeg'] == 95
    assert it['labels'].shape == (1,) and it['prompt'].startswith('Denoise with sigma')
