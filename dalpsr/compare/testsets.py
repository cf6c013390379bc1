"""Test sets the papers' way from what a user downloads (``scripts/prepare_testsets.py``).

==================  ==========================================================================
protocol            what is written to ``<out>/LR`` and ``<out>/HR`` (same file names = keys)
==================  ==========================================================================
realsr-stablesr     RealSR (V3) x4 test pairs (``*_LR4`` / ``*_HR``): the 128 px centre crop of
                    each LR and the 512 px HR crop at 4x its position (StableSR's protocol, also
                    SeeSR, DaLPSR, SSP-IR, DeeDSR)
drealsr-stablesr    the same for DRealSR x4 test pairs (``*_x4`` / ``*_x1``)
realsr-v3-full      RealSR (V3) x4 test pairs as whole images (DePLSR); an HR up to ``scale - 1``
                    px larger than ``scale`` x LR is cut to it (mod-crop)
==================  ==========================================================================

The synthetic DIV2K-Val sets are presets of ``scripts/generate_lq.py`` (dalpsr/data/testset_presets.py);
``prepare_testsets.py --protocol div2k-val-...`` runs that preset. LR and HR are paired by key: the file
stem with the protocol's suffix removed (case-insensitive; files found recursively, so RealSR's
``Canon/Test/4`` and ``Nikon/Test/4`` are one set). Each crop box is recorded in ``prepare.json``
with the protocol and the sources; an LR smaller than the crop is skipped with its reason. The
folder rule of dalpsr.utils.experiment applies: the same command resumes (existing outputs are kept),
other settings are refused, ``force`` archives. Outputs are written atomically.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from dalpsr.utils.experiment import prepare_folder
from dalpsr.utils.misc import atomic_write_json, get_time_str

CROP_PROTOCOLS: Dict[str, Dict[str, Any]] = {
    'realsr-stablesr': {'mode': 'crop', 'lr_suffix': '_lr4', 'hr_suffix': '_hr', 'lr_size': 128,
                        'what': 'RealSR (V3) x4 test: LR 128 px centre crops, HR 512 px (StableSR)'},
    'drealsr-stablesr': {'mode': 'crop', 'lr_suffix': '_x4', 'hr_suffix': '_x1', 'lr_size': 128,
                         'what': 'DRealSR x4 test: LR 128 px centre crops, HR 512 px (StableSR)'},
    'realsr-v3-full': {'mode': 'full', 'lr_suffix': '_lr4', 'hr_suffix': '_hr', 'lr_size': None,
                       'what': 'RealSR (V3) x4 test: whole images (DePLSR)'},
}
RECORD = 'prepare.json'
IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')


def _index(folder: str, suffix: str) -> Tuple[Dict[str, Path], List[str]]:
    """{key: path} of the images under ``folder`` whose stem ends with ``suffix`` (case-insensitive;
    every image when ``suffix`` is empty), and the keys found twice."""
    out: Dict[str, Path] = {}
    twice: List[str] = []
    for p in sorted(Path(folder).rglob('*')):
        if not p.is_file() or p.suffix.lower() not in IMAGE_EXTS or p.name.startswith('.'):
            continue
        stem = p.stem
        if suffix:
            if not stem.lower().endswith(suffix.lower()) or len(stem) == len(suffix):
                continue
            stem = stem[:-len(suffix)]
        if stem in out:
            twice.append(stem)
        out[stem] = p
    return out, twice


def _write_as_read(path: Path, img) -> None:
    """PNG of the pixels as decoded (channel order and bit depth kept: no conversion), atomically."""
    import cv2
    import numpy as np

    from dalpsr.utils.misc import atomic_path
    with atomic_path(path) as tmp:
        ok, buf = cv2.imencode('.png', np.ascontiguousarray(img))
        if not ok:
            raise ValueError(f'{path}: the image could not be encoded as PNG')
        Path(tmp).write_bytes(buf.tobytes())


def centre_box(lr_hw: Tuple[int, int], size: int) -> Tuple[int, int]:
    """(top, left) of the ``size`` x ``size`` centre crop of an LR of ``lr_hw`` (floor of the margins)."""
    return (lr_hw[0] - size) // 2, (lr_hw[1] - size) // 2


def prepare_testset(protocol: str, lr_dir: str, hr_dir: str, out_dir: str, scale: int = 4,
                    lr_size: Optional[int] = None, lr_suffix: Optional[str] = None, hr_suffix: Optional[str] = None,
                    force: bool = False) -> Dict[str, Any]:
    """Write the test set of ``protocol`` (a key of :data:`CROP_PROTOCOLS`) from the paired LR/HR
    folders into ``out_dir/LR`` and ``out_dir/HR``. Returns the record written to prepare.json.
    Raises ValueError / FileNotFoundError / FileExistsError with one-line messages."""
    from dalpsr.utils.img_io import decode_file
    if protocol not in CROP_PROTOCOLS:
        raise ValueError(f"unknown protocol '{protocol}' (known: {', '.join(CROP_PROTOCOLS)})")
    spec = dict(CROP_PROTOCOLS[protocol])
    lr_suffix = spec['lr_suffix'] if lr_suffix is None else lr_suffix
    hr_suffix = spec['hr_suffix'] if hr_suffix is None else hr_suffix
    lr_size = spec['lr_size'] if lr_size is None else int(lr_size)
    for what, d in (('--lr', lr_dir), ('--hr', hr_dir)):
        if not Path(d).is_dir():
            raise FileNotFoundError(f'{what} {d}: no such folder')
    lrs, lr_twice = _index(lr_dir, lr_suffix)
    hrs, hr_twice = _index(hr_dir, hr_suffix)
    if lr_twice or hr_twice:
        raise ValueError(f'two files share the key {(lr_twice or hr_twice)[0]!r} (sub-folders of one set must '
                         'not repeat a name)')
    keys = sorted(set(lrs) & set(hrs))
    if not keys:
        raise ValueError(f"no LR/HR pairs: no key of {lr_dir} (*{lr_suffix}) matches one of {hr_dir} (*{hr_suffix})")
    fingerprint = {'protocol': protocol, 'lr_dir': str(Path(lr_dir).resolve()), 'hr_dir': str(Path(hr_dir).resolve()),
                   'scale': int(scale), 'lr_size': lr_size, 'lr_suffix': lr_suffix, 'hr_suffix': hr_suffix}
    out = Path(out_dir)
    prepare_folder(out, fingerprint, force, record=RECORD, extra={'created': get_time_str()},
                   content='a test set', advice='')
    (out / 'LR').mkdir(exist_ok=True)
    (out / 'HR').mkdir(exist_ok=True)
    images, skipped = [], []
    for key in keys:
        lr_out, hr_out = out / 'LR' / f'{key}.png', out / 'HR' / f'{key}.png'
        lr, hr = decode_file(str(lrs[key])), decode_file(str(hrs[key]))
        (lh, lw), (hh, hw) = lr.shape[:2], hr.shape[:2]
        if not (scale * lh <= hh < scale * (lh + 1) and scale * lw <= hw < scale * (lw + 1)):
            why = (f'HR {hh}x{hw} is not x{scale} of LR {lh}x{lw}'
                   + (' (LR on the HR grid: an upsampled LR, not this protocol)' if (lh, lw) == (hh, hw) else ''))
            skipped.append({'key': key, 'reason': why})
            continue
        if spec['mode'] == 'crop':
            if min(lh, lw) < lr_size:
                skipped.append({'key': key, 'reason': f'LR {lh}x{lw} is smaller than the {lr_size} px crop'})
                continue
            top, left = centre_box((lh, lw), lr_size)
            box = {'lr': [top, left, lr_size, lr_size], 'hr': [scale * top, scale * left, scale * lr_size,
                                                                scale * lr_size]}
        else:
            box = {'lr': [0, 0, lh, lw], 'hr': [0, 0, scale * lh, scale * lw]}
        if not (lr_out.is_file() and hr_out.is_file()):
            (t, l, h, w), (T, L, H, W) = box['lr'], box['hr']
            _write_as_read(hr_out, hr[T:T + H, L:L + W])
            _write_as_read(lr_out, lr[t:t + h, l:l + w])
        images.append({'key': key, 'lr_src': str(lrs[key]), 'hr_src': str(hrs[key]), 'lr_size': [lh, lw],
                       'hr_size': [hh, hw], 'box': box})
    unpaired = sorted(set(lrs) ^ set(hrs))
    record = {'fingerprint': fingerprint, 'protocol_text': spec['what'], 'created': get_time_str(),
              'images': images, 'skipped': skipped, 'unpaired': unpaired,
              'counts': {'written': len(images), 'skipped': len(skipped), 'unpaired': len(unpaired)}}
    atomic_write_json(out / RECORD, record)
    return record
