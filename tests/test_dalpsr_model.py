"""DaLPSRModel through the shared loop (dalpsr/train.py) on a tiny SD stand-in: the loss on a
fixed batch drops, frozen parts stay bit-identical, stop+resume equals an uninterrupted run,
export loads; prompt composition and options files."""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from dalpsr.data.prompt_compose import PromptComposer, compose_prompt
from dalpsr.utils.misc import sample_rng
from dalpsr.utils.options import OptionError
from dalpsr.utils.registry import DATASET_REGISTRY

REPO = Path(__file__).resolve().parents[1]
_SPEC_PHRASES = ['Deblur with sigma 0~0.25', 'Deblur with sigma 0.75~1']


@DATASET_REGISTRY.register()
class TinySRTriplets(torch.utils.data.Dataset):
    """C3-shaped items from a fixed real photograph: 32x32 HR crops, x4 area-downsampled LR
    (+ noise whose level is the restoration label), everything from ``sample_rng(seed, i)``."""

    def __init__(self, length: int = 4, size: int = 32, seed: int = 0):
        from skimage import data as skdata
        img = torch.from_numpy(skdata.astronaut().astype(np.float32) / 255).permute(2, 0, 1)[None]
        self.img = F.interpolate(img, size=(96, 96), mode='area')[0]
        self.length, self.size, self.seed = int(length), int(size), int(seed)

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        item = int(i) % self.length
        rng = sample_rng(self.seed, item)
        y, x = (int(v) for v in rng.integers(0, 96 - self.size, 2))
        gt = self.img[:, y:y + self.size, x:x + self.size].contiguous()
        label = int(rng.integers(0, 2))
        lq = F.interpolate(gt[None], scale_factor=0.25, mode='area')[0]
        lq = (lq + (0.1 * label) * torch.from_numpy(rng.standard_normal(lq.shape).astype(np.float32))).clamp(0, 1)
        return {'gt': gt, 'lq': lq, 'labels': torch.tensor([label]), 'prompt': _SPEC_PHRASES[label],
                'caption': 'a woman in a space suit' if item % 2 else '', 'params': '{}', 'key': f'k{item}',
                'index': int(i)}


def _recording_model_class():
    """DaLPSRModel that, at each validation, saves its ControlNet weights per process instead of
    sampling, and records the dataset indices each process trained on (multi-process test)."""
    from dalpsr.models.dalpsr_model import DaLPSRModel
    from dalpsr.utils.registry import MODEL_REGISTRY

    class RecordingDaLPSRModel(DaLPSRModel):
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
            state = {k: v.detach().cpu() for k, v in self.unwrap(self.controlnet).state_dict().items()}
            torch.save(state, self.record_dir / f'cn_rank{self.rank}_step{step}.pth')
            return {}

    if 'RecordingDaLPSRModel' not in MODEL_REGISTRY:
        MODEL_REGISTRY.register()(RecordingDaLPSRModel)


_recording_model_class()



@pytest.fixture(scope='module')
def tiny_sd(tmp_path_factory):
    from dalpsr.archs.sd_components import build_tiny_sd
    return build_tiny_sd(tmp_path_factory.mktemp('sd') / 'tiny_sd', seed=0)


def _opt(root, sd, name='dal', **train):
    t = {'total_iter': 6, 'batch_size': 2, 'num_workers': 0, 'optimizer': {'type': 'Adam', 'lr': 1e-2},
         'scheduler': {'type': 'constant', 'warmup_iter': 0}, 'max_grad_norm': 1.0, 'checkpoint_freq': 100,
         'val_freq': 0, 'print_freq': 100, 'cpu': True, 'tensorboard': False, 'progress_bar': False}
    t.update(train)
    return {'name': name, 'seed': 3, 'imports': ['tests.test_dalpsr_model'], 'path': {'experiments_root': str(root)},
            'model': {'type': 'DaLPSRModel', 'sd': {'pretrained': sd},
                      'controlnet': {'condition_mode': 'latent', 'conditioning_embedding_out_channels': [16]},
                      'prompt': {'empty_dropout': 0.2, 'caption_dropout': 0.3}, 'gradient_checkpointing': False,
                      'val': {'num_images': 1, 'num_steps': 2, 'loss_timesteps': [200, 700]}},
            'datasets': {'train': {'type': 'TinySRTriplets', 'length': 2},
                         'val': {'type': 'TinySRTriplets', 'length': 2, 'seed': 5}},
            'train': t, '_source': '<dalpsr test options>', '_args': {'resume': 'auto', 'force': False}}


