"""DaLPSRControlNet: initialised from the UNet, zero effect at init, both condition modes, export."""
import json

import pytest
import torch
import torch.nn.functional as F

from dalpsr.archs.controlnet_arch import (condition_mode_of, controlled_unet, export_dalpsr,
                                          get_controlnet_class, load_dalpsr_export, prepare_condition)
from dalpsr.archs.sd_components import build_tiny_sd, encode_images, load_sd_components


@pytest.fixture(scope='module')
def comps(tmp_path_factory):
    path = build_tiny_sd(tmp_path_factory.mktemp('sd') / 'tiny_sd', seed=0)
    return load_sd_components({'pretrained': path}).freeze()


def _inputs(b=2, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, h, w, generator=g)
    t = torch.tensor([10, 700][:b])
    emb = torch.randn(b, 77, 32, generator=g)
    lq = torch.rand(b, 3, h * 2, w * 2, generator=g)
    return x, t, emb, lq


def test_from_unet_copies_encoder_and_has_no_effect_at_init(comps):
    cls = get_controlnet_class()
    cn = cls.from_unet(comps.unet, condition_mode='latent', conditioning_embedding_out_channels=(16,))
    assert cn.condition_mode == 'latent' and isinstance(cn, cls)
    assert cn.config.conditioning_channels == 4
    usd = comps.unet.state_dict()
    for k, v in cn.state_dict().items():
        if k.startswith(('down_blocks.', 'mid_block.', 'conv_in.', 'time_embedding.')):
            assert torch.equal(v, usd[k]), k
    x, t, emb, lq = _inputs()
    cond = prepare_condition(cn, lq, comps.vae, scale=4)
    assert cond.shape == (2, 4, 8, 8)
    with torch.no_grad():
        out = controlled_unet(comps.unet, cn, x, t, emb, cond)
        ref = comps.unet(x, t, encoder_hidden_states=emb).sample
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_condition_changes_output_and_gradients_reach_controlnet(comps):
    cls = get_controlnet_class()
    torch.manual_seed(0)
    cn = cls.from_unet(comps.unet, condition_mode='latent', conditioning_embedding_out_channels=(16,))
    with torch.no_grad():  # leave the zero init: one step of training would do this
        for p in list(cn.controlnet_down_blocks.parameters()) + list(cn.controlnet_mid_block.parameters()):
            p.normal_(0, 0.05)
        for p in cn.controlnet_cond_embedding.conv_out.parameters():
            p.normal_(0, 0.05)
    x, t, emb, lq = _inputs()
    c1 = prepare_condition(cn, lq, comps.vae)
    c2 = prepare_condition(cn, lq.flip(-1), comps.vae)
    out1 = controlled_unet(comps.unet, cn, x, t, emb, c1)
    with torch.no_grad():
        out2 = controlled_unet(comps.unet, cn, x, t, emb, c2)
        out0 = controlled_unet(comps.unet, cn, x, t, emb, c1, conditioning_scale=0.0)
        ref = comps.unet(x, t, encoder_hidden_states=emb).sample
    assert (out1 - out2).abs().max() > 1e-4
    torch.testing.assert_close(out0, ref)
    out1.pow(2).mean().backward()
    assert cn.controlnet_cond_embedding.conv_in.weight.grad.abs().sum() > 0
    assert cn.controlnet_down_blocks[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in comps.unet.parameters())


