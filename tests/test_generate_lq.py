"""scripts/generate_lq.py: determinism across workers, resume after a kill, refusal/archive,
round trip through TripletFolderDataset, messy inputs, test-set layout, options."""
import json
import os

import cv2
import numpy as np
import pytest
import torch

from dalpsr.data.prompt_labels import PromptSpec
from dalpsr.data.triplet_dataset import TripletDataset, TripletFolderDataset
from dalpsr.utils.img_io import read_image
from tests.script_loader import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def gen():
    return load_script('generate_lq')


def _run(gen, out, *extra, num=6, hr='sample:train'):
    argv = ['--hr', str(hr), '--out', str(out), '--num', str(num), '--gt-size', '64', '--seed', '5',
            '--no-progress', '--quiet', *map(str, extra)]
    return gen.main(argv)


def _snapshot(out):
    """{relative path: bytes} of everything except the log (which has timestamps)."""
    snap = {}
    for dirpath, _, files in os.walk(out):
        for f in files:
            p = os.path.join(dirpath, f)
            rel = os.path.relpath(p, out)
            if rel != 'generate.log':
                with open(p, 'rb') as fh:
                    snap[rel] = fh.read()
    return snap


@pytest.fixture(scope='module')
def reference(gen, tmp_path_factory):
    """A complete 6-sample set written by one process."""
    out = tmp_path_factory.mktemp('ref') / 'set'
    assert _run(gen, out, '--workers', 1) == 0
    return out


def test_same_bytes_whatever_the_workers(gen, reference, tmp_path):
    out = tmp_path / 'w2'
    assert _run(gen, out, '--workers', 2) == 0
    a, b = _snapshot(reference), _snapshot(out)
    assert sorted(a) == sorted(b) and len([k for k in a if k.startswith('lq')]) == 6
    generate_a, generate_b = json.loads(a.pop('generate.json')), json.loads(b.pop('generate.json'))
    assert generate_a == generate_b
    for k in a:
        assert a[k] == b[k], k
    idx = [json.loads(line)['index'] for line in a['meta.jsonl'].decode().splitlines()]
    assert idx == list(range(6))  # sorted by index once complete


def test_loads_through_folder_dataset_and_equals_on_the_fly(reference):
    recs = [json.loads(line) for line in (reference / 'meta.jsonl').read_text().splitlines()]
    fds = TripletFolderDataset(str(reference))
    otf = TripletDataset(dataroot_gt='sample:train', gt_size=64, seed=5)
    spec = PromptSpec()
    assert len(fds) == 6
    for j, rec in enumerate(recs):
        item = fds[j]
        assert item['key'] == rec['key'] and rec['key'].startswith(f'{j:06d}_')
        assert item['labels'].tolist() == rec['labels'] and item['prompt'] == rec['prompt']
        assert spec.parse(rec['prompt']) == rec['labels']
        ref = otf[rec['index']]  # the written sample is the on-the-fly sample of the same index
        assert ref['prompt'] == rec['prompt'] and json.loads(ref['params']) == rec['params']
        # LR ends on the 8-bit grid: the PNG holds it exactly
        assert torch.equal((ref['lq'] * 255).round(), (item['lq'] * 255).round())
        assert torch.allclose(ref['lq'], item['lq'], atol=1e-6)
        assert torch.allclose(ref['gt'], item['gt'], atol=0.5 / 255 + 1e-6)
        assert item['gt'].shape == (3, 64, 64) and item['lq'].shape == (3, 16, 16)


def test_resume_after_a_kill_gives_the_same_set(gen, reference, tmp_path):
    out = tmp_path / 'killed'
    assert _run(gen, out, num=4) == 0
    meta = out / 'meta.jsonl'
    lines = meta.read_text().splitlines(keepends=True)
    # simulate a kill: sample 3's line half-written, sample 2's LR file gone (line kept), a temp file left
    meta.write_text(''.join(lines[:3]) + lines[3][:40])
    rec2 = json.loads(lines[2])
    os.remove(out / rec2['lq'])
    (out / 'gt' / '.000005_x.abc123.tmp.png').write_bytes(b'partial')
    assert _run(gen, out, num=6) == 0
    assert _snapshot(out).keys() == _snapshot(reference).keys()
    a, b = _snapshot(reference), _snapshot(out)
    for k in a:
        if k != 'generate.json':
            assert a[k] == b[k], k
    log = (out / 'generate.log').read_text()
    assert 'resuming' in log and '2 finished sample(s) kept' in log and '1 temporary file' in log
    # nothing left to do: a rerun changes nothing
    before = _snapshot(out)
    assert _run(gen, out, num=6) == 0
    assert _snapshot(out) == before and 'nothing to do' in (out / 'generate.log').read_text()