def _build(opt):
    from dalpsr.models import build_model
    from dalpsr.utils.misc import set_random_seed
    set_random_seed(opt['seed'])
    return build_model(opt, None)


def _fixed_batch():
    ds = TinySRTriplets(length=2)
    return torch.utils.data.default_collate([ds[0], ds[1]])


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_training_lowers_fixed_batch_loss_and_keeps_frozen_parts(tiny_sd, tmp_path):
    from dalpsr.archs.controlnet_arch import load_dalpsr_export
    from dalpsr.train import train
    opt = _opt(tmp_path, tiny_sd, total_iter=8, val_freq=8)
    before = _build(copy.deepcopy(opt))
    assert list(before.trainable_modules()) == ['controlnet']
    batch = _fixed_batch()
    loss0 = before.fixed_batch_loss(batch, (200, 700))
    frozen0 = {n: _state(getattr(before, n)) for n in ('unet', 'vae', 'text_encoder')}
    cn0 = _state(before.controlnet)

    res = train(copy.deepcopy(opt))
    model = res['model']
    assert res['step'] == 8 and all(np.isfinite(res['losses']))
    loss1 = model.fixed_batch_loss(batch, (200, 700))
    assert loss1 < 0.9 * loss0, (loss0, loss1)
    for n, ref in frozen0.items():
        now = _state(getattr(model, n))
        assert all(torch.equal(ref[k], now[k]) for k in ref), n
    cn1 = _state(model.unwrap(model.controlnet))
    assert any(not torch.equal(cn0[k], cn1[k]) for k in cn0)
    assert set(res['val']) == {'loss', 'psnr'} and np.isfinite(res['val']['loss'])

    cn, meta = load_dalpsr_export(res['export'])
    assert meta['condition_mode'] == 'latent' and meta['scale'] == 4
    assert meta['sd']['pretrained'] == tiny_sd and meta['prediction_type'] == 'epsilon'
    assert PromptComposer.from_opt(meta['prompt']).empty_dropout == 0.2
    exp = cn.state_dict()
    assert all(torch.equal(exp[k], cn1[k]) for k in cn1)


def test_stop_and_resume_equals_uninterrupted(tiny_sd, tmp_path):
    from dalpsr.train import train
    full = train(_opt(tmp_path / 'a', tiny_sd, total_iter=4, export=False))
    part = train(_opt(tmp_path / 'b', tiny_sd, total_iter=4, stop_after_iter=2, export=False))
    assert part['step'] == 2
    resumed = train(_opt(tmp_path / 'b', tiny_sd, total_iter=4, export=False))
    assert resumed['step'] == 4 and len(resumed['losses']) == 2
    assert resumed['losses'] == full['losses'][2:]
    a = _state(full['model'].unwrap(full['model'].controlnet))
    b = _state(resumed['model'].unwrap(resumed['model'].controlnet))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_trainable_patterns_and_bad_options(tiny_sd, tmp_path):
    opt = _opt(tmp_path, tiny_sd)
    opt['model']['trainable'] = ['controlnet', 'unet.up_blocks.*.attentions.*.transformer_blocks.*.attn2.to_k*']
    opt['model']['gradient_checkpointing'] = False
    m = _build(opt)
    assert list(m.trainable_modules()) == ['controlnet', 'unet']
    names = [n for n, p in m.unet.named_parameters() if p.requires_grad]
    assert names and all('attn2.to_k' in n and n.startswith('up_blocks') for n in names)
    assert m.unet.dtype == torch.float32
    out = m.training_step(_fixed_batch(), 0)
    out['loss'].backward()
    assert all(p.grad is not None for n, p in m.unet.named_parameters() if p.requires_grad)
    assert all(p.grad is None for n, p in m.unet.named_parameters() if not p.requires_grad)

    for key, val, msg in [('trainable', ['nothing.here'], 'matches no parameter'),
                          ('trainable', ['vae'], 'VAE'),
                          ('restoration_prompt_source', 'llava', 'restoration_prompt_source'),
                          ('conditionmode', 'latent', "unknown key 'conditionmode'")]:
        bad = _opt(tmp_path, tiny_sd)
        bad['model'][key] = val
        with pytest.raises(OptionError, match=msg):
            _build(bad)
    bad = _opt(tmp_path, tiny_sd)
    bad['model']['prompt'] = {'order': ['caption', 'tags']}
    with pytest.raises(OptionError, match='order'):
        _build(bad)


