"""DAT and RealDAT (DePLSR stage 2 networks): paper sizes, shapes, shift masks, conditioning."""
import pytest
import torch

from dalpsr.archs.dat_arch import DAT, _shift_mask, count_parameters
from dalpsr.archs.realdat_arch import FusionBlock, RealDAT

TINY = dict(embed_dim=32, depth=[2, 2], num_heads=[2, 2], split_size=[2, 4], expansion_factor=2)


def test_paper_sizes_on_meta_device():
    with torch.device('meta'):
        dat, real = DAT(), RealDAT()
    assert count_parameters(dat) == 14_802_051          # DAT x4 (the DAT paper's 14.8 M)
    assert count_parameters(real) == 18_061_131         # DePLSR RealDAT x4 (specs section 3)
    # the difference is exactly the 6 fusion blocks + the shared 512 -> 180 -> 180 adapter
    assert count_parameters(real.fusion_blocks) + count_parameters(real.adapt) == 18_061_131 - 14_802_051
    assert len(real.fusion_blocks) == 6


@pytest.mark.parametrize('scale,upsampler', [(4, 'pixelshuffle'), (2, 'pixelshuffle'), (3, 'pixelshuffle'),
                                             (4, 'pixelshuffledirect')])
def test_any_size_and_scale(scale, upsampler):
    torch.manual_seed(0)
    net = DAT(upscale=scale, upsampler=upsampler, num_feat=8, **TINY).eval()
    x = torch.rand(2, 3, 13, 9)  # not a multiple of the windows: padded inside
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, 3, 13 * scale, 9 * scale)
    assert torch.isfinite(y).all()


def test_batch_independence_in_eval():
    torch.manual_seed(0)
    net = RealDAT(cond_dim=8, fusion_num_heads=2, **TINY).eval()
    x = torch.rand(3, 3, 8, 8)
    xi, xd = torch.randn(3, 1, 8), torch.randn(3, 5, 8)
    with torch.no_grad():
        full = net(x, xi, xd)
        one = net(x[1:2], xi[1:2], xd[1:2])
    assert torch.allclose(full[1:2], one, atol=1e-5)


def test_conditioning_changes_output_and_none_skips_fusion():
    torch.manual_seed(0)
    net = RealDAT(cond_dim=8, fusion_num_heads=2, **TINY).eval()
    plain = DAT(**TINY).eval()
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith(('fusion_blocks', 'adapt'))})
    with torch.no_grad():  # the DAT init (std 0.02) makes the fused signal tiny: larger weights for the test
        for p in list(net.fusion_blocks.parameters()) + list(net.adapt.parameters()):
            p.normal_(0, 0.3)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        a = net(x, torch.randn(1, 8), torch.randn(1, 5, 8))
        b = net(x, torch.randn(1, 8), torch.randn(1, 5, 8))
        none = net(x)
        ref = plain(x)
    assert (a - b).abs().max() > 1e-4          # other embeddings, other SR
    assert torch.allclose(none, ref, atol=1e-6)  # no embeddings: exactly the DAT path


def test_fusion_block_passes_updated_tokens_and_residual_modes():
    torch.manual_seed(0)
    x, xi, xd = torch.randn(2, 12, 16), torch.randn(2, 1, 16), torch.randn(2, 5, 16)
    blk = FusionBlock(16, num_heads=2, residual='input')
    with torch.no_grad():
        y, xi2, xd2 = blk(x, xi, xd)
        for p in (blk.proj.weight, blk.proj.bias, blk.mlp[2].weight, blk.mlp[2].bias):
            p.zero_()
        y0, _, _ = blk(x, xi, xd)
    assert y.shape == x.shape and xi2.shape == xi.shape and xd2.shape == xd.shape
    assert torch.allclose(y0, x)                 # 'input' residual: zero branches give x back
    blk.residual = 'normed'
    with torch.no_grad():
        yn, _, _ = blk(x, xi, xd)
    assert torch.allclose(yn, blk.norm_x(x), atol=1e-6)   # released code: residual on LN(x)
    with pytest.raises(ValueError, match='fusion_residual'):
        FusionBlock(16, 2, residual='other')


def test_shift_mask_separates_wrapped_regions():
    m = _shift_mask(8, 8, 4, 4, 2, 2)
    assert m.shape == (4, 16, 16)
    assert (m[0] == 0).all()                     # the first window holds one region only
    assert (m[-1] == -100).any()                 # the last holds wrapped-around regions
    assert torch.equal(m, m.transpose(1, 2))


def test_bad_configs_are_one_line_errors():
    with pytest.raises(ValueError, match='upscale'):
        DAT(upscale=5, **TINY)
    with pytest.raises(ValueError, match='fusion_layers'):
        RealDAT(fusion_layers=[0, 7], cond_dim=8, fusion_num_heads=2, **TINY)
    with pytest.raises(ValueError, match='even'):
        DAT(embed_dim=16, depth=[2], num_heads=[3], split_size=[2, 4])
