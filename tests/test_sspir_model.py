"""SSPIRModel through the shared loop (dalpsr/train.py) on tiny SD / CLIP stand-ins and real photos:
the loss falls, frozen parts stay bit-identical, export reloads, stop+resume is exact, two CPU
processes keep the replicas in sync; losses, caption dropout, options files."""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from dalpsr.utils.options import OptionError

REPO = Path(__file__).resolve().parents[1]


def _recording_model_class():
    """SSPIRModel that saves its trainable weights per process at each validation and records the
    dataset indices each process trained on (multi-process test)."""
    from dalpsr.models.sspir_model import SSPIRModel
    from dalpsr.utils.registry import MODEL_REGISTRY

    class RecordingSSPIRModel(SSPIRModel):
        def __init__(self, opt, accelerator=None):
            opt = copy.deepcopy(opt)
            self.record_dir = Path(opt['model'].pop('record_dir'))
            super().__init__(opt, accelerator)
            self.rank = accelerator.process_index if accelerator is not None else 0

        def training_step(self, batch, step):
            self.record_dir.mkdir(parents=True, exist_ok=True)
            with open(self.record_dir / f'rank{self.rank}.txt', 'a') as f:
                f.write(' '.join(str(int(i)) for i in batch['index']) + '\n')
            return super().training_step(batch, step)

        def validate(self, loader, step, writer=None):
            from dalpsr.archs.sspir_arch import trainable_state_dict
            parts = {k: self._raw(k) for k in ('controlnet', 'processor', 'refine')}
            torch.save(trainable_state_dict(parts, self._raw('unet')), self.record_dir / f'w_rank{self.rank}_step{step}.pth')
            return {}

    if 'RecordingSSPIRModel' not in MODEL_REGISTRY:
        MODEL_REGISTRY.register()(RecordingSSPIRModel)


_recording_model_class()


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    from dalpsr.archs.sd_components import build_tiny_sd
    from dalpsr.archs.sspir_arch import build_tiny_clip_vision
    root = tmp_path_factory.mktemp('sspir')
    return {'sd': build_tiny_sd(root / 'tiny_sd', seed=0), 'clip': build_tiny_clip_vision(root / 'tiny_clip', seed=0)}


def _opt(root, tiny, hr, name='ssp', **train):
    """The tiny recipe (options/train/train_sspir_tiny.yml) pointed at tmp stand-ins and ``hr``."""
    from dalpsr.utils.options import load_options
    opt = load_options(str(REPO / 'options' / 'train' / 'train_sspir_tiny.yml'))
    opt['name'] = name
    opt['seed'] = 3
    opt['path'] = {'experiments_root': str(root)}
    opt['model']['sd']['pretrained'] = tiny['sd']
    opt['model']['clip']['pretrained'] = tiny['clip']
    for ph in ('train', 'val'):
        opt['datasets'][ph]['dataroot_gt'] = str(hr)
        opt['datasets'][ph]['gt_size'] = 32
    opt['datasets']['val']['length'] = 2
    t = opt['train']
    t.update({'total_iter': 6, 'checkpoint_freq': 100, 'val_freq': 0, 'print_freq': 100, 'tensorboard': False,
              'progress_bar': False, 'optimizer': {'type': 'AdamW', 'lr': 1e-2, 'weight_decay': 1e-2}})
    t.update(train)
    opt['_args'] = {'resume': 'auto', 'force': False}
    return opt


def _build(opt):
    from dalpsr.models import build_model
    from dalpsr.utils.misc import set_random_seed
    set_random_seed(opt['seed'])
    return build_model(copy.deepcopy(opt), None)


