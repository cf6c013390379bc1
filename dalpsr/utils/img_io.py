"""Reading and writing images with documented rules for odd inputs.

``read_image`` always returns an RGB ``float32`` array in [0, 1] of shape (H, W, 3):

===================  =====================================================================
input                rule
===================  =====================================================================
grayscale (8/16 bit) replicated to 3 channels
gray + alpha, RGBA   alpha-composited onto a white background (alpha dropped)
16-bit               scaled by 1/65535 (full precision kept as float)
float TIFF/EXR       clipped to [0, 1]; refused if NaN/inf or not decoded identically twice
corrupt / truncated  :class:`ImageReadError` naming the file and the reason
not an image         :class:`ImageReadError`
===================  =====================================================================

EXIF orientation is not applied (files are read as stored). Writers are atomic (temporary
file + rename) so an interrupted run never leaves a half-written image behind.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import cv2
import numpy as np

from dalpsr.utils.misc import atomic_path

PathLike = Union[str, os.PathLike]


class ImageReadError(RuntimeError):
    """An image that cannot be decoded; ``str(err)`` names the file and the reason."""


def decode_file(path: PathLike) -> np.ndarray:
    """Decode a file as stored (cv2 ``IMREAD_UNCHANGED``: BGR/BGRA/gray, uint8/uint16/float).
    Raises ImageReadError (naming the file) when missing, empty or undecodable."""
    path = str(path)
    if not os.path.isfile(path):
        raise ImageReadError(f"{path}: file not found")
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise ImageReadError(f"{path}: empty file")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageReadError(f"{path}: not a readable image (corrupt, truncated or unsupported format)")
    if img.dtype.kind == 'f':
        # OpenCV decodes some float TIFFs (e.g. multi-page float64) from uninitialised memory:
        # a second decode must give the same bytes, and every value must be finite.
        again = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
        if again is None or again.shape != img.shape or again.tobytes() != img.tobytes():
            raise ImageReadError(f"{path}: float image decodes differently on each read "
                                 f"(OpenCV cannot read this TIFF reliably; convert it to PNG)")
        if not np.isfinite(img).all():
            raise ImageReadError(f"{path}: float image holds NaN/inf values")
    return img


def read_image(path: PathLike) -> np.ndarray:
    """Read any supported image as RGB float32 (H, W, 3) in [0, 1] (rules in module doc)."""
    return to_rgb_float(decode_file(path), str(path))


def to_rgb_float(img: np.ndarray, name: str = '<array>') -> np.ndarray:
    """Convert a decoded OpenCV array (BGR/BGRA/gray, any depth) to RGB float32 in [0, 1]."""
    if img.dtype == np.uint8:
        x = img.astype(np.float32) / 255.0
    elif img.dtype == np.uint16:
        x = img.astype(np.float32) / 65535.0
    elif img.dtype in (np.float32, np.float64):
        x = np.clip(img.astype(np.float32), 0.0, 1.0)
    else:
        raise ImageReadError(f"{name}: unsupported pixel type {img.dtype}")
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or x.shape[2] not in (1, 2, 3, 4):
        raise ImageReadError(f"{name}: unsupported shape {img.shape}")
    c = x.shape[2]
    if c in (2, 4):  # composite onto white
        alpha = x[:, :, -1:]
        color = x[:, :, :-1]
        x = color * alpha + (1.0 - alpha)
        c -= 1
    if c == 1:
        x = np.repeat(x, 3, axis=2)
    else:
        x = x[:, :, ::-1]  # BGR -> RGB
    return np.ascontiguousarray(x, dtype=np.float32)


def float_to_uint8(img: np.ndarray) -> np.ndarray:
    """RGB float [0, 1] -> uint8 with rounding."""
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_image(path: PathLike, img: np.ndarray, jpeg_quality: int = 95) -> None:
    """Atomically write an RGB image (uint8, or float in [0, 1]) as PNG/JPEG/...."""
    if img.dtype != np.uint8:
        img = float_to_uint8(img)
    if img.ndim == 3 and img.shape[2] == 3:
        img = img[:, :, ::-1]
    path = Path(path)
    params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if path.suffix.lower() in ('.jpg', '.jpeg') else []
    ok, buf = cv2.imencode(path.suffix or '.png', np.ascontiguousarray(img), params)
    if not ok:
        raise OSError(f"could not encode image for {path}")
    with atomic_path(path) as tmp:
        buf.tofile(str(tmp))


def img2tensor(img: np.ndarray):
    """(H, W, 3) float [0,1] -> torch (3, H, W) float32."""
    import torch
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()


def tensor2img(t) -> np.ndarray:
    """torch (3, H, W) or (1, 3, H, W) float [0,1] -> (H, W, 3) float32 numpy."""
    if t.dim() == 4:
        t = t[0]
    return t.detach().float().clamp(0, 1).cpu().numpy().transpose(1, 2, 0)