def test_v_prediction_target_and_bf16_frozen_parts(tmp_path):
    from dalpsr.archs.sd_components import build_tiny_sd
    sd = build_tiny_sd(tmp_path / 'v', seed=0, prediction_type='v_prediction')
    opt = _opt(tmp_path, sd)
    opt['model']['frozen_dtype'] = 'bf16'
    m = _build(opt)
    assert m.prediction_type == 'v_prediction' and m.unet.dtype == torch.bfloat16
    assert m.controlnet.dtype == torch.float32
    z0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([10, 900])
    ac = m.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(m.target(z0, noise, t), ac.sqrt() * noise - (1 - ac).sqrt() * z0)
    out = m.training_step(_fixed_batch(), 0)
    assert torch.isfinite(out['loss'])


def test_prompt_composition():
    pr, cap = 'Deblur with sigma 0.5~0.75, Denoise with sigma 0~0.25', 'A red car on a street.'
    assert compose_prompt(cap, pr) == f'{pr}. A red car on a street.'
    assert compose_prompt(cap, pr, {'order': ['caption', 'restoration'], 'separator': '. '}) == \
        f'A red car on a street. {pr}'
    assert compose_prompt(cap, pr, {'use_restoration': False}) == cap          # w/o IRPAD
    assert compose_prompt(cap, pr, {'use_caption': False}) == pr               # w/o MLLM
    assert compose_prompt(cap, pr, {'use_caption': False, 'use_restoration': False}) == ''
    assert compose_prompt('', pr, {'added_prompt': 'clean, 8k'}) == f'{pr}. clean, 8k'
    assert compose_prompt(cap, pr, drop=['caption']) == pr
    assert compose_prompt(cap, pr, drop=['empty']) == ''
    with pytest.raises(OptionError, match='unknown key'):
        compose_prompt(cap, pr, {'sep': ', '})
    with pytest.raises(ValueError, match='empty_dropout'):
        PromptComposer(empty_dropout=1.5)
    # dropout rates are honoured and depend only on the generator
    c = PromptComposer(empty_dropout=0.1, caption_dropout=0.5, restoration_dropout=0.0)
    drops = [c.sample_drops(sample_rng(0, i, 7)) for i in range(4000)]
    assert abs(np.mean(['empty' in d for d in drops]) - 0.1) < 0.02
    assert abs(np.mean(['caption' in d for d in drops]) - 0.5) < 0.03
    assert not any('restoration' in d for d in drops)
    assert drops[:50] == [c.sample_drops(sample_rng(0, i, 7)) for i in range(50)]