def test_refuses_then_archives(gen, tmp_path, capsys):
    out = tmp_path / 'busy'
    out.mkdir()
    (out / 'mine.txt').write_text('keep me')
    assert _run(gen, out, num=2) == 2
    err = capsys.readouterr().err
    assert 'refusing' in err and '--overwrite' in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(out)) == ['mine.txt']
    assert _run(gen, out, '--overwrite', num=2) == 0
    archived = [p for p in tmp_path.iterdir() if p.name.startswith('busy_archived_')]
    assert len(archived) == 1 and (archived[0] / 'mine.txt').read_text() == 'keep me'
    assert len((out / 'meta.jsonl').read_text().splitlines()) == 2
    # same folder, other options: refused, names the differing option
    assert _run(gen, out, '--set', 'degradation.jpeg_range=[90,95]', num=2) == 2
    assert 'degradation' in capsys.readouterr().err


def _write(path, arr):
    ok, buf = cv2.imencode(path.suffix, arr)
    assert ok
    buf.tofile(str(path))


def test_messy_input_folder(gen, tmp_path, sample_paths):
    d = tmp_path / 'messy'
    d.mkdir()
    photo = cv2.imread(str(sample_paths['train'][0]))
    _write(d / 'a_rgb.png', photo[:100, :90])
    _write(d / 'b_gray.png', cv2.cvtColor(photo[:80, :80], cv2.COLOR_BGR2GRAY))
    _write(d / 'c_rgba.png', np.dstack([photo[:70, :70], np.full((70, 70), 128, np.uint8)]))
    _write(d / 'd_16bit.png', photo[:72, :72].astype(np.uint16) * 257)
    _write(d / 'e_small.png', photo[:20, :30])
    (d / 'f_corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'garbage' * 10)
    (d / 'g_text.jpg').write_text('not an image')
    (d / 'notes.txt').write_text('not an image suffix')
    out = tmp_path / 'out'
    assert _run(gen, out, num=7, hr=d) == 0
    recs = [json.loads(line) for line in (out / 'meta.jsonl').read_text().splitlines()]
    assert [r['index'] for r in recs] == list(range(7))
    assert {r['source_key'] for r in recs} == {'a_rgb', 'b_gray', 'c_rgba', 'd_16bit', 'e_small'}
    for r in recs:
        assert read_image(out / r['gt']).shape == (64, 64, 3) and read_image(out / r['lq']).shape == (16, 16, 3)
    small = next(r for r in recs if r['source_key'] == 'e_small')
    assert small['params']['crop']['pad'] == [44, 34]
    gray = read_image(out / next(r for r in recs if r['source_key'] == 'b_gray')['gt'])
    assert np.array_equal(gray[..., 0], gray[..., 1])
    log = (out / 'generate.log').read_text()
    for bad in ('f_corrupt.png', 'g_text.jpg'):
        assert log.count(bad) == 1  # logged once per file, with its reason
    assert 'not a readable image' in log
    assert not [p for p in out.rglob('*') if p.name.startswith('.')]  # no temp files left


def test_testset_layout_and_meta_file_input(gen, tmp_path, sample_paths):
    hr = tmp_path / 'val'
    hr.mkdir()
    for p in sample_paths['val'][:2]:
        (hr / p.name).symlink_to(p)
    listing = tmp_path / 'meta_info.txt'
    names = sorted(p.name for p in hr.iterdir())
    listing.write_text(f'{names[1]} (1,1,3)\n{names[0]}\n')
    out = tmp_path / 'testset'
    assert gen.main(['--testset', '--hr', str(listing), '--hr-root', str(hr), '--out', str(out), '--num', '4',
                     '--gt-size', '64', '--seed', '2', '--no-progress', '--quiet']) == 0
    gt, lr = sorted(os.listdir(out / 'GT')), sorted(os.listdir(out / 'LR'))
    assert gt == lr and len(gt) == 4
    recs = [json.loads(line) for line in (out / 'meta.jsonl').read_text().splitlines()]
    assert [r['source_key'] for r in recs] == [os.path.splitext(n)[0] for n in (names[1], names[0]) * 2]
    for r in recs:  # random crops, no flips or rotations
        c = r['params']['crop']
        assert not (c['hflip'] or c['vflip'] or c['rot90'])
        x = read_image(out / r['gt'])
        src = read_image(r['params']['source'])
        assert np.array_equal(x, src[c['top']:c['top'] + 64, c['left']:c['left'] + 64])
    assert len(TripletFolderDataset(str(out))) == 4  # also a TripletFolderDataset


def test_options_flow_and_bad_options(gen, tmp_path, capsys):
    opt = tmp_path / 'deg.yml'
    opt.write_text('degradation: {jpeg_range: [95, 95]}\nprompt: {types: [noise], num_intervals: 2}\n')
    out = tmp_path / 'o'
    assert _run(gen, out, '-opt', opt, '--set', 'degradation.jpeg_range2=[94,94]', num=2) == 0
    rec = json.loads((out / 'meta.jsonl').read_text().splitlines()[0])
    assert rec['params']['order1']['jpeg'] == 95 and rec['params']['final']['jpeg'] == 94
    assert rec['prompt'].startswith('Denoise with sigma') and len(rec['labels']) == 1
    capsys.readouterr()
    bad = tmp_path / 'bad.yml'
    bad.write_text('degradaton: {}\n')
    assert _run(gen, tmp_path / 'b1', '-opt', bad, num=1) == 2
    assert "unknown key 'degradaton'" in capsys.readouterr().err
    assert _run(gen, tmp_path / 'b2', '--set', 'degradation.blur_prob=3', num=1) == 2
    assert 'blur_prob' in capsys.readouterr().err
    assert _run(gen, tmp_path / 'b3', num=1, hr=tmp_path / 'nowhere') == 2
    assert 'nowhere' in capsys.readouterr().err
    assert not (tmp_path / 'b1').exists() and not (tmp_path / 'b3').exists()


def test_each_hr_image_is_decoded_once_per_group(gen, tmp_path, monkeypatch, hr_folder):
    """Samples of one HR image go to one worker in a row, so a 3-image set of 9 samples decodes
    each image once (not once per sample), and the result is the same set."""
    import dalpsr.data.triplet_dataset as td
    calls = []
    real = td.read_image
    monkeypatch.setattr(td, 'read_image', lambda p: calls.append(str(p)) or real(p))
    out = tmp_path / 'g'
    assert _run(gen, out, num=9, hr=hr_folder) == 0
    assert len(calls) == 3 and len(set(calls)) == 3
    recs = [json.loads(line) for line in (out / 'meta.jsonl').read_text().splitlines()]
    assert [r['index'] for r in recs] == list(range(9))
    names = sorted(p.stem for p in hr_folder.iterdir())
    assert [r['source_key'] for r in recs] == [names[i % 3] for i in range(9)]


_POOL_SCRIPT = r'''
import cv2, numpy as np
from dalpsr.utils.workers import worker_pool

def work(i):
    x = np.random.default_rng(i).random((256, 256, 3), dtype=np.float32)
    cv2.filter2D(x, -1, np.full((21, 21), 1 / 441, np.float32))
    return cv2.getNumThreads()

def init():
    pass

if __name__ == '__main__':
    cv2.setNumThreads(2)
    x = np.random.default_rng(0).random((768, 768, 3), dtype=np.float32)
    out = []
    for _ in range(4):  # the parent uses OpenCV threads between pools, as the tests and the writer do
        for _ in range(5):
            cv2.filter2D(x, -1, np.full((21, 21), 1 / 441, np.float32))
        with worker_pool(2, init, (), threads=1) as pool:
            out += pool.map(work, range(4))
    print(sorted(set(out)), cv2.getNumThreads())
'''


def test_worker_pool_sets_threads_without_deadlock(tmp_path):
    """cv2.setNumThreads inside a forked child deadlocked after the parent had used OpenCV
    threads; worker_pool sets the count in the parent instead and restores it."""
    import subprocess
    import sys
    script = tmp_path / 'pool.py'
    script.write_text(_POOL_SCRIPT)
    r = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ['[1]', '2']  # workers ran with 1 thread; the parent got its 2 back


def test_degradation_from_a_training_yaml_block(gen, tmp_path, capsys):
    train = tmp_path / 'train.yml'
    train.write_text('name: x\ndatasets:\n  train:\n    type: TripletDataset\n    dataroot_gt: sample:train\n'
                     '    degradation: {jpeg_range: [93, 93], jpeg_range2: [92, 92]}\n'
                     '    prompt: {types: [jpeg, blur], num_intervals: 3}\n')
    out = tmp_path / 'from_train'
    assert _run(gen, out, '-opt', train, '--block', 'datasets.train', num=1) == 0
    rec = json.loads((out / 'meta.jsonl').read_text().splitlines()[0])
    assert rec['params']['order1']['jpeg'] == 93 and rec['params']['final']['jpeg'] == 92
    assert rec['prompt'].startswith('Dejpeg with sigma') and len(rec['labels']) == 2
    capsys.readouterr()
    assert _run(gen, tmp_path / 'b', '-opt', train, '--block', 'datasets.val', num=1) == 2
    assert "missing required key 'datasets.val'" in capsys.readouterr().err