def test_image_mode_and_bad_options(comps):
    cls = get_controlnet_class()
    cn = cls.from_unet(comps.unet, condition_mode='image', conditioning_embedding_out_channels=(8, 8, 8, 16))
    assert cn.condition_mode == 'image' and condition_mode_of(dict(cn.config)) == 'image'
    x, t, emb, lq = _inputs()
    cond = prepare_condition(cn, lq, None, scale=4)
    assert cond.shape == (2, 3, 64, 64) and cond.min() >= 0 and cond.max() <= 1
    torch.testing.assert_close(cond, F.interpolate(lq, scale_factor=4, mode='bicubic').clamp(0, 1))
    assert controlled_unet(comps.unet, cn, x, t, emb, cond).shape == x.shape
    with pytest.raises(ValueError, match='condition_mode'):
        cls.from_unet(comps.unet, condition_mode='pixel')
    with pytest.raises(ValueError, match='one'):
        cls.from_unet(comps.unet, condition_mode='latent', conditioning_embedding_out_channels=(16, 32))
    with pytest.raises(ValueError, match='needs the VAE'):
        prepare_condition('latent', lq, None)
    with pytest.raises(ValueError, match='multiple of the VAE factor'):
        prepare_condition('latent', torch.rand(1, 3, 15, 15), comps.vae, scale=1)
    with pytest.raises(ValueError, match=r'\[B,3,h,w\]'):
        prepare_condition('image', torch.rand(3, 16, 16))


def test_latent_condition_is_vae_latent_of_bicubic_upsample(comps):
    lq = torch.rand(1, 3, 8, 12)
    cond = prepare_condition('latent', lq, comps.vae, scale=4)
    up = F.interpolate(lq, size=(32, 48), mode='bicubic', align_corners=False).clamp(0, 1)
    with torch.no_grad():
        torch.testing.assert_close(cond, encode_images(comps.vae, up))
    assert cond.shape == (1, 4, 4, 6) and not cond.requires_grad


def test_export_round_trip(comps, tmp_path):
    from diffusers import ControlNetModel
    cls = get_controlnet_class()
    torch.manual_seed(1)
    cn = cls.from_unet(comps.unet, condition_mode='latent', conditioning_embedding_out_channels=(16,))
    with torch.no_grad():
        cn.controlnet_down_blocks[0].weight.normal_()
    meta = {'sd': {'pretrained': 'x'}, 'scale': 4, 'prompt': {'order': ['caption', 'restoration']}}
    export_dalpsr(tmp_path / 'exp', cn, meta)
    export_dalpsr(tmp_path / 'exp', cn, meta)  # re-export replaces atomically
    cn2, meta2 = load_dalpsr_export(tmp_path / 'exp')
    assert isinstance(cn2, cls) and meta2['condition_mode'] == 'latent' and meta2['scale'] == 4
    assert json.loads((tmp_path / 'exp' / 'dalpsr.json').read_text())['format'] == 'dalpsr-controlnet-v1'
    sd1, sd2 = cn.state_dict(), cn2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    plain = ControlNetModel.from_pretrained(tmp_path / 'exp' / 'controlnet')
    assert condition_mode_of(plain) == 'latent'
    assert not [p for p in (tmp_path / 'exp').iterdir() if p.name.startswith('.')]
    (tmp_path / 'exp' / 'dalpsr.json').unlink()
    with pytest.raises(FileNotFoundError, match='dalpsr.json'):
        load_dalpsr_export(tmp_path / 'exp')


def test_gradient_checkpointing_gives_same_gradients(comps):
    cls = get_controlnet_class()
    torch.manual_seed(0)
    cn = cls.from_unet(comps.unet, condition_mode='latent', conditioning_embedding_out_channels=(16,))
    with torch.no_grad():
        for p in cn.controlnet_down_blocks.parameters():
            p.normal_(0, 0.05)
    x, t, emb, lq = _inputs()
    cond = prepare_condition(cn, lq, comps.vae)

    def grads():
        cn.zero_grad(set_to_none=True)
        controlled_unet(comps.unet, cn, x, t, emb, cond).pow(2).mean().backward()
        return [p.grad.clone() for p in cn.parameters() if p.grad is not None]

    cn.train()
    g0 = grads()
    cn.enable_gradient_checkpointing()
    assert cn.is_gradient_checkpointing
    g1 = grads()
    assert len(g0) == len(g1) > 0
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
