"""The restorer contract of test.py: registry build, shapes, ranges, option errors."""
import pytest
import torch

from dalpsr.restorers import build_restorer
from dalpsr.utils.options import OptionError


def test_bicubic_restorer_upsamples_a_real_photo(sample_paths):
    from dalpsr.utils.img_io import img2tensor, read_image
    img = read_image(sample_paths['val'][0])[:48, :40]
    lq = img2tensor(img)[None]
    r = build_restorer({'type': 'Bicubic', 'scale': 4}, 'method in test')
    sr = r.restore(lq, seeds=[0])
    assert sr.shape == (1, 3, 192, 160) and sr.dtype == torch.float32
    assert float(sr.min()) >= 0 and float(sr.max()) <= 1
    # downscaling the result by area gives back (nearly) the input
    back = torch.nn.functional.interpolate(sr, scale_factor=0.25, mode='area')
    assert float((back - lq).abs().mean()) < 0.02
    assert r.describe() == {'type': 'Bicubic', 'scale': 4}


def test_restorer_block_errors_name_the_key():
    with pytest.raises(OptionError, match="unknown key 'scal'"):
        build_restorer({'type': 'Bicubic', 'scal': 4}, 'method in x.yml')
    with pytest.raises(OptionError, match='No object named'):
        build_restorer({'type': 'Bicubc'}, 'method in x.yml')
    with pytest.raises(ValueError, match='scale'):
        build_restorer({'type': 'Bicubic', 'scale': 0}, 'method in x.yml')
