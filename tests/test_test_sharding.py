"""dalpsr/test.py under ``accelerate launch`` with two CPU processes (gloo; dalpsr/inference/sharded.py):
the Bicubic restorer on real shipped photos writes the same image bytes and the same records
(timing fields aside) as one process, each process restoring its own units; a killed sharded run
(records in part files, a truncated line, an image without its record) is resumed with nothing lost
and nothing repeated."""
import json
import shutil

import cv2
import numpy as np
import pytest

from dalpsr import test as T
from dalpsr.inference.sharded import merge_records, units
from dalpsr.utils.misc import append_jsonl, read_jsonl
from tests.test_sharding import REPO, _launch

TIMING = {'seconds', 'time', 'peak_mem_mb', 'peak_mem_kind', 'output'}


@pytest.fixture(scope='module')
def photo_set(tmp_path_factory, sample_paths):
    """5 real photos as LR (x4 area-downscaled; im0-1 and im3-4 of one size, im2 of another) with GT,
    plus a corrupt file."""
    from dalpsr.utils.img_io import read_image
    root = tmp_path_factory.mktemp('photos')
    lq, gt = root / 'lq', root / 'gt'
    lq.mkdir()
    gt.mkdir()
    photos = (sample_paths['val'] + sample_paths['train'])[:5]
    assert len(photos) == 5
    for i, p in enumerate(photos):
        h, w = (64, 96) if i == 2 else (96, 64)
        hr = read_image(p)[:h, :w]
        cv2.imwrite(str(gt / f'im{i}.png'), np.round(hr[:, :, ::-1] * 255).astype(np.uint8))
        small = cv2.resize(hr, (w // 4, h // 4), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(lq / f'im{i}.png'), np.round(small[:, :, ::-1] * 255).astype(np.uint8))
    (lq / 'im5.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\x00broken' * 8)
    return root


def _args(photo_set, results):
    return ['-opt', f'{REPO}/options/test/test_bicubic.yml', '--set', f"datasets.demo.dataroot_lq={photo_set / 'lq'}",
            '--set', f"datasets.demo.dataroot_gt={photo_set / 'gt'}", '--set', f'path.results_root={results}',
            '--set', 'test.progress_bar=false', '--set', 'test.batch_size=2']


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.glob('*.png'))}


def _records(d):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(d / 'records.jsonl')]


@pytest.fixture(scope='module')
def one_process(photo_set, tmp_path_factory):
    results = tmp_path_factory.mktemp('one')
    assert T.main(_args(photo_set, results)) == 0
    return results / 'bicubic_x4' / 'demo'


def test_units_are_the_batches_of_one_process_and_merge_orders_by_image(tmp_path):
    todo = [(f'k{i}', None) for i in range(6)]
    shapes = {'k0': (4, 4, 3), 'k1': (4, 4, 3), 'k2': (4, 4, 3), 'k3': (8, 4, 3), 'k4': (4, 4, 3), 'k5': (4, 4, 3)}
    assert [[k for k, _ in u] for u in units(todo, 2, shapes)] == [['k0', 'k1'], ['k2'], ['k3'], ['k4', 'k5']]
    assert [len(u) for u in units(todo, 4, shapes)] == [3, 1, 2] and [len(u) for u in units(todo, 4)] == [4, 2]
    out = tmp_path / 'records.jsonl'
    append_jsonl(out, {'key': 'k0'})
    append_jsonl(tmp_path / '.records.jsonl.part1', {'key': 'k3'})
    append_jsonl(tmp_path / '.records.jsonl.part0', {'key': 'k0'})  # already merged before the kill
    append_jsonl(tmp_path / '.records.jsonl.part0', {'key': 'k1'})
    with open(tmp_path / '.records.jsonl.part0', 'a') as f:
        f.write('{"key": "k4", "sta')  # the line being written when it was killed
    assert merge_records(out, ['k0', 'k1', 'k2', 'k3', 'k4']) == 2
    assert [r['key'] for r in read_jsonl(out)] == ['k0', 'k1', 'k3'] and not list(tmp_path.glob('.records*'))
    assert merge_records(out, None) == 0 and len(read_jsonl(out)) == 3  # idempotent


def test_two_processes_write_the_bytes_and_records_of_one(photo_set, one_process, tmp_path):
    log = _launch(f'{REPO}/dalpsr/test.py', *_args(photo_set, tmp_path))  # an absolute path: not under scripts/
    two = tmp_path / 'bicubic_x4' / 'demo'
    ref = _files(one_process)
    assert len(ref) == 5 and _files(two) == ref
    assert _records(two) == _records(one_process)  # no duplicate, nothing lost, the same order and batches
    assert [r['batch'] for r in _records(two) if r['status'] == 'ok'] == [2, 2, 1, 2, 2]
    assert not list(two.glob('.records.jsonl.part*'))
    text = (tmp_path / 'bicubic_x4' / 'test.log').read_text()
    # units (batches): [im0, im1], [im2], [im3, im4]; process 0 takes the first and the last, process 1
    # im2 (im5 is rejected by the main process before the work is divided)
    assert '[0/2] [demo] process 0 of 2: 4 images' in text and '[1/2] [demo] process 1 of 2: 1 images' in text, \
        text + log[-2000:]
    s1, s2 = (json.loads((d / 'summary.json').read_text()) for d in (one_process, two))
    assert (s2['ok'], s2['failed'], s2['images']) == (5, 1, 6)
    assert s2['metrics'] == s1['metrics'] and s2['problems'] == s1['problems']


def test_a_killed_sharded_run_is_resumed_with_nothing_lost_or_repeated(photo_set, one_process, tmp_path):
    out = tmp_path / 'bicubic_x4'
    shutil.copytree(one_process.parent, out)
    d = out / 'demo'
    recs = {r['key']: r for r in read_jsonl(d / 'records.jsonl')}
    # what a killed 2-process run leaves: im5's rejection and im0 merged, im1 and im2 only in part
    # files (im3's line truncated), im3 and im4 written without records, a temp file
    (d / 'records.jsonl').write_text(''.join(json.dumps(recs[k]) + '\n' for k in ('im5', 'im0')))
    append_jsonl(d / '.records.jsonl.part0', recs['im1'])
    append_jsonl(d / '.records.jsonl.part1', recs['im2'])
    with open(d / '.records.jsonl.part1', 'a') as f:
        f.write(json.dumps(recs['im3'])[:50])
    (d / 'summary.json').unlink()
    before = {k: (d / f'{k}.png').stat().st_mtime_ns for k in ('im0', 'im1', 'im2')}
    assert T.main(_args(photo_set, tmp_path)) == 0  # resumed by one process
    assert _files(d) == _files(one_process) and not list(d.glob('.records.jsonl.part*'))
    assert {k: (d / f'{k}.png').stat().st_mtime_ns for k in before} == before  # finished images kept
    got = read_jsonl(d / 'records.jsonl')
    assert sorted(r['key'] for r in got if r['status'] == 'ok') == [f'im{i}' for i in range(5)]  # each once
    assert [r['key'] for r in got if r['status'] != 'ok'] == ['im5', 'im5']  # a failed image is retried
    s = json.loads((d / 'summary.json').read_text())
    assert (s['ok'], s['failed'], s['resumed']) == (5, 1, 3)
    assert s['metrics'] == json.loads((one_process / 'summary.json').read_text())['metrics']
