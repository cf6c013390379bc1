"""SD parts: the tiny stand-in is written in diffusers layout and loads through the same path as
real weights; missing files give one-line messages naming the file."""
import os
import shutil

import pytest
import torch

from dalpsr.archs.sd_components import (SDLoadError, build_tiny_sd, decode_latents, encode_images,
                                        load_sd_components)


@pytest.fixture(scope='module')
def tiny_sd(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp('sd') / 'tiny_sd', seed=0)


def test_tiny_sd_layout_and_load(tiny_sd):
    for sub in ('unet', 'vae', 'text_encoder', 'tokenizer', 'scheduler'):
        assert os.path.isdir(os.path.join(tiny_sd, sub)), sub
    assert os.path.isfile(os.path.join(tiny_sd, 'model_index.json'))
    c = load_sd_components({'pretrained': tiny_sd})
    assert type(c.unet).__name__ == 'UNet2DConditionModel'
    assert type(c.vae).__name__ == 'AutoencoderKL'
    assert type(c.text_encoder).__name__ == 'CLIPTextModel'
    assert type(c.noise_scheduler).__name__ == 'DDPMScheduler'
    assert c.vae_scale_factor == 8
    assert c.prediction_type == 'epsilon'
    assert c.scheduler_config['beta_schedule'] == 'scaled_linear'
    assert c.tokenizer.model_max_length == 77 and len(c.tokenizer) == 49408
    ids = c.tokenizer(['a photo'], padding='max_length', max_length=77, return_tensors='pt').input_ids
    assert ids[0, 0].item() == 49406 and ids.shape == (1, 77)
    hidden = c.text_encoder(ids).last_hidden_state
    assert hidden.shape == (1, 77, c.unet.config.cross_attention_dim)
    assert c.source['pretrained'] == tiny_sd
    # frozen after freeze()
    c.freeze()
    assert not any(p.requires_grad for m in (c.vae, c.unet, c.text_encoder) for p in m.parameters())


def test_tiny_sd_is_deterministic_and_refuses_overwrite(tiny_sd, tmp_path):
    a = load_sd_components({'pretrained': tiny_sd}).unet.state_dict()
    other = build_tiny_sd(tmp_path / 'other', seed=0)
    b = load_sd_components({'pretrained': other}).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileExistsError, match='refusing'):
        build_tiny_sd(tmp_path / 'other', seed=1)
    build_tiny_sd(tmp_path / 'other', seed=1, overwrite=True)
    c = load_sd_components({'pretrained': other}).unet.state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_vae_helpers_shapes_and_range(tiny_sd):
    c = load_sd_components({'pretrained': tiny_sd})
    x = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        z = encode_images(c.vae, x)
        y = decode_latents(c.vae, z)
        mean = c.vae.encode(x * 2 - 1).latent_dist.mean
    assert z.shape == (2, 4, 8, 6)
    torch.testing.assert_close(z, mean * c.vae.config.scaling_factor)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1


def test_dtype_and_per_part_override(tiny_sd, tmp_path):
    c = load_sd_components({'pretrained': tiny_sd, 'dtype': 'bf16'})
    assert c.unet.dtype == torch.bfloat16 and c.vae.dtype == torch.bfloat16
    assert c.text_encoder.dtype == torch.bfloat16
    # a separate UNet folder overrides the one in `pretrained`
    other = build_tiny_sd(tmp_path / 'other', seed=5)
    c2 = load_sd_components({'pretrained': tiny_sd, 'unet': os.path.join(other, 'unet')})
    ref = load_sd_components({'pretrained': other})
    sd2, sdr = c2.unet.state_dict(), ref.unet.state_dict()
    assert all(torch.equal(sd2[k], sdr[k]) for k in sdr)
    with pytest.raises(ValueError, match='dtype'):
        load_sd_components({'pretrained': tiny_sd, 'dtype': 'fp8'})


def test_missing_files_give_one_line_messages(tiny_sd, tmp_path):
    from dalpsr.utils.options import OptionError
    broken = tmp_path / 'broken'
    shutil.copytree(tiny_sd, broken)
    os.remove(broken / 'unet' / 'diffusion_pytorch_model.safetensors')
    with pytest.raises(SDLoadError) as err:
        load_sd_components({'pretrained': str(broken)})
    msg = str(err.value)
    assert 'unet' in msg and 'diffusion_pytorch_model.safetensors' in msg and '\n' not in msg
    shutil.rmtree(broken / 'tokenizer')
    with pytest.raises(SDLoadError, match='tokenizer'):
        load_sd_components({'pretrained': str(broken)})
    with pytest.raises(OptionError, match="unknown key 'pretrained_path'"):
        load_sd_components({'pretrained_path': tiny_sd})


def test_hub_id_offline_says_what_to_download():
    assert os.environ.get('HF_HUB_OFFLINE') == '1'
    with pytest.raises(SDLoadError) as err:
        load_sd_components({'pretrained': 'stabilityai/stable-diffusion-2-1-base'})
    msg = str(err.value)
    assert 'huggingface-cli download stabilityai/stable-diffusion-2-1-base' in msg
    assert 'pretrained_models/stable-diffusion-2-1-base' in msg and '\n' not in msg


def test_plain_diffusers_pipeline_loads_tiny_sd(tiny_sd):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    assert pipe.vae_scale_factor == 8
    img = pipe('a cat', num_inference_steps=2, height=64, width=64, output_type='pt',
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 3, 64, 64)


def test_sd21_base_configs_give_the_published_sizes():
    """The shipped SD 2.1-base configs build the published architecture (parameter counts
    checked on the meta device: no memory), and narrowed variants keep its structure."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dalpsr.archs.sd_components import build_sd21_base_random, sd21_base_configs
    cfg = sd21_base_configs()
    assert cfg['unet']['cross_attention_dim'] == cfg['text_encoder']['hidden_size'] == 1024
    assert cfg['scheduler']['prediction_type'] == 'epsilon'

    def count(m):
        return sum(p.numel() for p in m.parameters())
    with torch.device('meta'):
        unet = UNet2DConditionModel.from_config(cfg['unet'])
        vae = AutoencoderKL.from_config(cfg['vae'])
        te = CLIPTextModel(CLIPTextConfig(**cfg['text_encoder']))
    assert round(count(unet) / 1e6, 1) == 865.9
    assert round(count(vae) / 1e6, 1) == 83.7
    assert round(count(te) / 1e6, 1) == 340.4

    small = build_sd21_base_random(seed=1, channel_scale=0.25, parts=('unet',))
    assert small.vae is None and small.text_encoder is None
    assert list(small.unet.config.block_out_channels) == [80, 160, 320, 320]
    assert small.unet.config.cross_attention_dim == 256 and small.unet.dtype == torch.float32
    again = build_sd21_base_random(seed=1, channel_scale=0.25, parts=('unet',))
    w = 'conv_in.weight'
    assert torch.equal(small.unet.state_dict()[w], again.unet.state_dict()[w])
    with pytest.raises(ValueError, match='heads'):
        sd21_base_configs(0.3)
