"""scripts/generate_lq.py and scripts/caption.py under ``accelerate launch`` with two CPU processes
(gloo): deterministic disjoint slices, part files merged into one output with no duplicate and no
loss, the same bytes as one process, resumable after a kill (part files of a killed run folded in)."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from dalpsr.utils.misc import append_jsonl, read_jsonl
from dalpsr.utils.sharding import Shard, current_shard
from tests.script_loader import load_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _launch(script, *args):
    accel = shutil.which('accelerate', path=os.path.dirname(sys.executable)) or shutil.which('accelerate')
    if accel is None:
        pytest.fail('the accelerate command is not installed next to the python running the tests')
    cmd = [accel, 'launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1', '--mixed_precision', 'no',
           '--dynamo_backend', 'no', '--main_process_port', str(_free_port()),
           os.path.join(REPO, 'scripts', script), *args]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1', PYTHONPATH=REPO, HF_HUB_OFFLINE='1')
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def test_shard_slices_are_disjoint_complete_and_deterministic(tmp_path):
    units = list(range(11))
    shards = [Shard(rank=r, world_size=3) for r in range(3)]
    taken = [s.take(units) for s in shards]
    assert sorted(sum(taken, [])) == units and taken[1] == [1, 4, 7, 10]
    assert current_shard().world_size == 1 and Shard().take(units) == units  # a plain process: all of it
    out = tmp_path / 'meta.jsonl'
    assert Shard().part_path(out) == out and shards[2].part_path(out) == tmp_path / '.meta.jsonl.part2'
    for s in (shards[2], shards[0]):
        s.part_path(out).write_text('')
    (tmp_path / '.meta.jsonl.partX').write_text('')  # not a part file
    assert Shard.part_files(out) == [tmp_path / '.meta.jsonl.part0', tmp_path / '.meta.jsonl.part2']


def _set_files(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob('*'))
            if p.is_file() and p.name not in ('generate.log',)}


def test_generate_lq_two_processes_resume_a_killed_run_into_the_same_bytes(tmp_path):
    gen = load_script('generate_lq')
    common = ['--hr', 'sample:train', '--num', '8', '--gt-size', '64', '--seed', '5', '--no-progress', '--quiet']
    single = tmp_path / 'single'
    assert gen.main(['--out', str(single)] + common) == 0
    ref = _set_files(single)
    # what a killed 2-process run leaves: samples 0-2 merged, 3 and 6 only in part files (one of
    # them truncated mid-line), sample 4's images written but its record lost, a temp file
    out = tmp_path / 'mp'
    shutil.copytree(single, out)
    recs = {r['index']: r for r in read_jsonl(out / 'meta.jsonl')}
    (out / 'meta.jsonl').write_text(''.join(json.dumps(recs[i]) + '\n' for i in (0, 1, 2)))
    append_jsonl(out / '.meta.jsonl.part0', recs[6])
    append_jsonl(out / '.meta.jsonl.part1', recs[3])
    with open(out / '.meta.jsonl.part1', 'a') as f:
        f.write(json.dumps(recs[5])[:40])
    for i in (5, 7):
        for k in ('gt', 'lq'):
            (out / recs[i][k]).unlink()
    (out / 'lq' / '.000007_x.tmp.png').write_bytes(b'partial')
    log = _launch('generate_lq.py', '--out', str(out), *common)
    assert _set_files(out) == ref  # meta.jsonl and every image: the bytes of the one-process run
    assert not list(out.glob('.meta.jsonl.part*'))
    text = (out / 'generate.log').read_text()
    assert 'resuming' in text and '5 finished sample(s) kept' in text, text
    wrote = {ln.split('process ')[1][:1]: int(ln.split(': ')[1].split()[0]) for ln in text.splitlines()
             if ' of 2: ' in ln}
    assert wrote.keys() == {'0', '1'} and sum(wrote.values()) == 3 and min(wrote.values()) >= 1, (wrote, log[-2000:])


@pytest.fixture(scope='module')
def tiny_llava(tmp_path_factory):
    from dalpsr.captioning.tiny import make_tiny_llava
    return make_tiny_llava(str(tmp_path_factory.mktemp('llava')))


@pytest.fixture
def images(tmp_path, sample_paths):
    d = tmp_path / 'imgs'
    d.mkdir()
    for p in sample_paths['train'][:4]:
        shutil.copyfile(p, d / p.name)
    (d / 'broken.png').write_bytes(b'not a png')
    return d


def _caption_args(images, out, llava):
    return ['--input', str(images), '--out', str(out), '--captioner', 'llava', '--llava', llava,
            '--max-new-tokens', '4', '--batch-size', '2', '--device', 'cpu']


def test_caption_two_processes_same_bytes_as_one(images, tiny_llava, tmp_path):
    cap = load_script('caption')
    one = tmp_path / 'one.jsonl'
    assert cap.main(_caption_args(images, one, tiny_llava)) == 0
    two = tmp_path / 'two.jsonl'
    out = _launch('caption.py', *_caption_args(images, two, tiny_llava))
    assert 'process 0 of 2: 3' in out and 'process 1 of 2: 2' in out, out[-2000:]  # batches 0, 2 / batch 1
    assert two.read_bytes() == one.read_bytes()
    assert len(read_jsonl(two)) == 5 and not list(tmp_path.glob('.two.jsonl.part*'))


def test_caption_resume_folds_the_parts_of_a_killed_sharded_run(images, tiny_llava, tmp_path):
    cap = load_script('caption')
    ref = tmp_path / 'ref.jsonl'
    assert cap.main(_caption_args(images, ref, tiny_llava)) == 0
    by = {r['key']: r for r in read_jsonl(ref)}
    keys = sorted(k for k in by if k != 'broken')
    out = tmp_path / 'caps.jsonl'
    append_jsonl(out, by[keys[0]])
    append_jsonl(tmp_path / '.caps.jsonl.part1', by[keys[1]])
    append_jsonl(tmp_path / '.caps.jsonl.part0', by[keys[0]])  # already merged before the kill
    with open(tmp_path / '.caps.jsonl.part0', 'a') as f:
        f.write(json.dumps(by[keys[2]])[:30])  # the line being written when it was killed
    assert cap.main(_caption_args(images, out, tiny_llava)) == 0  # resumed by one process
    recs = read_jsonl(out)
    assert not list(tmp_path.glob('.caps.jsonl.part*'))
    assert [r['key'] for r in recs].count(keys[0]) == 1 and [r['key'] for r in recs].count(keys[1]) == 1
    assert {r['key']: r for r in recs} == by  # nothing lost, the same records