def _fixed_batch(opt):
    from dalpsr.utils.registry import DATASET_REGISTRY
    cfg = dict(opt['datasets']['val'])
    cfg.pop('batch_size', None)
    ds = DATASET_REGISTRY.build(cfg)
    return torch.utils.data.default_collate([ds[0], ds[1]])


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_training_on_photos_lowers_the_loss_keeps_frozen_parts_and_exports(tiny, hr_folder, tmp_path):
    from dalpsr.archs.sspir_arch import trainable_state_dict
    from dalpsr.train import train
    opt = _opt(tmp_path, tiny, hr_folder, total_iter=8, val_freq=8)
    before = _build(opt)
    assert list(before.trainable_modules()) == ['controlnet', 'processor', 'refine', 'unet']
    batch = _fixed_batch(opt)
    loss0 = before.fixed_batch_loss(batch, (200, 700))
    frozen0 = {n: _state(getattr(before, n)) for n in ('vae', 'text_encoder', 'clip')}
    unet_frozen0 = {k: v.detach().clone() for k, v in before.unet.named_parameters() if not v.requires_grad}
    w0 = trainable_state_dict({k: getattr(before, k) for k in ('controlnet', 'processor', 'refine')}, before.unet)

    res = train(copy.deepcopy(opt))
    model = res['model']
    assert res['step'] == 8 and all(np.isfinite(res['losses']))
    loss1 = model.fixed_batch_loss(batch, (200, 700))
    assert loss1 < 0.9 * loss0, (loss0, loss1)
    for n, ref in frozen0.items():
        now = _state(getattr(model, n))
        assert all(torch.equal(ref[k], now[k]) for k in ref), n
    unet = model.unwrap(model.unet)
    now = dict(unet.named_parameters())
    assert all(torch.equal(v, now[k]) for k, v in unet_frozen0.items())
    parts = {k: model.unwrap(getattr(model, k)) for k in ('controlnet', 'processor', 'refine')}
    w1 = trainable_state_dict(parts, unet)
    for prefix in ('controlnet.', 'processor.', 'refine.', 'unet.'):
        assert any(not torch.equal(w0[k], w1[k]) for k in w0 if k.startswith(prefix)), prefix
    assert set(res['val']) == {'loss', 'processor_psnr'}

    # the export restores every trained tensor and the same loss
    ex = _opt(tmp_path / 'x', tiny, hr_folder)
    ex['model']['pretrained'] = str(res['export'])
    again = _build(ex)
    w2 = trainable_state_dict({k: getattr(again, k) for k in ('controlnet', 'processor', 'refine')}, again.unet)
    assert set(w2) == set(w1) and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert again.fixed_batch_loss(batch, (200, 700)) == pytest.approx(loss1, rel=1e-5)
    bad = copy.deepcopy(ex)
    bad['model']['arch']['image_dim'] = 16
    with pytest.raises(OptionError, match='trained with arch'):
        _build(bad)


