"""Weight-based metrics end to end with random weights saved under the real file names in a
temporary weights folder: the same lookup, pyiqa construction and scoring path as with the
published checkpoints (values are meaningless, the plumbing is not)."""
import json

import numpy as np
import pytest
import torch

from dalpsr.metrics.iqa import MetricSet, evaluate_folders
from dalpsr.utils.img_io import read_image, write_image


def _compact(state, keep):
    """State dict with the tensors of ``keep`` prefixes as they are and the others as stride-0
    views of a single zero (torch.save stores one element for them): backbone parts a metric
    never uses (e.g. AlexNet's classifier) cost nothing on disk."""
    return {k: (v.clone() if k.startswith(keep) else torch.zeros((), dtype=v.dtype).expand(v.shape))
            for k, v in state.items()}


def _imgs(sample_paths, n=3, size=(64, 80)):
    return [read_image(p)[:size[0], :size[1]].copy() for p in sample_paths['train'][:n]]


def _t(img):
    return torch.from_numpy((np.round(img * 255) / 255).transpose(2, 0, 1).copy()).float()[None]


def test_lpips_with_weight_files_in_weights_dir(tmp_path, sample_paths):
    from torchvision.models import alexnet
    hub = tmp_path / 'w'
    (hub / 'checkpoints').mkdir(parents=True)
    (hub / 'pyiqa').mkdir()
    torch.manual_seed(0)
    backbone = _compact(alexnet().state_dict(), 'features')
    torch.save(backbone, hub / 'checkpoints' / 'alexnet-owt-7be5be79.pth')
    lin = {f'lin{i}.model.1.weight': torch.rand(1, c, 1, 1) for i, c in enumerate([64, 192, 384, 256, 256])}
    torch.save(lin, hub / 'pyiqa' / 'LPIPS_v0.1_alex-df73285e.pth')
    ms = MetricSet(['lpips', 'psnr'], weights_dir=str(hub))
    assert not ms.failed
    net = ms.metrics['lpips'].net.net
    # pyiqa loads LPIPS non-strictly: check the files really ended up in the network
    assert torch.equal(net.lin2.model[1].weight, lin['lin2.model.1.weight'])
    assert torch.equal(net.net.slice1[0].weight, backbone['features.0.weight'])
    assert ms.describe()['lpips']['weight_files'] == [str(hub / 'checkpoints' / 'alexnet-owt-7be5be79.pth'),
                                                     str(hub / 'pyiqa' / 'LPIPS_v0.1_alex-df73285e.pth')]
    imgs = [_t(i) for i in _imgs(sample_paths)]
    noisy = [(x + 0.1 * torch.randn_like(x)).clamp(0, 1) for x in imgs]
    assert ms.compute(imgs[0], imgs[0])['lpips'] == pytest.approx(0.0, abs=1e-6)
    single = [ms.compute(n, x)['lpips'] for n, x in zip(noisy, imgs)]
    assert min(single) > 0
    batch, errors = ms.score_batch(torch.cat(noisy), torch.cat(imgs))
    assert errors == [[], [], []]
    np.testing.assert_allclose(batch['lpips'], single, rtol=1e-4, atol=1e-6)