def test_options_files_are_valid_and_ablations_differ():
    from dalpsr.models.dalpsr_model import DEFAULTS
    from dalpsr.utils.options import check_keys, load_options
    want = {'train_dalpsr_sd21.yml': (True, True), 'train_dalpsr_sd21_wo_irpad.yml': (True, False),
            'train_dalpsr_sd21_wo_mllm.yml': (False, True), 'train_dalpsr_sd21_wo_both.yml': (False, False),
            'train_dalpsr_tiny.yml': (True, True)}
    for name, (use_cap, use_rp) in want.items():
        opt = load_options(str(REPO / 'options' / 'train' / name))
        m = dict(opt['model'])
        assert m.pop('type') == 'DaLPSRModel'
        check_keys(m, DEFAULTS, name)
        c = PromptComposer.from_opt(m.get('prompt'))
        assert (c.use_caption, c.use_restoration) == (use_cap, use_rp), name
        if name != 'train_dalpsr_tiny.yml':  # the paper's settings
            assert opt['train']['optimizer']['type'] == 'Adam' and opt['train']['optimizer']['lr'] == 2e-5
            assert opt['train']['batch_size'] == 4 and opt['train']['total_iter'] == 100000
            assert opt['datasets']['train']['gt_size'] == 512
            assert m['sd']['pretrained'] == 'stabilityai/stable-diffusion-2-1-base'


# ---------------------------------------------------------------------------------------------
# issue-6 audit: IRPAD prompts, gradient checkpointing, SDPA, mixed precision, tensorboard, cap

def test_restoration_prompt_from_irpad_export(tiny_sd, tmp_path):
    """restoration_prompt_source: irpad -> p_r is the IRPAD export's prediction on the LR, in the
    C2 prompt format, and enters the composed prompt (not the recorded-label prompt)."""
    from dalpsr.archs.irpad_arch import IRPAD
    from dalpsr.data.prompt_labels import PromptSpec
    from dalpsr.models.irpad_model import IRPADPredictor, save_irpad
    spec = PromptSpec.from_opt(None)
    torch.manual_seed(0)
    net = IRPAD(len(spec.types), spec.num_intervals, spec.candidates(),
                image_encoder={'type': 'conv', 'channels': [8, 16]}, embed_dim=16, num_blocks=1, num_heads=2)
    save_irpad(net, spec.to_opt(), str(tmp_path / 'irpad'))
    opt = _opt(tmp_path, tiny_sd)
    opt['model'].update(restoration_prompt_source='irpad', irpad={'path': str(tmp_path / 'irpad')},
                        prompt={'use_caption': False})
    m = _build(opt)
    batch = _fixed_batch()
    batch['lq'][1] = 1 - batch['lq'][1]  # two different LR images
    want = IRPADPredictor.from_pretrained(str(tmp_path / 'irpad')).predict_prompt(batch['lq'])
    got = m.restoration_prompts(batch)
    assert got == want and all(p not in _SPEC_PHRASES for p in got)
    assert [spec.prompt(spec.parse(p)) for p in got] == got
    assert m.compose_prompts(batch, training=False) == got  # w/o MLLM: p_r alone
    assert torch.isfinite(m.training_step(batch, 0)['loss'])

    bad = _opt(tmp_path, tiny_sd)
    bad['model']['restoration_prompt_source'] = 'irpad'
    with pytest.raises(OptionError, match='irpad.path'):
        _build(bad)
    bad['model']['irpad'] = {'path': str(tmp_path / 'nowhere')}
    with pytest.raises(FileNotFoundError, match='irpad.json'):
        _build(bad)


def _step_grads(model, batch):
    torch.manual_seed(11)
    out = model.training_step(batch, 0)
    out['loss'].backward()
    grads = {n: p.grad.clone() for n, p in model.controlnet.named_parameters() if p.grad is not None}
    return float(out['loss'].detach()), grads


def test_gradient_checkpointing_recomputes_and_matches(tiny_sd, tmp_path):
    """With gradient_checkpointing the ControlNet's blocks run forward twice per step (the
    recomputation in backward) and loss and gradients equal the plain step."""
    batch = _fixed_batch()
    res = {}
    for flag in (False, True):
        opt = _opt(tmp_path, tiny_sd)
        opt['model']['gradient_checkpointing'] = flag
        m = _build(opt)
        assert m.controlnet.is_gradient_checkpointing == flag and m.unet.is_gradient_checkpointing == flag
        calls = []
        block = m.controlnet.down_blocks[0].resnets[0]
        fwd = block.forward  # (forward hooks do not fire in the recomputation; count forward calls)

        def counting(*args, **kwargs):
            calls.append(1)
            return fwd(*args, **kwargs)
        block.forward = counting
        res[flag] = _step_grads(m, batch)
        assert len(calls) == (2 if flag else 1), (flag, len(calls))
    (l0, g0), (l1, g1) = res[False], res[True]
    assert l0 == pytest.approx(l1, rel=1e-5)
    assert set(g0) == set(g1) and len(g0) > 10
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6)


