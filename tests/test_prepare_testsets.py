"""scripts/prepare_testsets.py on small real photos standing in for the downloads: RealSR (V3) and
DRealSR layouts -> StableSR's 128/512 centre crops, whole RealSR-v3 pairs, and a paper's synthetic
DIV2K-Val through generate_lq.py's preset (recorded seed and degradation)."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.script_loader import load_script


def _photo(path, h, w):
    """A real photo (shipped with scikit-image etc.) resized to h x w, uint8 BGR."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


@pytest.fixture
def realsr(tmp_path, sample_paths):
    """RealSR (V3)-like tree: Canon/Test/4 and Nikon/Test/4 with *_HR / *_LR4 pairs (LR x4 smaller),
    an LR too small for the crop, an LR on the HR grid (an upsampled LR), an unpaired HR."""
    root = tmp_path / 'RealSR(V3)'
    photos = sample_paths['val'] + sample_paths['train']
    pairs = {'Canon/Test/4/Canon_001': (140, 180), 'Canon/Test/4/Canon_002': (129, 150),
             'Nikon/Test/4/Nikon_001': (160, 133), 'Nikon/Test/4/Nikon_002': (100, 140)}
    for i, (stem, (h, w)) in enumerate(pairs.items()):
        (root / stem).parent.mkdir(parents=True, exist_ok=True)
        hr = _photo(photos[i], 4 * h + (2 if i == 0 else 0), 4 * w)  # one HR 2 px taller (mod-crop)
        cv2.imwrite(f'{root / stem}_HR.png', hr)
        cv2.imwrite(f'{root / stem}_LR4.png', cv2.resize(hr[:4 * h], (w, h), interpolation=cv2.INTER_AREA))
    up = _photo(photos[4], 512, 512)
    cv2.imwrite(str(root / 'Canon/Test/4/Canon_003_HR.png'), up)
    cv2.imwrite(str(root / 'Canon/Test/4/Canon_003_LR4.png'), up)  # RealSR V1/V2 style: LR on the HR grid
    cv2.imwrite(str(root / 'Nikon/Test/4/Nikon_009_HR.png'), up)   # no LR
    return root


def test_realsr_stablesr_centre_crops_resume_and_refusal(realsr, tmp_path):
    prep = load_script('prepare_testsets')
    out = tmp_path / 'RealSR-stablesr'
    args = ['--protocol', 'realsr-stablesr', '--lr', str(realsr), '--hr', str(realsr), '--out', str(out)]
    assert prep.main(args) == 0
    rec = json.loads((out / 'prepare.json').read_text())
    keys = sorted(p.stem for p in (out / 'LR').iterdir())
    assert keys == ['Canon_001', 'Canon_002', 'Nikon_001'] == sorted(p.stem for p in (out / 'HR').iterdir())
    assert {s['key'] for s in rec['skipped']} == {'Canon_003', 'Nikon_002'} and rec['unpaired'] == ['Nikon_009']
    assert 'upsampled LR' in next(s['reason'] for s in rec['skipped'] if s['key'] == 'Canon_003')
    for img in rec['images']:
        lr_src = cv2.imread(img['lr_src'], cv2.IMREAD_UNCHANGED)
        hr_src = cv2.imread(img['hr_src'], cv2.IMREAD_UNCHANGED)
        lh, lw = lr_src.shape[:2]
        top, left = (lh - 128) // 2, (lw - 128) // 2
        lr = cv2.imread(str(out / 'LR' / f"{img['key']}.png"), cv2.IMREAD_UNCHANGED)
        hr = cv2.imread(str(out / 'HR' / f"{img['key']}.png"), cv2.IMREAD_UNCHANGED)
        assert lr.shape == (128, 128, 3) and hr.shape == (512, 512, 3)
        assert np.array_equal(lr, lr_src[top:top + 128, left:left + 128])  # the exact pixels, lossless
        assert np.array_equal(hr, hr_src[4 * top:4 * top + 512, 4 * left:4 * left + 512])
        assert img['box'] == {'lr': [top, left, 128, 128], 'hr': [4 * top, 4 * left, 512, 512]}
    before = {p.name: p.stat().st_mtime_ns for p in (out / 'LR').iterdir()}
    assert prep.main(args) == 0  # the same command resumes: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in (out / 'LR').iterdir()} == before
    assert prep.main(args + ['--lr-size', '64']) == 2  # other settings refused
    assert prep.main(args + ['--lr-size', '64', '--force']) == 0  # ... or archived
    assert len(list(tmp_path.glob('RealSR-stablesr_archived_*'))) == 1
    assert cv2.imread(str(out / 'LR' / 'Nikon_002.png')).shape == (64, 64, 3)  # 100x140 LR fits 64 px crops


