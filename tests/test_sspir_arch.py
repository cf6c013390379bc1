"""SSP-IR networks: Table VI's trainable parameter count at SD 1.5 size (meta device) and the exact
frozen set; the Processor (zero conv, RGB heads, stage count from the VAE factor); the structure
attention sees the ControlNet residual of the skip its resnet consumes; the CLIP image prior."""
import re

import pytest
import torch

from dalpsr.archs.sspir_arch import (CLIPImagePrior, Processor, RefineLayer, build_sspir_networks, count_parameters,
                                     sd15_configs)
from dalpsr.archs.sspir_attention import (PriorGuidedAttention, StructureUpBlock, prior_kwargs, prior_modules,
                                          skip_channels, up_block_skip_indices)
from dalpsr.models.sspir_model import mark_trainable


def _orig_name(name: str) -> str:
    """A parameter name of the wrapped UNet -> the name it has in the plain diffusers UNet."""
    name = re.sub(r'\.attentions\.(\d+)\.text_attn\.', r'.attentions.\1.', name)
    return re.sub(r'^up_blocks\.(\d+)\.block\.', r'up_blocks.\1.', name)


def test_trainable_count_at_sd15_size_is_table_vi_and_frozen_set_is_exact():
    from diffusers import UNet2DConditionModel
    cfgs = sd15_configs()
    with torch.device('meta'):
        unet = UNet2DConditionModel.from_config(cfgs['unet'])
    orig_names = {n for n, _ in unet.named_parameters()}
    orig_count = count_parameters([unet])
    parts = build_sspir_networks(unet, cfgs['clip_vision']['hidden_size'], 8)
    mark_trainable(parts, unet)
    trainable = [p for m in (parts['controlnet'], parts['processor'], parts['refine'], unet)
                 for p in m.parameters() if p.requires_grad]
    n = sum(p.numel() for p in trainable)
    assert abs(n / 1e6 - 997.80) / 997.80 < 0.005, n  # Table VI: 997.80 M
    # the whole ControlNet, Processor and Refine layer train (VAE, text encoder, CLIP: test_sspir_model)
    for m in (parts['controlnet'], parts['processor'], parts['refine']):
        assert all(p.requires_grad for p in m.parameters())
    # the frozen UNet parameters are exactly the original SD 1.5 UNet's (same names, same count)
    frozen = {_orig_name(k): p for k, p in unet.named_parameters() if not p.requires_grad}
    assert set(frozen) == orig_names and sum(p.numel() for p in frozen.values()) == orig_count
    # ... and the trainable UNet modules are the image and structure attentions only
    kinds = [name.rsplit('.', 1)[-1] for name, _ in prior_modules(unet)]
    assert kinds.count('image_attn') == 16 and kinds.count('structure_attn') == 9
    assert kinds.count('structure_attentions') == 1  # SD's plain UpBlock2D (3 one-head attentions)
    # the ControlNet has image attentions in its 6 down and 1 mid cross-attention layers; no conditioning embedding
    cn_wrapped = [m for m in parts['controlnet'].modules() if isinstance(m, PriorGuidedAttention)]
    assert len(cn_wrapped) == 7 and all(m.structure_attn is None for m in cn_wrapped)
    assert isinstance(parts['controlnet'].controlnet_cond_embedding, torch.nn.Identity)
    # image attentions attend to the 512-d T_img; structure attentions to the skip widths
    assert {m.image_attn.config.cross_attention_dim for m in cn_wrapped} == {512}


def test_sd21_base_builds_with_its_own_widths():
    from dalpsr.archs.sd_components import sd21_base_configs
    from diffusers import UNet2DConditionModel
    with torch.device('meta'):
        unet = UNet2DConditionModel.from_config(sd21_base_configs()['unet'])
    parts = build_sspir_networks(unet, 1024, 8)
    att = [m for m in unet.modules() if isinstance(m, PriorGuidedAttention)]
    # SD 2.1 uses linear projections and 5/10/20 heads: the new attentions mirror the text attention
    for m in att:
        assert m.image_attn.config.use_linear_projection is True
        assert m.image_attn.config.num_attention_heads == m.text_attn.config.num_attention_heads
    assert parts['controlnet'].config.cross_attention_dim == 1024