def test_stop_and_resume_equals_uninterrupted(tiny, hr_folder, tmp_path):
    from dalpsr.archs.sspir_arch import trainable_state_dict
    from dalpsr.train import train
    full = train(_opt(tmp_path / 'a', tiny, hr_folder, total_iter=4, export=False))
    part = train(_opt(tmp_path / 'b', tiny, hr_folder, total_iter=4, stop_after_iter=2, export=False))
    assert part['step'] == 2
    resumed = train(_opt(tmp_path / 'b', tiny, hr_folder, total_iter=4, export=False))
    assert resumed['step'] == 4 and resumed['losses'] == full['losses'][2:]

    def weights(r):
        m = r['model']
        return trainable_state_dict({k: m.unwrap(getattr(m, k)) for k in ('controlnet', 'processor', 'refine')},
                                    m.unwrap(m.unet))
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_run_keeps_replicas_in_sync(tiny, hr_folder, tmp_path):
    from tests.test_accelerate_multiproc import _launch
    rec = tmp_path / 'rec'
    opt = _opt(tmp_path / 'exp', tiny, hr_folder, name='mp', total_iter=3, batch_size=1, val_freq=1,
               checkpoint_freq=3, export=False)
    opt['model']['type'] = 'RecordingSSPIRModel'
    opt['model']['record_dir'] = str(rec)
    opt['imports'] = ['tests.test_sspir_model']
    opt['train'].pop('cpu')
    for k in ('_source', '_args'):
        opt.pop(k, None)
    opt_file = tmp_path / 'mp.yml'
    opt_file.write_text(yaml.safe_dump(opt))
    r = _launch(opt_file)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert '2 process(es)' in r.stdout + r.stderr
    w = {(rank, step): torch.load(rec / f'w_rank{rank}_step{step}.pth') for rank in (0, 1) for step in (1, 3)}
    keys = list(w[0, 1])
    assert any(k.startswith('unet.') for k in keys)
    for step in (1, 3):
        assert all(torch.equal(w[0, step][k], w[1, step][k]) for k in keys), step
    assert any(not torch.equal(w[0, 1][k], w[0, 3][k]) for k in keys)
    seen = [[int(v) for v in (rec / f'rank{rank}.txt').read_text().split()] for rank in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 3 and not set(seen[0]) & set(seen[1])


def test_multiscale_losses():
    from dalpsr.models.sspir_model import fft_l1, multiscale_losses
    torch.manual_seed(0)
    gt = torch.rand(2, 3, 32, 32)
    g = gt * 2 - 1
    exact = [F.interpolate(g, size=(s, s), mode='bilinear', align_corners=False) for s in (16, 8, 4)]
    l1, ff = multiscale_losses(exact, gt)
    assert float(l1) == pytest.approx(0, abs=1e-6) and float(ff) == pytest.approx(0, abs=1e-5)
    off = [e + 0.1 for e in exact]  # a constant offset: L1 0.1 per scale; only the DC bin of the spectrum moves
    l1, ff = multiscale_losses(off, gt)
    assert float(l1) == pytest.approx(0.3, rel=1e-5)
    for e, o in zip(exact, off):
        s = e.shape[-1]
        dc = 0.1 * s * s  # rfft2 of a constant c on s x s: c*s*s at (0, 0)
        n_vals = 2 * s * (s // 2 + 1)
        assert float(fft_l1(o, e)) == pytest.approx(dc / n_vals, rel=1e-4)


def test_caption_dropout_is_per_sample_deterministic_and_at_the_rate():
    from types import SimpleNamespace

    from dalpsr.models.sspir_model import SSPIRModel
    m = SimpleNamespace(seed=3, cfg={'caption_dropout': 0.5})
    m.captions = SSPIRModel.captions.__get__(m)
    n = 400
    batch = {'lq': torch.zeros(n, 3, 2, 2), 'caption': [f'cap {i}' for i in range(n)], 'index': torch.arange(n)}
    a = m.captions(batch, training=True)
    assert a == m.captions(batch, training=True)
    dropped = sum(1 for c in a if c == '')
    assert 150 < dropped < 250  # p = 0.5
    assert all(c in ('', f'cap {i}') for i, c in enumerate(a))
    assert m.captions(batch, training=False) == batch['caption']
    # the same sample gets the same decision in another batch composition
    sub = {'lq': torch.zeros(2, 3, 2, 2), 'caption': batch['caption'][10:12], 'index': torch.arange(10, 12)}
    assert m.captions(sub, training=True) == a[10:12]


def test_bad_options_and_missing_weights(tiny, hr_folder, tmp_path):
    opt = _opt(tmp_path, tiny, hr_folder)
    bad = copy.deepcopy(opt)
    bad['model']['arch']['image_dims'] = 3
    with pytest.raises(OptionError, match='image_dims'):
        _build(bad)
    bad = copy.deepcopy(opt)
    bad['model']['caption_dropout'] = 2
    with pytest.raises(OptionError, match='caption_dropout'):
        _build(bad)
    bad = copy.deepcopy(opt)
    bad['model']['clip']['pretrained'] = str(tmp_path / 'nowhere')
    with pytest.raises(FileNotFoundError, match='nowhere'):
        _build(bad)
    bad = copy.deepcopy(opt)
    bad['model']['pretrained'] = str(tmp_path)
    with pytest.raises(OptionError, match='sspir.json'):
        _build(bad)


def test_reference_options_document_every_key_and_recipes_are_valid():
    from dalpsr.archs.sd_components import SD_KEYS
    from dalpsr.archs.sspir_arch import ARCH_DEFAULTS
    from dalpsr.models.sspir_model import DEFAULTS
    from dalpsr.utils.options import load_options
    path = REPO / 'options' / 'reference' / 'sspir.yml'
    ref = load_options(str(path))['model']
    text = path.read_text()
    assert ref.pop('type') == 'SSPIRModel'
    assert set(ref) == set(DEFAULTS)
    assert set(ref['sd']) == set(SD_KEYS) and set(ref['arch']) == set(ARCH_DEFAULTS)
    for k, v in DEFAULTS.items():
        if k == 'sd':
            assert ref['sd']['pretrained'] == v['pretrained']
        elif isinstance(v, dict):
            assert set(ref[k]) == set(v), k
            assert all(ref[k][kk] == vv for kk, vv in v.items() if k != 'sd'), k
        elif k != 'arch':
            assert ref[k] == v, k
    assert all(ref['arch'][k] == v or list(ref['arch'][k]) == list(v) for k, v in ARCH_DEFAULTS.items())
    for line in text.splitlines():  # every key line is commented (or opens a commented block)
        s = line.strip()
        if s and not s.startswith('#') and s.endswith(':') is False and ':' in s:
            assert '#' in line or s.split(':')[0] in ('type', 'name', 'model'), line
    # the paper recipe: AdamW 5e-5, wd 1e-2, batch 32 = 16 x 2 accumulation, fp16, 100k iterations, SD 1.5
    paper = load_options(str(REPO / 'options' / 'train' / 'train_sspir_sd15.yml'))
    t = paper['train']
    assert t['optimizer'] == {'type': 'AdamW', 'lr': 5e-5, 'weight_decay': 1e-2, 'betas': [0.9, 0.999]}
    assert t['batch_size'] * t['grad_accum'] == 32 and t['mixed_precision'] == 'fp16' and t['total_iter'] == 100000
    assert paper['model']['sd']['pretrained'].endswith('stable-diffusion-v1-5')
    d = paper['datasets']['train']['degradation']
    assert d['noise_range'] == [1.0, 15.0] and d['jpeg_range2'] == [60, 100] and d['second_blur_prob'] == 0.5
    from dalpsr.data.degradations import RealESRGANDegradation
    RealESRGANDegradation(**d)  # every SeeSR setting is a valid degradation key


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny, hr_folder, tmp_path):
    """Checkpointed blocks (diffusers' and the StructureUpBlock wrapper) recompute the priors from
    cross_attention_kwargs: loss and gradients equal the run without checkpointing."""
    opt = _opt(tmp_path, tiny, hr_folder)
    batch = _fixed_batch(opt)
    grads = {}
    for ck in (False, True):
        o = copy.deepcopy(opt)
        o['model']['gradient_checkpointing'] = ck
        m = _build(o)
        assert m.unet.up_blocks[0].block.gradient_checkpointing is ck  # SD's UpBlock2D inside the wrapper
        torch.manual_seed(11)
        out = m.training_step(batch, 0)
        out['loss'].backward()
        named = [(f'{k}.{n}', p) for k, mod in m.trainable_modules().items() for n, p in mod.named_parameters()
                 if p.requires_grad]
        grads[ck] = (float(out['loss'].detach()), {n: p.grad.clone() for n, p in named if p.grad is not None})
    (l0, g0), (l1, g1) = grads[False], grads[True]
    assert l0 == pytest.approx(l1, rel=1e-6)
    assert set(g0) == set(g1) and any('structure_attentions' in n for n in g0)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-4, atol=1e-6), n
