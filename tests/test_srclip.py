"""SRCLIP (DePLSR stage 1): control tower wiring, SigLIP loss, captions of the DePLSR degradation,
retrieval metric, tiny training through train.py, exact resume, eval_srclip.py."""
import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dalpsr.archs.srclip_arch import SRCLIP
from dalpsr.data.deplsr_degradation import (DePLSRDegradation, EVAL_CLASSES, TYPES, captions_from_params,
                                            class_captions)
from dalpsr.losses.siglip_loss import SigLIPLoss
from dalpsr.models.srclip_model import load_srclip, retrieval_accuracy, save_srclip
from tests.script_loader import load_script

TINY_CLIP = {'embed_dim': 16,
             'vision_cfg': {'image_size': 32, 'patch_size': 8, 'width': 32, 'layers': 3, 'head_width': 16},
             'text_cfg': {'context_length': 24, 'vocab_size': 49408, 'width': 32, 'heads': 2, 'layers': 1}}
LITE = {'type': 'SRCLIPLite', 'embed_dim': 16, 'channels': [8, 16], 'text_width': 16, 'text_layers': 1,
        'text_heads': 2, 'context_length': 40}


def _tiny_srclip():
    torch.manual_seed(0)
    return SRCLIP(clip_config=TINY_CLIP)


def test_srclip_starts_as_the_frozen_clip_and_controls_in_reverse_order():
    enc = _tiny_srclip().eval()
    img = torch.rand(2, 3, 20, 28)  # resized to 32 x 32 inside
    with torch.no_grad():
        emb = enc.encode_image(img)
        own = F.normalize(enc.clip.encode_image(enc.preprocess(img)), dim=-1)
    assert torch.allclose(emb['content'], own, atol=1e-5)  # zero projections: the frozen CLIP itself
    assert emb['fine'].shape == (2, 5, 16) and emb['degradation'].shape == (2, 16)
    assert torch.allclose(emb['fine'].norm(dim=-1), torch.ones(2, 5), atol=1e-5)
    # only control block 0 projects: its output must be added after the LAST frozen block
    with torch.no_grad():
        enc.zero_proj[0].weight.copy_(torch.eye(32))
        x = enc.preprocess(img)
        c = enc.control._embeds(x)
        h0 = enc.control.transformer.resblocks[0](c)
        f = enc.clip.visual._embeds(x)
        for blk in enc.clip.visual.transformer.resblocks:
            f = blk(f)
        pooled, _ = enc.clip.visual._pool(f + h0)
        want = F.normalize(pooled @ enc.clip.visual.proj, dim=-1)
        got = enc.encode_image(img)['content']
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, own, atol=1e-3)


def test_srclip_trains_control_only():
    enc = _tiny_srclip().train()
    assert not enc.clip.training  # the frozen CLIP stays in eval mode
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith('clip.') for n in trainable)
    assert any(n.startswith('control.') for n in trainable) and any(n.startswith('zero_proj.') for n in trainable)
    before = {k: v.clone() for k, v in enc.clip.state_dict().items()}
    opt = torch.optim.SGD([p for p in enc.parameters() if p.requires_grad], lr=0.1)
    emb, txt = enc(torch.rand(2, 3, 32, 32), enc.tokenize(['blur with sigma:1.0', 'no ringing']))
    (emb['content'].sum() + emb['fine'].sum() + txt.sum()).backward()
    opt.step()
    for k, v in enc.clip.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert enc.zero_proj[0].weight.abs().sum() > 0  # the zero projections learn
    # a CLIP with random weights (no pretrained source) is stored with the trained parts
    assert any(k.startswith('clip.') for k in enc.trainable_state_dict())
    enc.config['pretrained'] = 'some/file.pt'
    assert not any(k.startswith('clip.') for k in enc.trainable_state_dict())


def test_srclip_export_roundtrip(tmp_path):
    enc = _tiny_srclip()
    with torch.no_grad():
        enc.zero_proj[1].weight.normal_()
    save_srclip(enc, str(tmp_path))
    back, meta = load_srclip(str(tmp_path))
    img = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        a, b = enc.eval().encode_image(img), back.encode_image(img)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert meta['type'] == 'SRCLIP'
    with pytest.raises(FileNotFoundError, match='srclip.safetensors'):
        load_srclip(str(tmp_path / 'missing'))


def test_offline_pretrained_tag_is_one_line_error():
    with pytest.raises(FileNotFoundError, match='pretrained'):
        SRCLIP(model_name='ViT-B-32', pretrained='laion2b_s34b_b79k')