def test_sdpa_attention_by_default(tiny_sd, tmp_path):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    batch = _fixed_batch()
    out = {}
    for mode in ('sdpa', 'default'):
        opt = _opt(tmp_path, tiny_sd)
        if mode == 'default':
            opt['model']['attention'] = 'default'
        else:
            assert 'attention' not in opt['model']  # the default
        m = _build(opt)
        want = AttnProcessor2_0 if mode == 'sdpa' else AttnProcessor
        for net in (m.unet, m.controlnet):
            procs = net.attn_processors
            assert procs and all(type(p) is want for p in procs.values()), mode
        out[mode] = m.fixed_batch_loss(batch, (300,))
    assert out['sdpa'] == pytest.approx(out['default'], rel=1e-4)


def test_bf16_run_keeps_fp32_weights_writes_tensorboard_and_caps_checkpoints(tiny_sd, tmp_path):
    """A bf16 mixed-precision run through the loop: trainable ControlNet and its optimizer
    state stay fp32 (frozen parts bf16); validation sample images and val/train losses land in
    the tensorboard event file; only keep_checkpoints checkpoints remain."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dalpsr.train import train
    opt = _opt(tmp_path, tiny_sd, name='mp', total_iter=6, val_freq=3, checkpoint_freq=2, keep_checkpoints=2,
               tensorboard=True, print_freq=1, mixed_precision='bf16', export=False)
    res = train(opt)
    m = res['model']
    assert res['step'] == 6 and all(np.isfinite(res['losses']))
    cn = m.unwrap(m.controlnet)
    assert {p.dtype for p in cn.parameters()} == {torch.float32}
    assert m.unet.dtype == m.vae.dtype == m.text_encoder.dtype == torch.bfloat16
    exp = tmp_path / 'mp'
    assert sorted(p.name for p in (exp / 'checkpoints').iterdir()) == ['checkpoint-4', 'checkpoint-6']
    ostate = torch.load(exp / 'checkpoints' / 'checkpoint-6' / 'optimizer.bin', weights_only=False)
    moments = [v for st in ostate['state'].values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
    assert moments and all(v.dtype == torch.float32 for v in moments)

    acc = EventAccumulator(str(exp / 'tb'), size_guidance={'images': 0, 'scalars': 0})
    acc.Reload()
    tags = acc.Tags()
    assert 'val/sample_0' in tags['images']
    imgs = acc.Images('val/sample_0')
    assert [e.step for e in imgs] == [3, 6]
    assert imgs[0].width == 3 * 32 and imgs[0].height == 32  # LR-up | SR | GT side by side
    assert [e.step for e in acc.Scalars('val/loss')] == [3, 6]
    assert all(np.isfinite(e.value) for e in acc.Scalars('val/loss'))
    assert [e.step for e in acc.Scalars('train/loss')] == [1, 2, 3, 4, 5, 6]


def test_two_process_accelerate_run_keeps_controlnet_replicas_in_sync(tiny_sd, tmp_path):
    """``accelerate launch`` with two CPU processes (gloo) on the tiny DaLPSR setup: both
    replicas hold identical ControlNet weights after every step checked, they trained, the
    processes saw disjoint samples, and the export (main process) holds the final weights."""
    from dalpsr.archs.controlnet_arch import load_dalpsr_export
    from tests.test_accelerate_multiproc import _launch
    rec = tmp_path / 'rec'
    opt = _opt(tmp_path / 'exp', tiny_sd, name='mp2', total_iter=3, batch_size=1, val_freq=1, checkpoint_freq=3)
    opt['model']['type'] = 'RecordingDaLPSRModel'
    opt['model']['record_dir'] = str(rec)
    opt['datasets']['train']['length'] = 8
    opt['train'].pop('cpu')
    for k in ('_source', '_args'):
        opt.pop(k)
    opt_file = tmp_path / 'mp2.yml'
    opt_file.write_text(yaml.safe_dump(opt))
    r = _launch(opt_file)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert '2 process(es)' in r.stdout + r.stderr
    cn = {(rank, step): torch.load(rec / f'cn_rank{rank}_step{step}.pth') for rank in (0, 1) for step in (1, 3)}
    keys = list(cn[0, 1])
    for step in (1, 3):
        assert all(torch.equal(cn[0, step][k], cn[1, step][k]) for k in keys), step
    assert any(not torch.equal(cn[0, 1][k], cn[0, 3][k]) for k in keys)
    seen = [[int(v) for v in (rec / f'rank{rank}.txt').read_text().split()] for rank in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 3 and not set(seen[0]) & set(seen[1])
    exported, _ = load_dalpsr_export(tmp_path / 'exp' / 'mp2' / 'export')
    final = exported.state_dict()
    assert all(torch.equal(final[k], cn[0, 3][k]) for k in keys)


def test_reference_options_document_every_model_key_with_the_defaults(tiny_sd):
    """options/reference/diffusion.yml lists every DaLPSRModel key (and sd/prompt sub-keys) with
    the code's default, each commented at its first occurrence, and its model block builds."""
    import re

    from dalpsr.archs.sd_components import SD_KEYS
    from dalpsr.models.dalpsr_model import DEFAULTS
    from dalpsr.utils.options import load_options
    path = REPO / 'options' / 'reference' / 'diffusion.yml'
    opt = load_options(str(path))
    text = path.read_text()
    m = dict(opt['model'])
    assert m.pop('type') == 'DaLPSRModel'
    assert set(m) == set(DEFAULTS)
    for k, v in DEFAULTS.items():
        if k == 'sd':
            assert set(m['sd']) == set(SD_KEYS)
            assert all(m['sd'][s] is None for s in SD_KEYS if s not in ('pretrained', 'dtype'))
        elif k == 'prompt':
            assert m['prompt'] == PromptComposer().to_opt()
        else:
            assert m[k] == v, k
    keys = set()

    def walk(d):
        for k, v in d.items():
            keys.add(k)
            if isinstance(v, dict):
                walk(v)
    walk(m)
    for key in keys:
        lines = [ln for ln in text.splitlines() if re.match(rf'\s*{re.escape(key)}:', ln)]
        assert lines and '#' in lines[0].split(f'{key}:', 1)[1], key
    opt['model']['sd']['pretrained'] = tiny_sd
    opt['model']['controlnet']['conditioning_embedding_out_channels'] = [16]  # tiny UNet
    model = _build(opt)
    assert list(model.trainable_modules()) == ['controlnet'] and model.controlnet.is_gradient_checkpointing
    bad = _opt('.', tiny_sd)
    bad['model'].update(restoration_prompt_source='irpad', irpad={'path': 'x', 'device': 'cuda'})
    with pytest.raises(OptionError, match="unknown key 'device'"):
        _build(bad)


def test_min_snr_weights_follow_the_formula():
    """Min-SNR-gamma: w = min(snr, g) / snr (eps) or / (snr + 1) (v), snr = abar / (1 - abar)."""
    import types

    from diffusers import DDPMScheduler

    from dalpsr.models.dalpsr_model import DaLPSRModel
    sched = DDPMScheduler(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 10, 250, 500, 999])
    ac = sched.alphas_cumprod[t].double()
    snr = ac / (1 - ac)
    for pred, denom in (('epsilon', snr), ('v_prediction', snr + 1)):
        fake = types.SimpleNamespace(noise_scheduler=sched, cfg={'snr_gamma': 5.0}, prediction_type=pred)
        w = DaLPSRModel._snr_weights(fake, t).double()
        want = torch.minimum(snr, torch.full_like(snr, 5.0)) / denom
        torch.testing.assert_close(w, want, rtol=1e-5, atol=0)
        assert w[0] < 1.0 and (pred == 'v_prediction' or abs(float(w[-1]) - 1.0) < 1e-6)
