"""Image reading rules (gray, RGBA, 16-bit, corrupt, tiny, non-image) and atomic writes."""
import os

import cv2
import numpy as np
import pytest
import torch

from dalpsr.utils import img_io
from dalpsr.utils.img_io import ImageReadError, img2tensor, read_image, tensor2img, write_image


def _png(path, arr):
    assert cv2.imwrite(str(path), arr)
    return path


def test_rgb_8bit_is_rgb_order(tmp_path):
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 0] = 255  # blue in OpenCV's order
    img = read_image(_png(tmp_path / 'b.png', bgr))
    assert img.shape == (4, 5, 3) and img.dtype == np.float32
    assert np.all(img[..., 2] == 1.0) and np.all(img[..., :2] == 0.0)


def test_gray_replicated(tmp_path):
    g = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    img = read_image(_png(tmp_path / 'g.png', g))
    assert img.shape == (3, 4, 3)
    assert np.allclose(img[..., 0], g / 255.0) and np.array_equal(img[..., 0], img[..., 2])


def test_rgba_composited_on_white(tmp_path):
    bgra = np.zeros((2, 2, 4), np.uint8)
    bgra[0, 0] = (0, 0, 0, 255)    # opaque black
    bgra[0, 1] = (0, 0, 0, 0)      # transparent -> white
    bgra[1, 0] = (0, 0, 0, 128)    # half -> grey
    img = read_image(_png(tmp_path / 'a.png', bgra))
    assert img.shape == (2, 2, 3)
    assert np.allclose(img[0, 0], 0) and np.allclose(img[0, 1], 1)
    assert np.allclose(img[1, 0], 1 - 128 / 255, atol=1e-6)


def test_16bit_full_precision(tmp_path):
    v = np.array([[0, 1, 65535, 30000]], np.uint16)
    img = read_image(_png(tmp_path / 's.png', v))
    assert np.allclose(img[0, :, 0], v[0] / 65535.0)
    assert img[0, 1, 0] > 0  # 1/65535 survives (no 8-bit rounding)
    rgb16 = np.full((2, 2, 3), 40000, np.uint16)
    assert np.allclose(read_image(_png(tmp_path / 'c.png', rgb16)), 40000 / 65535)


def test_tiny_image(tmp_path):
    img = read_image(_png(tmp_path / 't.png', np.full((1, 1, 3), 7, np.uint8)))
    assert img.shape == (1, 1, 3) and np.allclose(img, 7 / 255)


def test_corrupt_empty_missing_and_non_image(tmp_path):
    good = _png(tmp_path / 'ok.png', np.zeros((32, 32, 3), np.uint8))
    data = good.read_bytes()
    (tmp_path / 'trunc.png').write_bytes(data[:len(data) // 3])
    (tmp_path / 'empty.png').write_bytes(b'')
    (tmp_path / 'notes.png').write_text('this is not an image')
    for name, why in [('trunc.png', 'not a readable image'), ('empty.png', 'empty file'),
                      ('notes.png', 'not a readable image'), ('missing.png', 'not found')]:
        with pytest.raises(ImageReadError) as err:
            read_image(tmp_path / name)
        msg = str(err.value)
        assert name in msg and why in msg and '\n' not in msg


def test_write_roundtrip_and_atomic(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    img = rng.random((6, 7, 3)).astype(np.float32)
    out = tmp_path / 'sub' / 'x.png'
    write_image(out, img)
    back = read_image(out)
    assert np.abs(back - img).max() <= 0.5 / 255 + 1e-6
    # a failure while writing leaves the earlier file intact and no temporary file behind
    before = out.read_bytes()
    real_encode = cv2.imencode

    class Buf:  # an encoded buffer whose write dies half-way
        def __init__(self, b):
            self.b = b

        def tofile(self, path):
            with open(path, 'wb') as f:
                f.write(self.b[:10])
            raise OSError('disk full')
    monkeypatch.setattr(img_io.cv2, 'imencode', lambda ext, a, p: (True, Buf(real_encode(ext, a, p)[1].tobytes())))
    with pytest.raises(OSError, match='disk full'):
        write_image(out, np.zeros((6, 7, 3), np.float32))
    assert out.read_bytes() == before
    assert sorted(os.listdir(out.parent)) == ['x.png']


def test_tensor_conversions():
    img = np.random.default_rng(1).random((4, 5, 3)).astype(np.float32)
    t = img2tensor(img)
    assert t.shape == (3, 4, 5) and t.dtype == torch.float32
    assert np.array_equal(tensor2img(t[None]), img)
    assert tensor2img(torch.full((3, 2, 2), 2.0)).max() == 1.0


def test_float_tiff_rules(tmp_path, monkeypatch):
    import cv2
    good = np.linspace(-0.5, 1.5, 4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    p = tmp_path / 'f.tif'
    assert cv2.imwrite(str(p), good)
    x = read_image(p)  # float: clipped to [0, 1], BGR -> RGB
    assert np.array_equal(x, np.clip(good[:, :, ::-1], 0, 1))
    bad = good.copy()
    bad[1, 2, 0] = np.nan
    q = tmp_path / 'nan.tif'
    assert cv2.imwrite(str(q), bad)
    with pytest.raises(ImageReadError, match='NaN'):
        read_image(q)
    # a decoder that returns other bytes on the second call (OpenCV on multi-page float64 TIFFs)
    real = cv2.imdecode
    calls = []

    def flaky(buf, flags):
        out = real(buf, flags)
        calls.append(1)
        return out + len(calls) if out is not None and out.dtype.kind == 'f' else out
    monkeypatch.setattr(cv2, 'imdecode', flaky)
    with pytest.raises(ImageReadError, match='decodes differently'):
        read_image(p)
