"""The shared denoising loop around a method's denoiser (dalpsr.pipelines.loop / denoiser):
what predict() receives under CFG and latent tiling, eta, start modes and per-stage timing."""
import pytest
import torch

from dalpsr.pipelines import Conditions, Denoiser, DenoisingLoop, SamplingSettings
from tests.unchanged_reference import SD21_SCHEDULER


def tiny_vae():
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 4,
                         up_block_types=('UpDecoderBlock2D',) * 4, block_out_channels=(8, 8, 8, 8),
                         latent_channels=4, layers_per_block=1, norm_num_groups=4, sample_size=32)


class Recorder(Denoiser):
    """Output = a fixed mix of x_t, the 'text' condition's mean and the cropped spatial map."""

    def __init__(self):
        self.calls = []

    def predict(self, x_t, t, c):
        self.calls.append({'n': x_t.shape[0], 'hw': tuple(x_t.shape[-2:]), 'box': c.box, 'branches': c.branches,
                           'text': c['text'].clone(), 'tokens': c['tokens'].clone(), 'map': c['map'].clone(),
                           'full': c.full['map'], 't': int(t)})
        return 0.5 * x_t + c['text'].mean(dim=(1, 2))[:, None, None, None] + 0.1 * c['map'][:, :1, ::8, ::8]


@pytest.fixture(scope='module')
def loop():
    return DenoisingLoop(tiny_vae(), SD21_SCHEDULER, scale=4, device='cpu', pad_multiple=64)


def _conditions(lr, b=1):
    pos = torch.full((b, 3, 8), 1.0)
    neg = torch.full((b, 3, 8), -1.0)
    tokens = torch.arange(b * 2 * 8, dtype=torch.float32).reshape(b, 2, 8)
    return Conditions(cond={'text': pos}, uncond={'text': neg}, shared={'tokens': tokens, 'w': 0.3},
                      spatial={'map': lr.x_pad})  # ratio 8 to the latent


def test_cfg_batches_uncond_first_and_repeats_shared_and_spatial(loop):
    rec = Recorder()
    lq = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = loop(lq, rec, lambda lr: _conditions(lr, 2), seeds=[1, 2],
               settings={'num_steps': 2, 'scheduler': 'ddim', 'guidance_scale': 3.0, 'color_fix': 'none'})
    assert out.shape == (2, 3, 32, 32) and len(rec.calls) == 2 == loop.last_stats['unet_calls']
    c = rec.calls[0]
    assert c['n'] == 4 and c['branches'] == 2 and c['box'] == (0, 0, 8, 8)
    assert torch.equal(c['text'][:2], torch.full((2, 3, 8), -1.0)) and torch.equal(c['text'][2:], torch.ones(2, 3, 8))
    assert torch.equal(c['tokens'][:2], c['tokens'][2:]) and torch.equal(c['map'][:2], c['map'][2:])
    for k in ('encode_s', 'denoise_s', 'decode_s'):
        assert loop.last_stats[k] > 0


def test_latent_tiles_get_their_box_and_cropped_maps(loop):
    """With latent tiling each predict call gets its tile box (latent px) and the spatial maps
    cropped to it (times the map's ratio); the whole maps stay in conditions.full (DeeDSR's
    adapter computes per-tile maps from them)."""
    rec = Recorder()
    lq = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(1))  # -> 96 px -> pad 128 -> latent 16
    loop(lq, rec, _conditions, seeds=[0], settings={'num_steps': 1, 'scheduler': 'ddim', 'guidance_scale': 1.0,
                                                     'tile': {'latent_size': 10, 'latent_overlap': 4}},
         output='latent')
    boxes = [c['box'] for c in rec.calls]
    assert len(boxes) == 4 and all(c['n'] == 1 and c['branches'] == 1 for c in rec.calls)
    for c in rec.calls:
        top, left, h, w = c['box']
        assert c['hw'] == (h, w) == (10, 10)
        assert torch.equal(c['map'], c['full'][..., top * 8:(top + h) * 8, left * 8:(left + w) * 8])
    assert sorted({b[0] for b in boxes}) == [0, 6] and sorted({b[1] for b in boxes}) == [0, 6]


def test_eta_reaches_ddim_and_seeds_make_it_reproducible(loop):
    lq = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    kw = {'num_steps': 3, 'scheduler': 'ddim', 'guidance_scale': 1.0, 'start': 'noise'}
    run = lambda s, seed=0: loop(lq, Recorder(), _conditions, seeds=[seed], settings=s, output='latent')  # noqa: E731
    a0, a1 = run(kw), run({**kw, 'eta': 1.0})
    assert not torch.allclose(a0, a1)
    assert torch.equal(a1, run({**kw, 'eta': 1.0})) and not torch.equal(a1, run({**kw, 'eta': 1.0}, seed=1))


def test_settings_reject_unknown_and_bad_values():
    with pytest.raises(ValueError, match="unknown sampling setting 'steps'"):
        SamplingSettings.from_opt({'steps': 3})
    with pytest.raises(ValueError, match='start must be one of'):
        SamplingSettings(start='lr_init')
    with pytest.raises(ValueError, match='eta must be >= 0'):
        SamplingSettings(eta=-1)
    with pytest.raises(ValueError, match="unknown 'heun9'"):
        SamplingSettings.check_scheduler_name('heun9')


def test_spatial_map_must_align_with_the_latent():
    c = Conditions(cond={'text': torch.zeros(1, 2, 3)}, spatial={'m': torch.zeros(1, 1, 12, 12)})
    with pytest.raises(ValueError, match="spatial condition 'm'"):
        c.for_step(False, (8, 8))
    with pytest.raises(KeyError, match="no condition 'x'"):
        c['x']