def test_siglip_loss_by_hand_and_same_text_positives():
    loss = SigLIPLoss(init_logit_scale=0.0, init_logit_bias=0.0)
    x = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    y = x.clone()
    # logits = x.y: diag 1 (positive), off-diag 0 (negative)
    want = -(2 * math.log(1 / (1 + math.exp(-1))) + 2 * math.log(0.5)) / 2
    assert abs(float(loss(x, y)) - want) < 1e-6
    assert loss.logit_scale.requires_grad and loss.logit_bias.requires_grad
    assert abs(float(SigLIPLoss().logit_scale.exp()) - 10.0) < 1e-5 and float(SigLIPLoss().logit_bias) == -10.0
    same = SigLIPLoss(0.0, 0.0, same_text_positive=True)
    # two equal captions: the off-diagonal pair becomes a positive
    want2 = -(2 * math.log(1 / (1 + math.exp(-1))) + 2 * math.log(0.5)) / 2
    assert abs(float(same(x, y, ['a', 'b'])) - want2) < 1e-6
    assert abs(float(same(x, y, ['a', 'a'])) - want2) < 1e-6  # logit 0 -> log(0.5) either way
    x3 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert float(same(x3, x3, ['a', 'a'])) < float(loss(x3, x3))  # same captions no longer pushed apart


def test_captions_in_deplsr_format():
    p = {'sigma': 1.2, 'noise': {'kind': 'gaussian', 'sigma': 12.34, 'gray': False}, 'jpeg': 55, 'sinc': None}
    c = captions_from_params(p)
    assert c['full'] == 'blur with sigma:1.2, gaussian noise with sigma:12.3, jpeg with quality factor:55.0'
    assert c['fine'] == ['blur with sigma:1.2', 'gaussian noise with sigma:12.3', 'poisson noise with scale:0.0',
                         'jpeg with quality factor:55.0', 'no ringing and overshoot artifacts']
    p2 = dict(p, noise={'kind': 'poisson', 'scale': 2.0, 'gray': False}, sinc={'type': 'sinc', 'size': 7, 'omega': 2.0})
    assert captions_from_params(p2)['full'].endswith('poisson noise with scale:2.0, jpeg with quality factor:55.0, '
                                                     'ringing and overshoot artifacts')
    assert class_captions('blur', 'A photo with {}')[0] == 'A photo with blur with sigma:0.0'


def test_deplsr_degradation_is_deterministic_and_two_order(sample_paths):
    from dalpsr.utils.img_io import read_image
    gt = read_image(sample_paths['train'][0])[:64, :64]
    deg = DePLSRDegradation(scale=4)
    a = deg(gt, np.random.default_rng(5))
    b = deg(gt, np.random.default_rng(5))
    assert np.array_equal(a['lq'], b['lq']) and a['lq'].shape == (16, 16, 3)
    assert a['captions'] == captions_from_params(a['params'])
    p = dict(a['params'], noise={'kind': 'gaussian', 'sigma': 20.0, 'gray': False}, sigma=1.0,
             kernel={'type': 'iso', 'size': 7, 'sigma_x': 1.0, 'sigma_y': 1.0, 'theta': 0.0}, jpeg=95, sinc=None)
    two = deg.apply(gt, dict(p, chain='two_order'))
    rel = deg.apply(gt, dict(p, chain='released'))
    clean = deg.apply(gt, dict(p, noise={'kind': 'gaussian', 'sigma': 0.0, 'gray': False}, chain='two_order'))
    # the intended chain blurs twice and adds noise twice: noisier than the released one
    assert np.abs(two - clean).std() > np.abs(rel - deg.apply(gt, dict(p, noise={'kind': 'gaussian', 'sigma': 0.0,
                                                                                  'gray': False}, chain='released'))).std()
    sized = DePLSRDegradation(lq_size=24)(gt, np.random.default_rng(1))
    assert sized['lq'].shape == (24, 24, 3)
    with pytest.raises(ValueError, match='chain'):
        DePLSRDegradation(chain='bug')


class _StubEncoder:
    """Text embedding = one-hot of the class value's index within its type (via the caption)."""

    def __init__(self):
        self.table = {}
        for t in TYPES:
            for j, cap in enumerate(class_captions(t)):
                v = torch.zeros(8)
                v[j] = 1
                self.table[cap] = v

    def tokenize(self, texts):
        self._last = list(texts)
        return torch.zeros(len(texts), 1)

    def encode_text(self, tokens):
        return torch.stack([self.table[t] for t in self._last])


