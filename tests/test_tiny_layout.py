"""Layouts of the tiny stand-in (dalpsr/inference/tiny.py, issue 13.11): the fast layout is built from
diffusers' real classes with self-attention only at 1/8 latent resolution and no VAE attention, keeps
the latent factor 8, and a folder of an older layout revision is recognised (so it gets rebuilt)."""
import torch

from dalpsr.inference import tiny


def test_fast_layout_attention_only_at_the_lowest_resolution_and_latent_factor_8():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention_processor import Attention

    from dalpsr.archs.sd_components import TINY_UNET, TINY_VAE
    unet = UNet2DConditionModel(**dict(TINY_UNET, **tiny.FAST_UNET))
    vae = AutoencoderKL(**dict(TINY_VAE, **tiny.FAST_VAE))
    sizes = []  # token counts seen by the UNet's self-attention on a 96x96 latent tile
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[1]))
             for n, m in unet.named_modules() if n.endswith('attn1')]
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 96, 96), 10, encoder_hidden_states=torch.randn(1, 77, 32)).sample
        z = vae.encode(torch.rand(1, 3, 64, 96) * 2 - 1).latent_dist.mean
        x = vae.decode(z).sample
    for h in hooks:
        h.remove()
    assert out.shape == (1, 4, 96, 96)
    assert sizes and set(sizes) == {12 * 12}
    assert not any(isinstance(m, Attention) for m in vae.modules())
    assert z.shape == (1, 4, 8, 12) and x.shape == (1, 3, 64, 96)


def test_layout_revision_read_back(tmp_path):
    assert tiny.read_layout_id(tmp_path) == 'sd 1'  # folders written before layouts existed
    (tmp_path / 'layout.txt').write_text('fast\n')  # the first fast layout wrote no revision
    assert tiny.read_layout_id(tmp_path) == 'fast 1' != tiny.layout_id('fast')
    (tmp_path / 'layout.txt').write_text(tiny.layout_id('fast') + '\n')
    assert tiny.read_layout_id(tmp_path) == tiny.layout_id('fast') == 'fast 2'
    assert tiny.layout_id('sd') == 'sd 1'
