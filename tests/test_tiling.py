"""Tiles: coverage, Gaussian blending without seams, tiled VAE with bounded tile sizes."""
import pytest
import torch

from dalpsr.pipelines.tiling import (blend_tiles, gaussian_weights, tile_boxes, tile_starts,
                                     tiled_vae_decode, tiled_vae_encode)



@pytest.mark.parametrize('size,tile,overlap,align', [(24, 16, 8, 1), (300, 96, 32, 1), (97, 96, 32, 1),
                                                     (2048, 1024, 128, 8), (96, 96, 32, 1), (50, 96, 32, 1),
                                                     (1000, 224, 32, 1)])
def test_tile_starts_cover_with_overlap(size, tile, overlap, align):
    starts = tile_starts(size, tile, overlap, align)
    t = min(tile, size)
    assert starts[0] == 0 and starts[-1] + t == size
    covered = torch.zeros(size, dtype=torch.bool)
    for s in starts:
        covered[s:s + t] = True
    assert covered.all()
    for a, b in zip(starts, starts[1:]):
        assert a + t - b >= overlap  # consecutive tiles overlap by at least `overlap`
    assert all(s % align == 0 for s in starts)


def test_tile_starts_rejects_bad_overlap():
    with pytest.raises(ValueError, match='overlap'):
        tile_starts(100, 32, 32)


def test_gaussian_weights_peak_centre_small_at_edges():
    w = gaussian_weights(32, 48)
    assert w.shape == (32, 48) and (w > 0).all()
    assert w.max() == pytest.approx(w[15:17, 23:25].max().item())
    assert w[0].max() < 0.05 and w[:, 0].max() < 0.05


def test_blend_of_agreeing_tiles_is_exact():
    x = torch.randn(2, 4, 50, 70)
    calls = []

    def fn(t, box):
        calls.append(tuple(t.shape[-2:]))
        return t * 2.0 + 1.0

    y = blend_tiles(fn, x, 24, 8)
    assert len(calls) == len(tile_boxes(50, 70, 24, 8)) > 1
    assert max(h * w for h, w in calls) <= 24 * 24
    assert torch.allclose(y, x * 2 + 1, atol=1e-5)


def test_blend_of_disagreeing_tiles_has_no_seams():
    """Each tile adds its own constant offset (worst case of tile disagreement): the blended
    output changes smoothly, never with a step at a tile border."""
    x = torch.zeros(1, 1, 1, 160)
    offsets = iter(range(10))

    def fn(t, box):
        return t + float(next(offsets))  # tile k adds k

    y = blend_tiles(fn, x, 96, 32)[0, 0, 0]
    steps = (y[1:] - y[:-1]).abs()
    assert y[0] == pytest.approx(0.0, abs=1e-4) and y[-1] == pytest.approx(1.0, abs=1e-4)
    assert steps.max() < 0.06  # a hard seam would be a jump of 1.0 (unblended) or >0.15 (sigma 0.1 Gaussian)


def _tiny_vae():
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 4,
                         up_block_types=('UpDecoderBlock2D',) * 4, block_out_channels=(8, 16, 16, 16),
                         latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=64).eval()


def _record_inputs(module):
    shapes = []
    h = module.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    return shapes, h


def _corr(a, b):
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


@torch.no_grad()
def test_tiled_vae_bounded_tiles_and_close_to_untiled():
    vae = _tiny_vae()
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 256), torch.linspace(-1, 1, 256), indexing='ij')
    img = torch.stack([torch.sin(3 * xx), torch.cos(2 * yy), xx * yy]).unsqueeze(0) * 0.8
    z_full = vae.encode(img).latent_dist.mean
    x_full = vae.decode(z_full).sample
    enc_shapes, h1 = _record_inputs(vae.encoder)
    dec_shapes, h2 = _record_inputs(vae.decoder)
    try:
        z_tiled = tiled_vae_encode(vae, img, tile=128, overlap=32)
        x_tiled = tiled_vae_decode(vae, z_full, tile=16, overlap=8)
    finally:
        h1.remove()
        h2.remove()
    assert z_tiled.shape == z_full.shape == (1, 4, 32, 32)
    assert x_tiled.shape == x_full.shape == (1, 3, 256, 256)
    # memory bound: no network call saw more than one tile (preview pass included)
    assert len(enc_shapes) > 2 and max(s[-2] * s[-1] for s in enc_shapes) <= 128 * 128
    assert len(dec_shapes) > 2 and max(s[-2] * s[-1] for s in dec_shapes) <= 16 * 16
    # a random tiny VAE is far less local than SD's, so only require clear agreement
    assert _corr(z_tiled, z_full) > 0.9
    assert _corr(x_tiled, x_full) > 0.5


@torch.no_grad()
def test_shared_groupnorm_preview_brings_encoder_tiles_closer():
    vae = _tiny_vae()
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 256), torch.linspace(-1, 1, 256), indexing='ij')
    img = torch.stack([torch.sin(3 * xx), torch.cos(2 * yy), xx * yy]).unsqueeze(0) * 0.8
    z_full = vae.encode(img).latent_dist.mean
    err = {m: (tiled_vae_encode(vae, img, 128, 32, shared_norm=m) - z_full).abs().mean().item()
           for m in ('preview', 'none')}
    assert err['preview'] < 0.75 * err['none']
    # the GroupNorm patches are removed afterwards: a plain call gives the original result again
    assert torch.equal(vae.encode(img).latent_dist.mean, z_full)
    with pytest.raises(ValueError, match='shared_norm'):
        tiled_vae_encode(vae, img, 128, 32, shared_norm='exact')


def test_tiled_vae_encode_needs_multiple_of_8():
    with pytest.raises(ValueError, match='multiples of 8'):
        tiled_vae_encode(_tiny_vae(), torch.zeros(1, 3, 30, 32))