def test_retrieval_accuracy_and_chance():
    enc = _StubEncoder()
    values = torch.tensor([[1.1, 5.0, 0.0, 52.0, 1.0], [2.9, 29.0, 0.0, 88.0, 0.0]])
    fine = torch.zeros(2, 5, 8)
    for i, row in enumerate(values.tolist()):  # fine embedding points at the true nearest class
        for k, t in enumerate(TYPES):
            classes = EVAL_CLASSES[t][0]
            fine[i, k, int(np.argmin([abs(c - row[k]) for c in classes]))] = 1
    res = retrieval_accuracy(enc, fine, values)
    assert all(res[f'acc/{t}'] == 1.0 for t in TYPES)
    # chance: gaussian 5.0 is within 10 of classes 0 and 15 (2 of 3), 29.0 of 30 only (1 of 3)
    assert abs(res['chance/gaussian'] - (2 / 3 + 1 / 3) / 2) < 1e-6
    assert res['chance/ringing'] == 0.5
    wrong = torch.zeros_like(fine)
    wrong[:, :, 3] = 1  # always the 4th class (absent for 3-class / 2-class types -> index 3 one-hot is 0)
    res2 = retrieval_accuracy(enc, wrong, values)
    assert res2['acc/blur'] == 0.5  # class 3.0: right for 2.9, wrong for 1.1


def _opt(tmp_path, **train):
    return {
        'name': 'srclip_tiny', 'seed': 0, 'path': {'experiments_root': str(tmp_path / 'exp')},
        'model': {'type': 'SRCLIPModel', 'network': dict(LITE),
                  'loss': {'type': 'SigLIPLoss', 'same_text_positive': True}},
        'datasets': {
            'train': {'type': 'SRCLIPCaptionDataset', 'hr': 'sample:train', 'gt_size': 64, 'num_samples': 32,
                      'seed': 1, 'degradation': {'scale': 2}, 'cache_file': str(tmp_path / 'train.npz')},
            'val': {'type': 'SRCLIPCaptionDataset', 'hr': 'sample:val', 'gt_size': 64, 'num_samples': 16, 'seed': 3,
                    'degradation': {'scale': 2}, 'batch_size': 16}},
        'train': dict({'total_iter': 16, 'batch_size': 8, 'num_workers': 0, 'progress_bar': False,
                       'optimizer': {'type': 'AdamW', 'lr': 3e-3}, 'checkpoint_freq': 4, 'val_freq': 16,
                       'print_freq': 4, 'tensorboard': False}, **train)}


def _run(opt, **args):
    from dalpsr.train import train
    opt = copy.deepcopy(opt)
    opt['_args'] = {'resume': 'auto', 'force': False, **args}
    return train(opt)


def test_tiny_srclip_training_loss_falls_and_exports(tmp_path):
    res = _run(_opt(tmp_path))
    losses = res['losses']
    assert len(losses) == 16
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])
    assert set(res['val']) >= {'acc/blur', 'chance/blur', 'acc/mean'}
    enc, meta = load_srclip(str(res['export']))
    assert meta['type'] == 'SRCLIPLite' and 'logit_scale' in meta
    # eval script on the exported model
    ev = load_script('eval_srclip')
    out = tmp_path / 'eval'
    args = ['--model', str(res['export']), '--num', '12', '--gt-size', '64', '--scale', '2', '--out', str(out)]
    assert ev.main(args) == 0
    rec = json.loads((out / 'metrics.json').read_text())
    assert 0.0 <= rec['metrics']['acc/jpeg'] <= 1.0 and rec['data']['seed'] == 6
    assert ev.main(args) == 2  # existing result refused without --overwrite
    assert ev.main(['--model', str(tmp_path / 'nothing')]) == 2


def test_srclip_exact_resume(tmp_path):
    full = _run(_opt(tmp_path / 'a', total_iter=8))
    _run(_opt(tmp_path / 'b', total_iter=8, stop_after_iter=4))
    resumed = _run(_opt(tmp_path / 'b', total_iter=8))
    assert len(resumed['losses']) == 4
    assert resumed['losses'] == full['losses'][4:]
    a = full['model'].unwrap(full['model'].net).state_dict()
    b = resumed['model'].unwrap(resumed['model'].net).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la, lb = full['model'].unwrap(full['model'].loss_fn), resumed['model'].unwrap(resumed['model'].loss_fn)
    assert torch.equal(la.logit_scale, lb.logit_scale) and torch.equal(la.logit_bias, lb.logit_bias)
