"""DaLPSR sampler on tiny random SD parts: reproducibility, starts, schedulers, tiling, guidance."""
import types

import pytest
import torch

from dalpsr.pipelines import DaLPSRSampler, TileOptions
from dalpsr.pipelines.schedulers import build_scheduler



SD21_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                      prediction_type='epsilon', steps_offset=1, clip_sample=False, set_alpha_to_one=False,
                      skip_prk_steps=True, _class_name='PNDMScheduler')


def tiny_sd(mode: str = 'latent', seed: int = 0):
    """Tiny random SD parts + ControlNet (REFERENCE.md section 2 sizes), built in memory."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dalpsr.utils.clip_tokenizer import offline_clip_tokenizer
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                                up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), cross_attention_dim=32,
                                attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 4,
                        up_block_types=('UpDecoderBlock2D',) * 4, block_out_channels=(8, 16, 16, 16),
                        latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=64)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_hidden_layers=2, max_position_embeddings=77, bos_token_id=49406,
                                      eos_token_id=49407, pad_token_id=49407))
    if mode == 'latent':
        cn = ControlNetModel.from_unet(unet, conditioning_channels=4, conditioning_embedding_out_channels=(16,))
    else:
        cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    comps = types.SimpleNamespace(vae=vae, unet=unet, text_encoder=te, tokenizer=offline_clip_tokenizer(),
                                  scheduler_config=dict(SD21_SCHEDULER))
    return comps, cn


@pytest.fixture(scope='module')
def sampler():
    comps, cn = tiny_sd('latent')
    return DaLPSRSampler(comps, cn, device='cpu')


@pytest.fixture(scope='module')
def lq():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 6, 8, generator=g)
    return torch.nn.functional.interpolate(x, size=(24, 32), mode='bilinear', align_corners=False)


def test_output_shape_range_and_same_seed_identical(sampler, lq):
    kw = dict(prompts='a cat', num_steps=2, scheduler='ddpm', seed=7)
    a = sampler(lq, **kw)
    b = sampler(lq, **kw)
    c = sampler(lq, **{**kw, 'seed': 8})
    assert a.shape == (1, 3, 96, 128) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_per_image_seed_independent_of_batch(sampler, lq):
    lq2 = torch.cat([lq, lq.flip(-1)])
    both = sampler(lq2, prompts=['a cat', 'a dog'], num_steps=2, scheduler='ddpm', seed=[3, 4])
    one = sampler(lq2[1:], prompts='a dog', num_steps=2, scheduler='ddpm', seed=4)
    assert torch.allclose(both[1:], one, atol=1e-4)


@pytest.mark.parametrize('name', ['ddpm', 'ddim', 'dpmsolver++', 'unipc'])
def test_every_scheduler_runs_and_counts_steps(sampler, lq, name):
    out = sampler(lq, 'x', num_steps=3, scheduler=name, seed=0, color_fix='none')
    assert out.shape == (1, 3, 96, 128) and torch.isfinite(out).all()
    assert sampler.last_stats['unet_calls'] == 3 == len(sampler.last_stats['timesteps'])


def test_build_scheduler_takes_sd_config_and_rejects_unknown():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
    s = build_scheduler('DPM++', SD21_SCHEDULER)
    assert isinstance(s, DPMSolverMultistepScheduler) and s.config.algorithm_type == 'dpmsolver++'
    assert s.config.beta_schedule == 'scaled_linear' and s.config.beta_end == 0.012
    assert isinstance(build_scheduler('ddim', SD21_SCHEDULER, {'timestep_spacing': 'trailing'}), DDIMScheduler)
    with pytest.raises(ValueError, match='unknown scheduler'):
        build_scheduler('heun9', SD21_SCHEDULER)


def test_start_step_truncates_schedule(sampler, lq):
    sampler(lq, 'x', num_steps=5, scheduler='ddim', start='lr', start_step=500, seed=0, output='latent')
    ts = sampler.last_stats['timesteps']
    assert ts and max(ts) <= 500 and len(ts) < 5 and sampler.last_stats['unet_calls'] == len(ts)
    with pytest.raises(ValueError, match='start_step'):
        sampler(lq, 'x', num_steps=2, start='lr', start_step=1000)


def test_noise_guidance_replaces_first_prediction_with_lr_direction(sampler, lq):
    """DeeDSR noise guidance: from pure noise x_T, the first prediction is
    eps = (x_T - sqrt(a_T) z_lr) / sqrt(1 - a_T) instead of the UNet's, so DDIM's x0 estimate is
    z_lr and one DDIM step from t=999 lands on sqrt(a_0) z_lr + sqrt(1 - a_0) eps."""
    kw = dict(num_steps=1, scheduler='ddim', seed=5, scheduler_overrides={'timestep_spacing': 'trailing'},
              output='latent')
    lat = sampler(lq, 'x', start='noise_guidance', **kw)
    assert sampler.last_stats['timesteps'] == [999] and sampler.last_stats['unet_calls'] == 0
    z_lr = sampler.encode_lr(sampler._pad(sampler.upsample(lq)), TileOptions())
    noise = torch.randn((1,) + tuple(z_lr.shape[1:]), generator=torch.Generator().manual_seed(5))
    acp = build_scheduler('ddim', SD21_SCHEDULER).alphas_cumprod.double()
    a_t, a_0 = acp[999], acp[0]  # set_alpha_to_one=False: the final "previous" alpha is alphas_cumprod[0]
    eps = (noise.double() - a_t.sqrt() * z_lr.double()) / (1 - a_t).sqrt()
    expect = a_0.sqrt() * z_lr.double() + (1 - a_0).sqrt() * eps
    assert torch.allclose(lat.double(), expect, atol=1e-4)
    plain = sampler(lq, 'x', start='noise', **kw)  # the UNet's own prediction gives something else
    assert sampler.last_stats['unet_calls'] == 1 and not torch.allclose(plain, lat, atol=1e-3)


def test_classifier_free_guidance_is_batched(sampler, lq):
    sizes = []
    h = sampler.unet.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
    try:
        sampler(lq, 'x', num_steps=1, guidance_scale=5.5, seed=0)
        sampler(lq, 'x', num_steps=1, guidance_scale=1.0, seed=0)
    finally:
        h.remove()
    assert sizes == [2, 1]


def test_guidance_and_negative_prompt_change_the_result(sampler, lq):
    base = dict(num_steps=2, scheduler='ddim', seed=0, color_fix='none')
    a = sampler(lq, 'a photo of a cat', negative_prompt='blur', guidance_scale=5.5, **base)
    b = sampler(lq, 'a photo of a cat', negative_prompt='noise, lowres', guidance_scale=5.5, **base)
    c = sampler(lq, 'a photo of a cat', negative_prompt='blur', guidance_scale=1.0, **base)
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_image_condition_mode(lq):
    comps, cn = tiny_sd('image')
    s = DaLPSRSampler(comps, cn, device='cpu')
    assert s.condition_mode == 'image'
    out = s(lq, 'x', num_steps=2, seed=0)
    assert out.shape == (1, 3, 96, 128)


def test_tiled_latents_match_untiled_without_seams(sampler):
    """A latent larger than the tile is processed in Gaussian-blended tiles: no UNet call sees
    more than one tile, and the result stays close to the untiled run, also in the overlaps."""
    g = torch.Generator().manual_seed(1)
    lq = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 6, generator=g), size=(48, 48), mode='bilinear',
                                         align_corners=False)  # -> 192 px, latent 24 x 24
    kw = dict(prompts='x', num_steps=2, scheduler='ddim', seed=0, color_fix='none')
    full = sampler(lq, tile={'latent_size': 64}, **kw)
    assert sampler.last_stats['max_latent_tile'] == (24, 24)
    tiled = sampler(lq, tile={'latent_size': 16, 'latent_overlap': 8}, **kw)
    assert sampler.last_stats['max_latent_tile'] == (16, 16)
    assert sampler.last_stats['unet_calls'] == 2 * 4  # 2 x 2 tiles per step
    diff = (tiled - full).abs()[0].mean(0)  # [192, 192]
    overlap = diff[:, 64:128]  # latent columns 8..16 are covered by two tiles
    assert overlap.mean() < 0.05 and diff.mean() < 0.05
    # no seam: the column-to-column change at a tile border is like the change elsewhere
    cols = (tiled[0, :, :, 1:] - tiled[0, :, :, :-1]).abs().mean(dim=(0, 1))  # [191]
    for border in (63, 127):  # pixel columns where a tile starts/ends
        assert cols[border] < 3 * cols.median() + 0.01


def test_large_input_memory_bounded_by_tiles(sampler):
    """64 x 64 LR -> 256 x 256 with small tiles: UNet, VAE encoder and decoder only ever see
    one tile (the memory of the network calls is bounded by the tile size, not the image)."""
    from dalpsr.pipelines.tiling import tile_boxes
    seen = {'unet': [], 'enc': [], 'dec': []}
    hooks = [sampler.unet.register_forward_pre_hook(lambda m, a: seen['unet'].append(tuple(a[0].shape))),
             sampler.vae.encoder.register_forward_pre_hook(lambda m, a: seen['enc'].append(tuple(a[0].shape))),
             sampler.vae.decoder.register_forward_pre_hook(lambda m, a: seen['dec'].append(tuple(a[0].shape)))]
    lq = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    try:
        out = sampler(lq, 'x', num_steps=1, scheduler='ddim', seed=0, guidance_scale=1.0,
                      tile={'latent_size': 16, 'latent_overlap': 8, 'vae_encoder_tile': 128,
                            'vae_encoder_overlap': 32, 'vae_decoder_tile': 16, 'vae_decoder_overlap': 8})
    finally:
        for h in hooks:
            h.remove()
    assert out.shape == (1, 3, 256, 256)
    assert len(seen['unet']) == len(tile_boxes(32, 32, 16, 8)) > 1
    assert max(s[-2] * s[-1] for s in seen['unet']) <= 16 * 16
    assert len(seen['enc']) > 2 and max(s[-2] * s[-1] for s in seen['enc']) <= 128 * 128
    assert len(seen['dec']) > 2 and max(s[-2] * s[-1] for s in seen['dec']) <= 16 * 16


def test_odd_sizes_are_padded_and_cropped(sampler):
    lq = torch.rand(1, 3, 13, 21)
    out = sampler(lq, 'x', num_steps=1, seed=0)
    assert out.shape == (1, 3, 52, 84)


def test_bad_arguments_fail_clearly(sampler, lq):
    with pytest.raises(ValueError, match=r'\[B, 3, h, w\]'):
        sampler(lq[0], 'x')
    with pytest.raises(ValueError, match='start must be one of'):
        sampler(lq, 'x', start='lr_init')
    with pytest.raises(ValueError, match='one per image'):
        sampler(lq, ['a', 'b'])
    with pytest.raises(ValueError, match="unknown tile option 'latent_tile'"):
        sampler(lq, 'x', tile={'latent_tile': 64})
    with pytest.raises(ValueError, match='color_fix'):
        sampler(lq, 'x', color_fix='hist')
