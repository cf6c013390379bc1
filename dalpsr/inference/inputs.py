"""Reading test inputs: LR files under the input rules, image keys, GT pairing.

Input rules (LR files; ``test.*`` options):

==================  =========================================================================
input               rule
==================  =========================================================================
not an image name   ignored (suffix not in dalpsr.utils.misc.IMG_EXTENSIONS), counted in the log
corrupt / not image status failed, message names the file and the decoder's complaint
grayscale           replicated to RGB (output is RGB)               note ``gray->rgb``
gray+alpha / RGBA   composited onto white (alpha dropped)           note ``alpha->white``
16-bit              scaled to [0,1] at full precision, output 8-bit note ``16bit->8bit output``
tiny                short side < ``test.min_size`` (16): status skipped
huge                h*w > ``test.max_lr_pixels`` (2048*2048): skipped, or with
                    ``test.huge: resize`` downscaled (area) to fit, note ``resized HxW->hxw``
same stem twice     (a.png, a.jpg) the later file's key becomes ``a_jpg``
==================  =========================================================================
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from dalpsr.utils.misc import scan_images


class InputRejected(Exception):
    """An LR file that breaks an input rule; ``status`` is 'skipped' or 'failed'."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def _header_size(path: Path) -> Optional[Tuple[int, int]]:
    """(h, w) from the file header without decoding the pixels (None if PIL cannot tell)."""
    try:
        from PIL import Image
        Image.MAX_IMAGE_PIXELS = None
        with Image.open(path) as im:
            w, h = im.size
        return int(h), int(w)
    except Exception:  # noqa: BLE001 - the decoder below gives the real message
        return None


def _quiet_decode(data: np.ndarray):
    """cv2.imdecode without OpenCV's own stderr lines for broken files (our message names the file)."""
    import cv2
    log = getattr(getattr(cv2, 'utils', None), 'logging', None)
    level = log.getLogLevel() if log is not None else None
    if log is not None:
        log.setLogLevel(log.LOG_LEVEL_SILENT)
    try:
        return cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    finally:
        if log is not None:
            log.setLogLevel(level)


def load_lr(path: Path, rules: Dict[str, Any]) -> Tuple[np.ndarray, List[str]]:
    """Read an LR file with the input rules (module doc) -> (RGB float32 HxWx3 in [0,1], notes).

    Raises :class:`InputRejected` (status + one-line message) for corrupt/tiny/huge inputs.
    """
    import cv2

    from dalpsr.utils.img_io import ImageReadError, to_rgb_float
    max_px, min_size = int(rules['max_lr_pixels']), int(rules['min_size'])
    hw = _header_size(path)
    if hw is not None and hw[0] * hw[1] > max_px and rules['huge'] == 'skip':
        raise InputRejected('skipped', f'{path}: {hw[0]}x{hw[1]} LR exceeds test.max_lr_pixels={max_px} '
                                       '(skipped; set test.huge: resize to downscale it, or raise the limit)')
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as err:
        raise InputRejected('failed', f'{path}: unreadable ({err.strerror or err})') from None
    if data.size == 0:
        raise InputRejected('failed', f'{path}: empty file')
    raw = _quiet_decode(data)
    if raw is None:
        raise InputRejected('failed', f'{path}: not a readable image (corrupt, truncated or not an image)')
    notes = []
    ch = 1 if raw.ndim == 2 else raw.shape[2]
    if ch in (1, 2):
        notes.append('gray->rgb')
    if ch in (2, 4):
        notes.append('alpha->white')
    if raw.dtype == np.uint16:
        notes.append('16bit->8bit output')
    elif raw.dtype in (np.float32, np.float64):
        notes.append('float->clipped [0,1]')
    try:
        img = to_rgb_float(raw, str(path))
    except ImageReadError as err:
        raise InputRejected('failed', str(err)) from None
    h, w = img.shape[:2]
    if min(h, w) < min_size:
        raise InputRejected('skipped', f'{path}: {h}x{w} LR is smaller than test.min_size={min_size} px on its '
                                       'short side (skipped)')
    if h * w > max_px:
        if rules['huge'] == 'skip':
            raise InputRejected('skipped', f'{path}: {h}x{w} LR exceeds test.max_lr_pixels={max_px} (skipped; set '
                                           'test.huge: resize to downscale it, or raise the limit)')
        f = math.sqrt(max_px / (h * w))
        nh, nw = max(min_size, int(h * f)), max(min_size, int(w * f))
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
        notes.append(f'resized {h}x{w}->{nh}x{nw}')
    return np.ascontiguousarray(img, dtype=np.float32), notes


def list_set_images(root: Path, recursive: bool) -> Tuple[List[Tuple[str, Path]], int]:
    """-> ([(key, path)], number of ignored non-image files). Key: path relative to ``root``
    without suffix (posix); a repeated key (a.png + a.jpg) becomes ``a_jpg`` for the later file."""
    paths = scan_images(root, recursive=recursive)
    it = root.rglob('*') if recursive else root.iterdir()
    known = set(paths)
    others = sum(1 for p in it if p.is_file() and not p.name.startswith('.') and p not in known)
    out, seen = [], set()
    for p in paths:
        key = p.relative_to(root).with_suffix('').as_posix()
        if key in seen:
            key = f'{key}_{p.suffix.lstrip(".").lower()}'
            n = 2
            while key in seen:
                key, n = f'{key}{n}', n + 1
        seen.add(key)
        out.append((key, p))
    return out, others


def gt_index(gt_root: Optional[str], recursive: bool) -> Dict[str, Path]:
    """GT key -> path; keys lose common suffixes (``_HR``, ``_x4``, ... see dalpsr.metrics.pairing)."""
    if not gt_root:
        return {}
    from dalpsr.metrics.pairing import DEFAULT_STRIP_SUFFIXES, strip_key
    root = Path(gt_root)
    out: Dict[str, Path] = {}
    for p in scan_images(root, recursive=recursive):
        rel = p.relative_to(root).with_suffix('')
        key = (rel.parent / strip_key(rel.name, DEFAULT_STRIP_SUFFIXES)).as_posix()
        out.setdefault(key, p)
    return out


def gt_key(key: str) -> str:
    from dalpsr.metrics.pairing import DEFAULT_STRIP_SUFFIXES, strip_key
    parent, _, name = key.rpartition('/')
    name = strip_key(name, DEFAULT_STRIP_SUFFIXES)
    return f'{parent}/{name}' if parent else name


def read_gt(path: Path, sr_hw: Tuple[int, int], modcrop: bool) -> Tuple[Optional[np.ndarray], Optional[str]]:
    from dalpsr.utils.img_io import ImageReadError, read_image
    try:
        gt = read_image(path)
    except ImageReadError as err:
        return None, f'GT unreadable: {err}'
    h, w = sr_hw
    if gt.shape[:2] != (h, w):
        if modcrop and h <= gt.shape[0] < h + 8 and w <= gt.shape[1] < w + 8:
            gt = gt[:h, :w]
        else:
            return None, f'GT {gt.shape[0]}x{gt.shape[1]} does not match SR {h}x{w}; full-reference metrics skipped'
    return gt, None