def test_drealsr_suffixes_and_full_realsr_v3(realsr, tmp_path, sample_paths):
    prep = load_script('prepare_testsets')
    d = tmp_path / 'DRealSR' / 'x4' / 'Test_x4'
    (d / 'test_LR').mkdir(parents=True)
    (d / 'test_HR').mkdir(parents=True)
    hr = _photo(sample_paths['val'][0], 576, 640)
    cv2.imwrite(str(d / 'test_HR' / 'DSC_1454_x1.png'), hr)
    cv2.imwrite(str(d / 'test_LR' / 'DSC_1454_x4.png'), cv2.resize(hr, (160, 144), interpolation=cv2.INTER_AREA))
    out = tmp_path / 'DRealSR-stablesr'
    assert prep.main(['--protocol', 'drealsr-stablesr', '--lr', str(d / 'test_LR'), '--hr', str(d / 'test_HR'),
                      '--out', str(out)]) == 0
    assert [p.name for p in (out / 'LR').iterdir()] == ['DSC_1454.png']
    assert cv2.imread(str(out / 'HR' / 'DSC_1454.png')).shape == (512, 512, 3)
    full = tmp_path / 'RealSR-v3-Canon'
    canon = realsr / 'Canon' / 'Test' / '4'
    assert prep.main(['--protocol', 'realsr-v3-full', '--lr', str(canon), '--hr', str(canon), '--out', str(full)]) == 0
    lr = cv2.imread(str(full / 'LR' / 'Canon_001.png'))
    hr = cv2.imread(str(full / 'HR' / 'Canon_001.png'))
    assert lr.shape == (140, 180, 3) and hr.shape == (560, 720, 3)  # the 2 extra HR rows mod-cropped
    assert prep.main(['--protocol', 'realsr-stablesr', '--hr', str(canon), '--out', str(tmp_path / 'x')]) == 2
    assert prep.main(['--protocol', 'nope', '--lr', str(canon), '--hr', str(canon), '--out', str(tmp_path / 'y')]) == 2


def test_synthetic_div2k_val_by_preset_records_seed_and_settings(tmp_path):
    from dalpsr.data.testset_presets import STABLESR_DEGRADATION, TESTSET_PRESETS
    prep = load_script('prepare_testsets')
    out = tmp_path / 'DIV2K-Val-stablesr'
    assert prep.main(['--protocol', 'div2k-val-3k-stablesr', '--hr', 'sample:val', '--out', str(out), '--num', '2']) == 0
    gen = json.loads((out / 'generate.json').read_text())
    assert gen['seed'] == 0 and gen['gt_size'] == 512 and gen['scale'] == 4 and gen['mode'] == 'test'
    assert all(gen['degradation'][k] == (list(v) if isinstance(v, (list, tuple)) else v)
               for k, v in STABLESR_DEGRADATION.items())
    preset = json.loads((out / 'preset.json').read_text())
    assert preset['preset'] == 'div2k-val-3k-stablesr' and preset['flags']['num'] == 2
    lr = sorted((out / 'LR').iterdir())
    assert len(lr) == 2 and cv2.imread(str(lr[0])).shape == (128, 128, 3)
    assert cv2.imread(str(out / 'GT' / lr[0].name)).shape == (512, 512, 3)
    # the same preset through generate_lq.py itself writes the same bytes (the seed is recorded, not drawn)
    glq = load_script('generate_lq')
    again = tmp_path / 'again'
    assert glq.main(['--preset', 'div2k-val-3k-stablesr', '--hr', 'sample:val', '--out', str(again), '--num', '2',
                     '--no-progress', '--quiet']) == 0
    assert [p.read_bytes() for p in sorted((again / 'LR').iterdir())] == [p.read_bytes() for p in lr]
    # a preset differs from the others where the papers differ
    assert TESTSET_PRESETS['div2k-val-3k-seesr']['degradation']['blur_sigma'] != STABLESR_DEGRADATION['blur_sigma']
    assert glq.main(['--preset', 'nope', '--out', str(tmp_path / 'z')]) == 2