@pytest.fixture(scope='module')
def tiny_parts():
    from diffusers import UNet2DConditionModel

    from dalpsr.archs.sd_components import TINY_UNET
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET).eval()
    plain = UNet2DConditionModel(**TINY_UNET).eval()
    plain.load_state_dict(unet.state_dict())
    parts = build_sspir_networks(unet, 32, 8, {'image_dim': 24, 'processor_channels': [4, 8, 8, 16]}, seed=1)
    return unet, plain, parts


def test_processor_heads_zero_conv_and_stage_count():
    p = Processor(out_channels=20, vae_scale_factor=8, channels=(4, 8, 8, 16))
    x = torch.rand(2, 3, 64, 48)
    feat, rgbs = p(x)
    assert feat.shape == (2, 20, 8, 6) and torch.count_nonzero(feat) == 0
    assert [tuple(r.shape) for r in rgbs] == [(2, 3, 32, 24), (2, 3, 16, 12), (2, 3, 8, 6)]
    p4 = Processor(out_channels=20, vae_scale_factor=4, channels=(4, 8, 8))
    assert p4.num_stages == 2 and p4(x)[0].shape == (2, 20, 16, 12)
    with pytest.raises(ValueError, match='need 4 entries'):
        Processor(20, 8, (4, 8, 8))
    with pytest.raises(ValueError, match='power of 2'):
        Processor(20, 6, (4, 8, 8))


def test_controlnet_input_is_conv_in_output_at_init(tiny_parts):
    _, _, parts = tiny_parts
    cn, proc = parts['controlnet'], parts['processor']
    seen = {}
    h1 = cn.conv_in.register_forward_hook(lambda m, a, out: seen.__setitem__('conv_in', out.detach().clone()))
    h2 = cn.down_blocks[0].register_forward_pre_hook(
        lambda m, a, kw: seen.__setitem__('input', (a[0] if a else kw['hidden_states']).detach().clone()),
        with_kwargs=True)
    x = torch.randn(1, 4, 8, 8)
    emb = torch.randn(1, 77, 32)
    up = torch.rand(1, 3, 64, 64)
    try:
        feat, _ = proc(up)
        with torch.no_grad():
            cn(x, 10, encoder_hidden_states=emb, controlnet_cond=feat, return_dict=False,
               cross_attention_kwargs=prior_kwargs(torch.randn(1, 16, 24)))
        assert torch.equal(seen['input'], seen['conv_in'])
        # guard: once the zero conv has weights, F changes the ControlNet's input
        with torch.no_grad():
            torch.nn.init.normal_(proc.conv_out.weight, std=0.1)
            feat, _ = proc(up)
            cn(x, 10, encoder_hidden_states=emb, controlnet_cond=feat, return_dict=False)
        assert not torch.allclose(seen['input'], seen['conv_in'])
    finally:
        torch.nn.init.zeros_(proc.conv_out.weight)
        h1.remove()
        h2.remove()


def test_structure_attention_sees_the_controlnet_residual_of_its_skip(tiny_parts):
    unet, _, _ = tiny_parts
    chans = skip_channels(unet)
    assert chans == [32, 32, 32, 64]
    idx = up_block_skip_indices(unet)
    assert idx == [[3, 2], [1, 0]]  # two resnets per up block, skips used last-in first-out
    # residual k is filled with the value k + 1: the attention's keys/values reveal which one it got
    res = [torch.full((1, c, s, s), float(k + 1)) for k, (c, s) in enumerate(zip(chans, (8, 8, 4, 4)))]
    seen = []

    def grab(name):
        def hook(m, a, kw):
            seen.append((name, a[0].shape, kw['encoder_hidden_states'].clone()))
        return hook

    hooks = []
    for b, blk in enumerate(unet.up_blocks):
        if isinstance(blk, StructureUpBlock):
            for j, att in enumerate(blk.structure_attentions):
                hooks.append(att.register_forward_pre_hook(grab((b, j)), with_kwargs=True))
        else:
            for j, att in enumerate(blk.attentions):
                hooks.append(att.structure_attn.register_forward_pre_hook(grab((b, j)), with_kwargs=True))
    try:
        with torch.no_grad():
            unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 77, 32),
                 down_block_additional_residuals=res, mid_block_additional_residual=torch.zeros(1, 64, 4, 4),
                 cross_attention_kwargs=prior_kwargs(torch.randn(1, 16, 24), res))
    finally:
        for h in hooks:
            h.remove()
    assert [s[0] for s in seen] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for (b, j), hshape, ctx in seen:
        k = idx[b][j]
        h, w = hshape[-2:]
        assert ctx.shape == (1, h * w, chans[k]), (b, j)   # [B, h*w, C_skip] at the layer's resolution
        assert torch.all(ctx == k + 1), (b, j)               # the residual of the skip the resnet consumed