def test_fid_folders_with_random_inception(tmp_path, sample_paths, monkeypatch):
    import cv2
    from pyiqa.archs.inception import _inception_v3
    hub = tmp_path / 'w'
    (hub / 'pyiqa').mkdir(parents=True)
    torch.manual_seed(0)
    inception = _inception_v3(num_classes=1008, aux_logits=False, pretrained=False)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in inception.state_dict().items()}
    torch.save(state, hub / 'pyiqa' / 'pt_inception-2015-12-05-6726825d.pth')
    del inception, state
    imgs = _imgs(sample_paths, n=3, size=(96, 96))
    gt, same, other = tmp_path / 'gt', tmp_path / 'same', tmp_path / 'other'
    for d in (gt, same, other):
        d.mkdir()
    for i, img in enumerate(imgs):
        write_image(gt / f'{i}.png', img)
        write_image(other / f'{i}_x4.png', np.clip(img + np.random.default_rng(i).normal(0, 0.2, img.shape), 0, 1))
    # same pixels as GT, stored as 8-bit RGB, 16-bit RGB and opaque RGBA (converted before pyiqa reads them)
    write_image(same / '0.png', imgs[0])
    cv2.imwrite(str(same / '1.png'), np.round(imgs[1][:, :, ::-1] * 65535).astype(np.uint16))
    rgba = np.dstack([np.round(imgs[2][:, :, ::-1] * 255).astype(np.uint8), np.full((96, 96), 255, np.uint8)])
    cv2.imwrite(str(same / '2.png'), rgba)
    opts = dict(metrics=['fid'], weights_dir=str(hub), progress=False)
    s_same = evaluate_folders(str(same), str(gt), out_dir=str(tmp_path / 'o1'), **opts)
    assert s_same['results']['fid']['sr_images'] == 3 and s_same['results']['fid']['gt_images'] == 3
    assert abs(s_same['results']['fid']['mean']) < 1e-3
    rec = json.loads((tmp_path / 'o1' / 'summary.json').read_text())['metrics']['fid']
    assert rec['options']['mode'] == 'clean' and rec['options']['dims'] == 2048 and rec['status'] == 'ok'
    # different images give different Inception statistics (the 2048-d matrix square root of the
    # Frechet distance costs ~12 s on 2 cores, so this second run measures the mean term only)
    import pyiqa.archs.fid_arch as fid_arch
    monkeypatch.setattr(fid_arch, 'frechet_distance',
                        lambda mu1, s1, mu2, s2, eps=1e-6: float(((mu1 - mu2) ** 2).sum()))
    s_other = evaluate_folders(str(other), str(gt), out_dir=str(tmp_path / 'o2'), **opts)
    s_same2 = evaluate_folders(str(same), str(gt), out_dir=str(tmp_path / 'o3'), **opts)
    assert s_other['results']['fid']['mean'] > 0 and s_same2['results']['fid']['mean'] == 0.0


def _tiny_open_clip(tmp_path):
    cfg = {'embed_dim': 16,
           'vision_cfg': {'image_size': 32, 'layers': 1, 'width': 32, 'head_width': 16, 'patch_size': 16},
           'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 32, 'heads': 2, 'layers': 1}}
    cfg_path = tmp_path / 'dalpsr-tiny-clip.json'
    cfg_path.write_text(json.dumps(cfg))
    import open_clip
    open_clip.add_model_config(str(cfg_path))
    torch.manual_seed(0)
    model = open_clip.create_model('dalpsr-tiny-clip', pretrained=None)
    ckpt = tmp_path / 'tiny_clip.pt'
    torch.save(model.state_dict(), ckpt)
    return cfg_path, ckpt, model


def test_clip_i_with_local_checkpoint(tmp_path, sample_paths):
    cfg_path, ckpt, model = _tiny_open_clip(tmp_path)
    opts = {'model': 'dalpsr-tiny-clip', 'pretrained': str(ckpt), 'model_config': str(cfg_path)}
    ms = MetricSet(['clip_i'], weights_dir=str(tmp_path / 'w'), clip_i=opts)
    assert not ms.failed
    loaded = ms.metrics['clip_i'].net.net.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded[k], v), k
    imgs = [_t(i) for i in _imgs(sample_paths, size=(64, 80))]
    assert ms.compute(imgs[0], imgs[0])['clip_i'] == pytest.approx(1.0, abs=1e-5)
    diff = ms.compute(imgs[0], imgs[1])['clip_i']
    assert -1.0 <= diff < 0.999
    # sizes may differ (each image goes through the model's own preprocessing)
    assert ms.compute(imgs[0], torch.nn.functional.interpolate(imgs[0], scale_factor=2))['clip_i'] > diff
    info = ms.describe()['clip_i']
    assert info['options']['checkpoint'] == str(ckpt) and info['options']['quick_gelu'] is False
    # OpenAI's original checkpoints are TorchScript archives: same weights, same scores
    jit = tmp_path / 'tiny_clip_jit.pt'
    torch.jit.trace(_JitHolder(model.eval()), torch.ones(1)).save(str(jit))
    ms_jit = MetricSet(['clip_i'], weights_dir=str(tmp_path / 'w'), clip_i={**opts, 'pretrained': str(jit)})
    assert not ms_jit.failed, ms_jit.failed
    assert ms_jit.compute(imgs[0], imgs[1])['clip_i'] == pytest.approx(diff, abs=1e-6)
    # a missing checkpoint or an unknown tag fails alone, in one line
    bad = MetricSet(['psnr', 'clip_i'], weights_dir=str(tmp_path / 'w'),
                    clip_i={'model': 'ViT-B-32', 'pretrained': 'laion2b_s34b_b79k'})
    assert set(bad.metrics) == {'psnr'}
    assert 'laion/CLIP-ViT-B-32-laion2B-s34B-b79K' in bad.failed['clip_i'] and '\n' not in bad.failed['clip_i']


