"""SSP-IR's restorer on the shared denoising loop with tiny stand-ins: shapes and range, per-image
seeds, CFG with the same image prior and Processor input in both branches, the denoiser equals the
training path, latent tiling crops the Processor feature, export loading."""
import copy

import pytest
import torch

from dalpsr.restorers.sspir import SSPIR, SSPIRDenoiser


@pytest.fixture(scope='module')
def export(tmp_path_factory):
    """An SSP-IR export of tiny stand-ins (untrained: the zero conv is perturbed so F matters)."""
    from dalpsr.archs.sd_components import build_tiny_sd
    from dalpsr.archs.sspir_arch import build_tiny_clip_vision
    from dalpsr.models import build_model
    root = tmp_path_factory.mktemp('sspir_export')
    sd = build_tiny_sd(root / 'sd', seed=0)
    clip = build_tiny_clip_vision(root / 'clip', seed=0)
    opt = {'name': 'x', 'seed': 1, '_source': 'test',
           'model': {'type': 'SSPIRModel', 'sd': {'pretrained': sd}, 'clip': {'pretrained': clip},
                     'arch': {'image_dim': 32, 'processor_channels': [4, 8, 8, 16]}, 'gradient_checkpointing': False}}
    model = build_model(opt, None)
    torch.manual_seed(0)
    with torch.no_grad():
        torch.nn.init.normal_(model.processor.conv_out.weight, std=0.05)
    model.export(str(root / 'export'))
    return {'path': str(root / 'export'), 'model': model, 'sd': sd}


def _restorer(export, **sampler):
    s = {'num_steps': 3, 'scheduler': 'ddpm', 'guidance_scale': 7.5, 'negative_prompt': 'blur',
         'added_prompt': 'clean', 'conditioning_scale': 1.0}
    s.update(sampler)
    return SSPIR({'path': export['path'], 'sd': None, 'dtype': 'fp32', 'vae_dtype': None, 'vae_fp32_fallback': True,
                  'max_chunks': None}, s, device='cpu')


def _lq(n=2, h=12, w=10, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_restore_shapes_seeds_and_batch_independence(export):
    r = _restorer(export)
    assert r.scale == 4 and r.needs == ('caption',)
    lq = _lq()
    caps = ['a cat on a mat', '']
    sr = r.restore(lq, seeds=[5, 6], captions=caps)
    assert sr.shape == (2, 3, 48, 40) and sr.dtype == torch.float32
    assert float(sr.min()) >= 0 and float(sr.max()) <= 1
    assert r.last_stats['unet_calls'] == 3  # CFG batched: one call per step
    assert r.last_stats['per_image'][0]['prompt'] == 'a cat on a mat, clean'
    assert r.last_stats['per_image'][1]['prompt'] == 'clean'
    one = r.restore(lq[1:], seeds=[6], captions=caps[1:])
    assert torch.allclose(one[0], sr[1], atol=1e-5)  # depends on its seed and inputs only
    other = r.restore(lq[1:], seeds=[7], captions=caps[1:])
    assert not torch.allclose(other[0], sr[1], atol=1e-3)


def test_cfg_branches_share_image_prior_and_processor_input(export, monkeypatch):
    r = _restorer(export)
    seen = []
    real = SSPIRDenoiser.predict

    def spy(self, x_t, t, conditions):
        seen.append({k: conditions[k].clone() for k in ('text', 'image', 'feat')} | {'n': x_t.shape[0]})
        return real(self, x_t, t, conditions)

    monkeypatch.setattr(SSPIRDenoiser, 'predict', spy)
    r.restore(_lq(), seeds=[0, 1], captions=['a long caption about a house', 'x'])
    assert len(seen) == 3
    c = seen[0]
    assert c['n'] == 4  # [uncond; cond]
    assert torch.equal(c['image'][:2], c['image'][2:]) and torch.equal(c['feat'][:2], c['feat'][2:])
    assert not torch.equal(c['text'][:2], c['text'][2:])  # negative prompt vs captions
    assert c['feat'].shape[1] == 32 and torch.count_nonzero(c['feat']) > 0
    # without CFG one branch
    seen.clear()
    _restorer(export, guidance_scale=1.0).restore(_lq(), seeds=[0, 1], captions=['a', 'b'])
    assert seen[0]['n'] == 2


def test_denoiser_equals_the_training_path(export):
    """One predict of the restorer's denoiser = SSPIRModel.predict on the same inputs."""
    from dalpsr.archs.sspir_arch import CLIPImagePrior  # noqa: F401
    from dalpsr.pipelines.denoiser import Conditions
    m = export['model']
    r = _restorer(export)
    nets = r.nets()
    torch.manual_seed(3)
    x = torch.randn(1, 4, 8, 8)
    up = torch.rand(1, 3, 64, 64)
    emb = m.encode_text(['a house'])
    with torch.no_grad():
        t_img, feat, _ = m.priors(up)
        ref = m.predict(x, torch.tensor([500]), emb, t_img, feat)
        den = SSPIRDenoiser(nets.components.unet, nets.controlnet)
        cond = Conditions(cond={'text': emb}, shared={'image': nets.refine(nets.clip(up))},
                          spatial={'feat': nets.processor(up)[0]})
        out = den.predict(x, torch.tensor(500), cond.for_step(False, (8, 8)))
    assert torch.allclose(out, ref, atol=1e-5)


def test_latent_tiling_crops_the_processor_feature(export, monkeypatch):
    r = _restorer(export, tile={'latent_size': 8, 'latent_overlap': 4}, num_steps=1)
    shapes = []
    real = SSPIRDenoiser.predict

    def spy(self, x_t, t, conditions):
        shapes.append((tuple(x_t.shape[-2:]), tuple(conditions['feat'].shape[-2:]), conditions.box))
        return real(self, x_t, t, conditions)

    monkeypatch.setattr(SSPIRDenoiser, 'predict', spy)
    sr = r.restore(_lq(1, 32, 32), seeds=[0], captions=['x'])  # 128 px output -> 16x16 latent, 8x8 tiles
    assert sr.shape == (1, 3, 128, 128) and torch.isfinite(sr).all()
    assert len(shapes) > 1 and all(a == b == (8, 8) for a, b, _ in shapes)
    assert len({box for _, _, box in shapes}) == len(shapes)


def test_bad_options_and_missing_export(export, tmp_path):
    from dalpsr.utils.options import OptionError
    opt = {'model': {'path': None, 'compile': False}, 'sampler': {'prompt': None}}
    with pytest.raises(OptionError, match='model.path'):
        SSPIR.check_options(opt, 'x.yml')
    bad = copy.deepcopy(opt)
    bad['model']['path'] = export['path']
    bad['sampler']['prompt'] = {'order': ['caption']}
    with pytest.raises(OptionError, match='sampler.prompt'):
        SSPIR.check_options(bad, 'x.yml')
    with pytest.raises(FileNotFoundError, match='sspir.json'):
        SSPIR({'path': str(tmp_path)}, {}, device='cpu')