def test_wrapped_unet_without_priors_or_with_zero_init_equals_the_original(tiny_parts):
    from diffusers import UNet2DConditionModel

    from dalpsr.archs.sd_components import TINY_UNET
    unet, plain, _ = tiny_parts
    x, emb = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    res = [torch.randn(2, c, s, s) for c, s in zip(skip_channels(plain), (8, 8, 4, 4))]
    mid = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        ref = plain(x, 5, encoder_hidden_states=emb, down_block_additional_residuals=res,
                    mid_block_additional_residual=mid).sample
        out = unet(x, 5, encoder_hidden_states=emb, down_block_additional_residuals=res,
                   mid_block_additional_residual=mid).sample
        with_priors = unet(x, 5, encoder_hidden_states=emb, down_block_additional_residuals=res,
                           mid_block_additional_residual=mid,
                           cross_attention_kwargs=prior_kwargs(torch.randn(2, 16, 24), res)).sample
    assert torch.allclose(out, ref, atol=1e-6)
    assert not torch.allclose(with_priors, ref, atol=1e-3)  # default init: the priors act
    # zero-initialised proj_out: every new layer starts as the identity
    torch.manual_seed(0)
    z = UNet2DConditionModel(**TINY_UNET).eval()
    z.load_state_dict(plain.state_dict())
    build_sspir_networks(z, 32, 8, {'image_dim': 24, 'processor_channels': [4, 8, 8, 16],
                                    'zero_init_attention': True})
    with torch.no_grad():
        zo = z(x, 5, encoder_hidden_states=emb, down_block_additional_residuals=res,
               mid_block_additional_residual=mid, cross_attention_kwargs=prior_kwargs(torch.randn(2, 16, 24), res)).sample
    assert torch.allclose(zo, ref, atol=1e-5)


def test_controlnet_image_attentions_copy_the_unets(tiny_parts):
    unet, _, parts = tiny_parts
    u = dict(unet.named_modules())
    for name, m in parts['controlnet'].named_modules():
        if isinstance(m, PriorGuidedAttention):
            ref = u[name].image_attn.state_dict()
            assert all(torch.equal(v, ref[k]) for k, v in m.image_attn.state_dict().items()), name


def test_clip_image_prior_and_refine_layer():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from dalpsr.archs.sspir_arch import TINY_CLIP_VISION
    torch.manual_seed(0)
    vis = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP_VISION)).eval()
    prior = CLIPImagePrior(vis, layer=-1)
    up = torch.rand(2, 3, 64, 64)
    tok = prior(up)
    assert tok.shape == (2, 16, 32)  # (32 / 8)^2 patch tokens, CLS dropped
    x = torch.nn.functional.interpolate(up, size=(32, 32), mode='bicubic', align_corners=False).clamp(0, 1)
    x = (x - prior.mean) / prior.std
    with torch.no_grad():
        hs = vis(pixel_values=x, output_hidden_states=True).hidden_states
    assert torch.allclose(tok, hs[2][:, 1:], atol=1e-5) and not torch.allclose(tok, hs[1][:, 1:], atol=1e-3)
    assert torch.allclose(CLIPImagePrior(vis, layer=1)(up), hs[1][:, 1:], atol=1e-5)
    assert not any(p.requires_grad for p in prior.parameters())
    with pytest.raises(ValueError, match='clip layer'):
        CLIPImagePrior(vis, layer=5)
    r = RefineLayer(32, 24, num_layers=2)
    assert r(tok).shape == (2, 16, 24)
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in r.modules()) == 2