class _JitHolder(torch.nn.Module):
    """Carries a CLIP's parameters under the same names so that torch.jit.trace can save them
    as a TorchScript archive, the format of the published RN50.pt that pyiqa's loader expects."""

    def __init__(self, model):
        super().__init__()
        for n, c in model.named_children():
            setattr(self, n, c)
        for n, p in model.named_parameters(recurse=False):
            setattr(self, n, p)

    def forward(self, x):
        return x * self.logit_scale


def test_clipiqa_with_random_rn50_file(tmp_path, sample_paths):
    from pyiqa.archs.clip_model import CLIP
    hub = tmp_path / 'w'
    (hub / 'clip').mkdir(parents=True)
    torch.manual_seed(0)
    tiny = CLIP(embed_dim=16, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=8,
                vision_patch_size=None, context_length=77, vocab_size=49408, transformer_width=64,
                transformer_heads=1, transformer_layers=1).eval()
    torch.jit.trace(_JitHolder(tiny), torch.ones(1)).save(str(hub / 'clip' / 'RN50.pt'))
    ms = MetricSet(['clipiqa'], weights_dir=str(hub))
    assert not ms.failed, ms.failed
    rec = ms.describe()['clipiqa']
    assert rec['options']['backbone'] == 'RN50' and rec['weight_files'] == [str(hub / 'clip' / 'RN50.pt')]
    clip = ms.metrics['clipiqa'].net.net.clip_model[0].state_dict()
    for k, v in tiny.state_dict().items():  # OpenAI's loader rounds most weights through fp16
        assert torch.allclose(clip[k].float(), v.float(), rtol=2e-3, atol=1e-4), k
    imgs = torch.cat([_t(i) for i in _imgs(sample_paths, size=(64, 64))])
    vals, errors = ms.score_batch(imgs)
    assert errors == [[], [], []]
    assert all(0.0 <= v <= 1.0 for v in vals['clipiqa'])
    single = [ms.compute(imgs[i:i + 1])['clipiqa'] for i in range(3)]
    np.testing.assert_allclose(vals['clipiqa'], single, rtol=1e-4, atol=1e-6)


def test_brisque_with_svm_file(tmp_path, sample_paths):
    hub = tmp_path / 'w'
    (hub / 'pyiqa').mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    torch.save((torch.randn(20, generator=g).double(), torch.rand(20, 36, generator=g).double()),
               hub / 'pyiqa' / 'brisque_svm_weights.pth')
    ms = MetricSet(['brisque'], weights_dir=str(hub))
    assert not ms.failed, ms.failed
    imgs = torch.cat([_t(i) for i in _imgs(sample_paths, size=(64, 80))])
    vals, errors = ms.score_batch(imgs)
    assert errors == [[], [], []] and len(set(round(v, 6) for v in vals['brisque'])) == 3
    np.testing.assert_allclose(vals['brisque'], [ms.compute(imgs[i:i + 1])['brisque'] for i in range(3)],
                               rtol=1e-5)


def test_maniqa_pipal_builds_from_its_checkpoint_alone(tmp_path):
    """MANIQA's ViT backbone is created without fetching timm's ImageNet weights (the PIPAL
    checkpoint, loaded strictly, replaces all of them), so the one pyiqa file is enough."""
    import pyiqa.archs.maniqa_arch as maniqa_arch
    from dalpsr.metrics.weights import offline_weights
    hub = tmp_path / 'w'
    (hub / 'pyiqa').mkdir(parents=True)
    with offline_weights(hub):
        state = maniqa_arch.MANIQA(pretrained=False).state_dict()
    torch.save(_compact(state, ('fc_score', 'fc_weight')), hub / 'pyiqa' / 'MANIQA_PIPAL-ae6d356b.pth')
    del state
    ms = MetricSet(['maniqa'], weights_dir=str(hub))
    assert not ms.failed, ms.failed
    net = ms.metrics['maniqa'].net.net
    assert float(net.vit.patch_embed.proj.weight.abs().sum()) == 0.0  # the checkpoint, not timm's init
    assert ms.describe()['maniqa']['options']['train_dataset'] == 'pipal'
    assert maniqa_arch.timm.__class__.__name__ == 'module'  # the stand-in is removed after building
