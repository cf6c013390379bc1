"""IRPAD: arch shapes, gradient flow, encoders (conv / tiny open_clip / tiny HF CLIP text),
save/load, retrieval on a separable toy set, metrics, the training model and the predictor API."""
import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch

from dalpsr.archs.irpad_arch import IRPAD, ConvEncoder

CANDS = [[f'{v} with sigma {k / 4:g}~{(k + 1) / 4:g}' for k in range(4)] for v in ('Deblur', 'Denoise', 'Dejpeg')]
TINY = dict(image_encoder={'type': 'conv', 'channels': [8, 16, 16]}, embed_dim=32, num_heads=2, ffn_ratio=2.0)


def _tiny_open_clip_dir(root):
    """A tiny open_clip model saved as an open_clip 'local-dir:' folder (random weights)."""
    import open_clip
    cfg = {'embed_dim': 16,
           'vision_cfg': {'image_size': 32, 'layers': 2, 'width': 32, 'patch_size': 8, 'head_width': 16},
           'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 32, 'heads': 2, 'layers': 1}}
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    d = os.path.join(root, 'tinyclip')
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, 'open_clip_config.json'), 'w') as f:
        json.dump({'model_cfg': cfg, 'preprocess_cfg': {}}, f)
    torch.save(model.state_dict(), os.path.join(d, 'open_clip_pytorch_model.bin'))
    return d


# ------------------------------------------------------------------------------------- arch
@pytest.mark.parametrize('size', [(64, 64), (128, 128), (80, 96)])
def test_shapes_conv_learnable(size):
    torch.manual_seed(0)
    net = IRPAD(3, 4, CANDS, **TINY)
    x = torch.rand(2, 3, *size)
    logits, att = net(x, return_attention=True)
    assert logits.shape == (2, 3, 4)
    n_tokens = (size[0] // 4) * (size[1] // 4)   # two stride-2 stages
    assert att.shape == (2, 12, n_tokens)
    assert torch.allclose(att.sum(-1), torch.ones(2, 12), atol=1e-5)
    pred = net.predict(x)
    assert pred.dtype == torch.long and pred.shape == (2, 3) and int(pred.min()) >= 0 and int(pred.max()) < 4


def test_conv_encoder_token_grid():
    enc = ConvEncoder(channels=(8, 16, 32, 64))
    tok = enc(torch.rand(1, 3, 128, 128))
    assert tok.shape == (1, 16 * 16, 64) and enc.stride == 8


def test_bad_inputs_fail_with_clear_messages():
    with pytest.raises(ValueError, match='candidates must be 3 x 4'):
        IRPAD(3, 4, CANDS[:2], **TINY)
    with pytest.raises(ValueError, match="prompt_embedding.type must be one of"):
        IRPAD(3, 4, CANDS, prompt_embedding={'type': 'bert'}, **TINY)
    with pytest.raises(ValueError, match="unknown key"):
        IRPAD(3, 4, CANDS, prompt_embedding={'type': 'learnable', 'dim': 3}, **TINY)
    with pytest.raises(ValueError, match="image_encoder.type"):
        IRPAD(3, 4, CANDS, image_encoder={'type': 'resnet'})
    net = IRPAD(3, 4, CANDS, **TINY)
    with pytest.raises(ValueError, match=r'\[B, 3, h, w\]'):
        net(torch.rand(3, 32, 32))
    from dalpsr.archs.irpad_arch import load_open_clip
    with pytest.raises(FileNotFoundError, match='open_clip checkpoint not found'):
        load_open_clip('ViT-B-32', '/nonexistent/open_clip_model.bin')


def test_gradient_flows_into_decoder_and_encoder():
    torch.manual_seed(0)
    net = IRPAD(3, 4, CANDS, **TINY)
    logits = net(torch.rand(4, 3, 32, 32))
    torch.nn.functional.cross_entropy(logits.reshape(-1, 4), torch.randint(0, 4, (12,))).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, f'no gradient reaches {name}'


def test_open_clip_encoders_frozen_tower_and_cached_prompts(tmp_path):
    """open_clip image tower (frozen) + open_clip text embeddings of the phrases; the saved
    IRPAD reloads from its config + state dict alone (text encoder and folder gone)."""
    d = _tiny_open_clip_dir(str(tmp_path))
    spec = 'local-dir:' + d
    torch.manual_seed(0)
    net = IRPAD(3, 4, CANDS, image_encoder={'type': 'open_clip', 'model_name': spec, 'frozen': True},
                prompt_embedding={'type': 'open_clip', 'model_name': spec}, embed_dim=32, num_heads=2)
    assert net.prompt_features.shape == (12, 16)
    # distinct phrases -> distinct (unit-norm) text features
    f = net.prompt_features
    assert torch.allclose(f.norm(dim=-1), torch.ones(12), atol=1e-5)
    assert (torch.cdist(f, f) + torch.eye(12)).min() > 1e-4
    x = torch.rand(2, 3, 48, 40)
    logits = net(x)
    assert logits.shape == (2, 3, 4)
    # frozen tower: no grad, unchanged by an optimizer step; decoder and projection train
    before = {k: v.clone() for k, v in net.image_encoder.state_dict().items()}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    net.train()
    assert not net.image_encoder.visual.training
    logits.sum().backward()
    opt.step()
    assert all(not p.requires_grad for p in net.image_encoder.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.image_encoder.state_dict().items())
    assert net.prompt_proj.weight.grad is not None and net.blocks[0].attn.in_proj_weight.grad.abs().sum() > 0
    # round trip without the open_clip folder
    net.eval()
    ref = net(x)
    cfg, state = json.loads(json.dumps(net.config)), net.state_dict()
    shutil.rmtree(d)
    net2 = IRPAD(**cfg)
    net2.load_state_dict(state, strict=False)
    assert torch.allclose(net2.eval()(x), ref, atol=1e-6)


def test_open_clip_trainable_tower_gets_gradients(tmp_path):
    d = _tiny_open_clip_dir(str(tmp_path))
    net = IRPAD(3, 4, CANDS, image_encoder={'type': 'open_clip', 'model_name': 'local-dir:' + d, 'frozen': False,
                                            'token_layer': 0}, embed_dim=32, num_heads=2)
    net(torch.rand(2, 3, 32, 32)).sum().backward()
    assert net.image_encoder.visual.conv1.weight.grad.abs().sum() > 0


def test_hf_clip_text_prompt_embeddings(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, projection_dim=24, max_position_embeddings=77)
    torch.manual_seed(0)
    CLIPTextModelWithProjection(cfg).save_pretrained(tmp_path / 'clip_text')
    net = IRPAD(3, 4, CANDS, prompt_embedding={'type': 'hf_clip', 'path': str(tmp_path / 'clip_text')}, **TINY)
    assert net.prompt_features.shape == (12, 24)
    assert net.config['prompt_embedding'] == {'type': 'cached', 'dim': 24}
    assert net(torch.rand(1, 3, 32, 32)).shape == (1, 3, 4)
    with pytest.raises(FileNotFoundError, match='CLIP text model folder not found'):
        IRPAD(3, 4, CANDS, prompt_embedding={'type': 'hf_clip', 'path': str(tmp_path / 'nope')}, **TINY)


# ------------------------------------------------------------------------- retrieval toy set
def _toy_batch(n, rng):
    """Trivially separable: the interval of type t sets the mean of colour channel t
    (0.125 + 0.25 k), plus mild pixel noise; types drawn independently."""
    labels = rng.integers(0, 4, size=(n, 3))
    means = 0.125 + 0.25 * labels.astype(np.float32)
    imgs = means[:, :, None, None] + rng.normal(0, 0.03, size=(n, 3, 16, 16))
    return torch.from_numpy(np.clip(imgs, 0, 1).astype(np.float32)), torch.from_numpy(labels)


def test_retrieval_picks_right_prompt_on_separable_toy_set():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = IRPAD(3, 4, CANDS, **TINY)
    x, y = _toy_batch(256, np.random.default_rng(123))
    acc0 = (net.eval().predict(x) == y).float().mean()
    assert acc0 < 0.5  # untrained: near chance (so the test below can fail)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for _ in range(120):
        xb, yb = _toy_batch(32, rng)
        loss = torch.nn.functional.cross_entropy(net(xb).reshape(-1, 4), yb.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    acc = (net.predict(x) == y).float().mean(0)
    assert (acc > 0.95).all(), acc


# -------------------------------------------------------------------------------- metrics
def test_confusion_metrics_closed_form():
    from dalpsr.models.irpad_model import confusion_matrices, confusion_metrics
    target = torch.tensor([[0], [0], [0], [0], [1], [2], [3], [3]])
    pred = torch.tensor([[0], [0], [0], [1], [1], [0], [3], [2]])
    conf = confusion_matrices(pred, target, 4)
    assert conf.shape == (1, 4, 4) and conf[0, 0, 0] == 3 and conf[0, 2, 0] == 1 and conf.sum() == 8
    m = confusion_metrics(conf, ['blur'])
    assert m['acc/blur'] == pytest.approx(5 / 8)
    assert m['bacc/blur'] == pytest.approx((3 / 4 + 1 + 0 + 1 / 2) / 4)
    assert m['within1/blur'] == pytest.approx(7 / 8)
    assert m['acc/mean'] == m['acc/blur']


# --------------------------------------------------------------------------- LR cache data
def test_lr_cache_deterministic_across_workers_and_refuses_overwrite(tmp_path):
    from dalpsr.data.lr_cache import CachedLRDataset, build_lr_cache
    from dalpsr.data.prompt_labels import PromptSpec
    a, b = str(tmp_path / 'a.npz'), str(tmp_path / 'b.npz')
    build_lr_cache(a, 'sample:train', num_samples=6, gt_size=64, seed=5, workers=1, progress=False)
    build_lr_cache(b, 'sample:train', num_samples=6, gt_size=64, seed=5, workers=2, progress=False)
    za, zb = np.load(a), np.load(b)
    for k in ('lq', 'labels', 'degrees', 'keys', 'params'):
        assert np.array_equal(za[k], zb[k]), k
    assert za['lq'].shape == (6, 16, 16, 3) and za['lq'].dtype == np.uint8 and za['labels'].shape == (6, 3)
    # labels are the spec's labels of the recorded params
    spec = PromptSpec()
    assert [spec.labels(json.loads(p)) for p in za['params']] == za['labels'].tolist()
    with pytest.raises(FileExistsError, match='refusing to overwrite'):
        build_lr_cache(a, 'sample:train', num_samples=6, gt_size=64, seed=5, progress=False)
    ds = CachedLRDataset(a, augment=True, seed=1)
    item, again = ds[8], ds[8]
    assert item['lq'].shape == (3, 16, 16) and item['lq'].dtype == torch.float32
    assert 0 <= float(item['lq'].min()) and float(item['lq'].max()) <= 1
    assert torch.equal(item['lq'], again['lq']) and item['index'] == 2
    assert spec.parse(item['prompt']) == item['labels'].tolist()
    # a dataset with a build block makes the file on first use; without one: a clear error
    c = str(tmp_path / 'sub' / 'c.npz')
    assert len(CachedLRDataset(c, build={'hr': 'sample:val', 'num_samples': 3, 'gt_size': 32, 'seed': 2,
                                         'progress': False})) == 3
    with pytest.raises(FileNotFoundError, match='LR cache not found'):
        CachedLRDataset(str(tmp_path / 'none.npz'))


def test_lr_cache_with_measured_noise_labels_and_stale_build_blocks(tmp_path):
    """A measured-noise spec switches the measurement on; an existing file whose options differ
    from its build: block (other labels, other seed) is refused instead of silently used."""
    from dalpsr.data.lr_cache import CachedLRDataset
    from dalpsr.data.prompt_labels import PromptSpec
    build = {'hr': 'sample:val', 'num_samples': 4, 'gt_size': 64, 'seed': 2, 'progress': False,
             'prompt': {'noise_severity': 'measured'}}
    f = str(tmp_path / 'm.npz')
    ds = CachedLRDataset(f, build=build)
    z = np.load(f)
    params = [json.loads(p) for p in z['params']]
    assert all(p['measured']['noise_rms'] >= 0 for p in params)
    spec = PromptSpec(noise_severity='measured')
    assert ds.spec == spec and [spec.labels(p) for p in params] == z['labels'].tolist()
    assert len(CachedLRDataset(f, build=dict(build, workers=2))) == 4  # workers do not change the data
    for other in ({'prompt': None}, {'seed': 3}, {'hr': 'sample:train'}):
        with pytest.raises(ValueError, match='built with other options'):
            CachedLRDataset(f, build=dict(build, **other))
    with pytest.raises(ValueError, match='build: block'):
        CachedLRDataset(f, build=dict(build, num_sample=4))
    # a file that is not a cache (here: text) gets one line naming it
    junk = tmp_path / 'junk.npz'
    junk.write_text('not a cache')
    with pytest.raises(ValueError, match='junk.npz: not an LR cache'):
        CachedLRDataset(str(junk))


def test_hr_limit_takes_a_fixed_nested_subset_of_the_photos(tmp_path):
    """``hr_limit`` (the training-set-size curve of docs/irpad.md): N photos of one fixed order,
    the smaller subsets inside the larger; the cache records them and its build: check sees them."""
    from dalpsr.data.lr_cache import CachedLRDataset, limit_photos, resolve_hr_paths
    paths = [f'p{i:03d}.png' for i in range(50)]
    s3, s10 = limit_photos(paths, 3), limit_photos(paths, 10)
    assert len(s3) == 3 and len(s10) == 10 and set(s3) < set(s10) and s10 == sorted(s10)
    assert limit_photos(paths, 10) == s10 and limit_photos(paths, None) == paths
    assert s3 != paths[:3]  # a random subset, not the first names (sources are sorted into folders)
    for bad in (0, 51, 2.5, True):
        with pytest.raises(ValueError, match='hr_limit must be an integer in \\[1, 50\\]'):
            limit_photos(paths, bad)
    build = {'hr': 'sample:train', 'num_samples': 5, 'gt_size': 32, 'seed': 1, 'progress': False, 'hr_limit': 2}
    f = str(tmp_path / 'l.npz')
    ds = CachedLRDataset(f, build=build)
    used = [os.path.basename(p) for p in limit_photos(resolve_hr_paths('sample:train'), 2)]
    assert ds.meta['hr'] == used and ds.meta['hr_limit'] == 2
    assert {str(k).rsplit('_', 1)[0] for k in np.load(f)['keys']} <= {os.path.splitext(u)[0] for u in used}
    with pytest.raises(ValueError, match='built with other options'):
        CachedLRDataset(f, build=dict(build, hr_limit=3))


# ------------------------------------------------------------- training model + predictor
def _model_opt(tmp_path, cache, **model):
    return {'name': 'irpad_test', 'seed': 0, '_source': 'test', 'path': {'experiments_root': str(tmp_path / 'exp')},
            'model': {'type': 'IRPADModel', 'network': dict(TINY), **model},
            'datasets': {'train': {'type': 'CachedLRDataset', 'cache_file': cache, 'augment': True},
                         'val': {'type': 'CachedLRDataset', 'cache_file': cache, 'batch_size': 4}},
            'train': {'total_iter': 6, 'batch_size': 4, 'optimizer': {'type': 'AdamW', 'lr': 1e-3},
                      'scheduler': {'type': 'constant', 'warmup_iter': 0}, 'val_freq': 6, 'checkpoint_freq': 0,
                      'print_freq': 3, 'tensorboard': False, 'progress_bar': False}}


@pytest.fixture(scope='module')
def small_cache(tmp_path_factory):
    from dalpsr.data.lr_cache import build_lr_cache
    p = str(tmp_path_factory.mktemp('irpad') / 'small.npz')
    return build_lr_cache(p, 'sample:train', num_samples=12, gt_size=128, seed=0, progress=False)


def test_model_prompt_must_match_the_training_labels(tmp_path, small_cache):
    from dalpsr.models.irpad_model import IRPADModel
    from dalpsr.utils.options import OptionError
    opt = _model_opt(tmp_path, small_cache, prompt={'noise_severity': 'measured'})
    opt['datasets']['train']['build'] = {'hr': 'sample:train', 'num_samples': 12, 'gt_size': 128, 'seed': 0}
    with pytest.raises(OptionError, match='differs from the prompt the training data'):
        IRPADModel(opt)
    opt['datasets']['train']['build']['prompt'] = {'noise_severity': 'measured'}
    assert IRPADModel(opt).spec.noise_severity == 'measured'


def test_model_trains_through_the_loop_exports_and_predictor_round_trips(tmp_path, small_cache):
    from dalpsr.data.lr_cache import CachedLRDataset
    from dalpsr.models.irpad_model import IRPADPredictor
    from dalpsr.train import train
    res = train(_model_opt(tmp_path, small_cache, train_crop=16))
    assert res['step'] == 6 and all(np.isfinite(res['losses']))
    for key in ('acc/blur', 'bacc/noise', 'within1/jpeg', 'bacc/mean'):
        assert 0.0 <= res['val'][key] <= 1.0
    export = res['export']
    assert os.path.isfile(os.path.join(export, 'irpad.safetensors'))
    # trained on 16 px crops: the predictor averages the logits of 16 px crops (issue 13.7)
    pred = IRPADPredictor.from_pretrained(str(export))
    assert pred.crop == 16
    ds = CachedLRDataset(small_cache)
    lq = torch.stack([ds[i]['lq'] for i in range(3)])
    net = res['model'].unwrap(res['model'].net).eval()
    with torch.no_grad():
        ref = torch.stack([net(lq[:, :, y:y + h, x:x + w]) for y, x, h, w in pred.crops(*lq.shape[-2:])]).mean(0)
        whole = IRPADPredictor.from_pretrained(str(export), crop=0).predict_logits(lq)
    assert torch.allclose(pred.predict_logits(lq), ref, atol=1e-5)
    assert torch.allclose(whole, net(lq), atol=1e-5)
    labels = pred.predict_labels(lq)
    assert labels.dtype == torch.long and labels.shape == (3, 3)
    # validation during training predicts as the export does (crops), not on the whole LR
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(3)), batch_size=2)
    seen = []
    hook = net.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape[-2:])))
    val_pred, val_labels = res['model'].predict_loader(loader)
    hook.remove()
    assert seen and set(seen) == {(16, 16)} and lq.shape[-1] > 16
    assert torch.equal(val_pred, labels) and torch.equal(val_labels, torch.stack([ds[i]['labels'] for i in range(3)]))
    assert torch.equal(labels, ref.argmax(-1))
    prompts = pred.predict_prompt(lq)
    assert [pred.spec.parse(p) for p in prompts] == labels.tolist()
    assert torch.allclose(pred.predict_probs(lq).sum(-1), torch.ones(3, 3), atol=1e-5)
    with pytest.raises(ValueError, match=r'\[B, 3, h, w\]'):
        pred.predict_labels(lq[0])


def test_predictor_missing_or_mismatched_checkpoint(tmp_path):
    from dalpsr.models.irpad_model import IRPADPredictor, save_irpad
    with pytest.raises(FileNotFoundError, match='irpad.json not found'):
        IRPADPredictor.from_pretrained(str(tmp_path))
    net = IRPAD(3, 5, [[f'{t} {k}' for k in range(5)] for t in 'abc'], **TINY)
    save_irpad(net, {'types': ['blur', 'noise', 'jpeg'], 'num_intervals': 4}, str(tmp_path / 'x'))
    with pytest.raises(ValueError, match='does not match the network'):
        IRPADPredictor.from_pretrained(str(tmp_path / 'x'))


def test_model_rejects_unknown_keys_and_losses(small_cache, tmp_path):
    from dalpsr.models.irpad_model import IRPADModel
    from dalpsr.utils.options import OptionError
    with pytest.raises(OptionError, match="unknown key 'label_smothing'"):
        IRPADModel(_model_opt(tmp_path, small_cache, label_smothing=0.1))
    with pytest.raises(OptionError, match="'num_intervals' comes from the prompt spec"):
        IRPADModel(_model_opt(tmp_path, small_cache, network={**TINY, 'num_intervals': 3}))
    m = IRPADModel(_model_opt(tmp_path, small_cache, ordinal_sigma=0.5, prompt={'num_intervals': 4}))
    logits = torch.zeros(2, 3, 4, requires_grad=True)
    y = torch.tensor([[0, 1, 2], [3, 3, 0]])
    loss = m.loss_fn(logits, y)
    assert loss.item() == pytest.approx(np.log(4), rel=1e-5)  # uniform scores: cross-entropy = log K
    loss.backward()
    # ordinal soft targets: the true interval is pushed up most, its neighbours less than far ones
    # are pushed down (plain cross-entropy treats all wrong intervals alike)
    g = -logits.grad[0, 1]
    assert g[1] > 0 > g[0] > g[3] and torch.isclose(g[0], g[2])



# --------------------------------------------------------------- CPU-recipe encoder options
def test_conv_encoder_highpass_and_stat_tokens():
    torch.manual_seed(0)
    enc = ConvEncoder(channels=(8, 16, 32), highpass=8.0, stat_tokens=True)
    assert enc.stem[0].in_channels == 6
    x = torch.rand(2, 3, 32, 32)
    tok = enc(x)
    assert tok.shape == (2, 8 * 8 + 3, 32)          # 64 spatial tokens + one statistics token per level
    # the high-pass channels see only the residual: a brightness offset of a flat image changes the
    # first three input channels only, so a stem that reads just the residual channels ignores it
    with torch.no_grad():
        enc.stem[0].weight[:, :3] = 0
        flat0, flat1 = torch.full((1, 3, 16, 16), 0.2), torch.full((1, 3, 16, 16), 0.7)
        assert torch.allclose(enc.stem(torch.cat([flat0 * 2 - 1, torch.zeros_like(flat0)], 1)),
                              enc.stem(torch.cat([flat1 * 2 - 1, torch.zeros_like(flat1)], 1)))
    # statistics tokens also work where the last stage is 1x1, and gradients reach them
    enc = ConvEncoder(channels=(8, 16, 32), highpass=8.0, stat_tokens=True)
    tok = enc(torch.rand(2, 3, 4, 4))
    assert tok.shape == (2, 1 + 3, 32) and torch.isfinite(tok).all()
    (tok * torch.randn_like(tok)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.stat_proj.parameters())
    with pytest.raises(ValueError, match='highpass must be >= 0'):
        ConvEncoder(highpass=-1)
    with pytest.raises(ValueError, match='stat_pool must be distinct names'):
        ConvEncoder(stat_tokens=True, stat_pool=['mean', 'median'])
    torch.manual_seed(0)
    enc = ConvEncoder(channels=(8, 16), stat_tokens=True, stat_pool=['mean', 'std', 'max', 'min'])
    assert enc.stat_proj[0].in_features == 4 * 8 and enc(torch.rand(1, 3, 16, 16)).shape == (1, 64 + 2, 16)
    # noise raises the residual energy the stem sees: the high-pass input is what carries it
    enc = ConvEncoder(channels=(8,), highpass=8.0)
    img = torch.full((1, 3, 32, 32), 0.5)
    noisy = (img + 0.02 * torch.randn(1, 3, 32, 32)).clamp(0, 1)
    y = lambda z: z * 2 - 1  # noqa: E731
    res = lambda z: 8.0 * (y(z) - torch.nn.functional.avg_pool2d(  # noqa: E731
        torch.nn.functional.pad(y(z), (1, 1, 1, 1), mode='reflect'), 3, stride=1))
    assert res(img).abs().max() < 1e-6 and res(noisy).std() > 0.2


def test_train_crop_offsets_follow_the_alignment(tmp_path, small_cache):
    from dalpsr.models.irpad_model import IRPADModel
    m = IRPADModel(_model_opt(tmp_path, small_cache, train_crop=8, train_crop_align=8))
    # an image whose pixel values encode their coordinates
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing='ij')
    lq = torch.stack([yy, xx, yy * 0]).expand(16, 3, 32, 32)
    seen = set()
    for step in range(5):
        crop = m._crop(lq, step)
        assert crop.shape == (16, 3, 8, 8)
        for c in crop:
            y0, x0 = int(c[0, 0, 0]), int(c[1, 0, 0])
            assert y0 % 8 == 0 and x0 % 8 == 0 and y0 <= 24 and x0 <= 24
            seen.add((y0, x0))
    assert len(seen) > 4                             # random, not a fixed position
    assert torch.equal(m._crop(lq, 3), m._crop(lq, 3))  # deterministic per step
    from dalpsr.utils.options import OptionError
    with pytest.raises(OptionError, match='train_crop_align'):
        IRPADModel(_model_opt(tmp_path, small_cache, train_crop_align=0))


def test_stats_score_is_a_direct_path_from_the_statistics_to_the_scores(tmp_path):
    from dalpsr.data.prompt_labels import PromptSpec
    from dalpsr.models.irpad_model import IRPADPredictor, save_irpad
    popt = {'types': ['blur', 'noise', 'jpeg'], 'num_intervals': 4}
    cands = PromptSpec.from_opt(popt).candidates()
    enc = {'type': 'conv', 'channels': [8, 16], 'dstat_tokens': 2, 'dstat_features': 'v2'}
    with pytest.raises(ValueError, match='stats_score needs an image encoder with statistics tokens'):
        IRPAD(3, 4, cands, image_encoder={'type': 'conv', 'channels': [8, 16]}, embed_dim=16, num_heads=2, stats_score=True)
    torch.manual_seed(0)
    net = IRPAD(3, 4, cands, image_encoder=enc, embed_dim=16, num_heads=2, stats_score=True).train()
    lq = torch.rand(4, 3, 32, 32)
    out = net(lq)
    assert out.shape == (4, 3, 4)
    # the statistics path reaches the scores: its own weights get gradient, and zeroing them changes the scores
    out.logsumexp(-1).sum().backward()
    assert net.stats_q.weight.grad.abs().sum() > 0 and net.image_encoder.dstat.mlp[0].weight.grad.abs().sum() > 0
    net.eval()
    with torch.no_grad():
        ref = net(lq)
        saved = net.stats_q.weight.clone()
        net.stats_q.weight.zero_()
        assert not torch.allclose(net(lq), ref)
        net.stats_q.weight.copy_(saved)
    save_irpad(net, popt, str(tmp_path / 'export'))
    pred = IRPADPredictor.from_pretrained(str(tmp_path / 'export'))
    assert pred.net.stats_tokens == 2
    with torch.no_grad():
        assert torch.allclose(pred.predict_logits(lq), ref, atol=1e-5)


STATS_NET = dict(image_encoder={'type': 'conv', 'channels': [8, 16], 'dstat_tokens': 2, 'dstat_features': 'v2'},
                 embed_dim=16, num_heads=2, ffn_ratio=2.0, stats_score=True)


def test_stats_logits_is_the_statistics_term_of_the_scores():
    from dalpsr.archs.degradation_stats import degradation_statistics
    from dalpsr.data.prompt_labels import PromptSpec
    torch.manual_seed(0)
    net = IRPAD(3, 4, PromptSpec.from_opt(None).candidates(), **STATS_NET).eval()
    lq = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        full = net(lq)
        net.score.weight.zero_()
        net.sim_q.weight.zero_()     # the decoder's two terms gone: only the statistics term is left
        only_stats = net(lq)
    assert not torch.allclose(full, only_stats)
    assert torch.allclose(net.stats_logits(degradation_statistics(lq, 'v2')), only_stats, atol=1e-5)
    # the predictor's diagnostic mode scores with that term alone, through the same crops
    from dalpsr.models.irpad_model import IRPADPredictor
    pred = IRPADPredictor(net, PromptSpec.from_opt(None), crop=16, crop_align=8, stats_only=True)
    boxes = pred.crops(32, 32)
    with torch.no_grad():
        want = sum(net.stats_logits(degradation_statistics(lq[:, :, y:y + a, x:x + b], 'v2'))
                   for y, x, a, b in boxes) / len(boxes)
    assert len(boxes) == 4 and torch.allclose(pred.predict_logits(lq), want, atol=1e-5)
    with pytest.raises(ValueError, match='stats_only needs an IRPAD with stats_score'):
        IRPADPredictor(IRPAD(3, 4, image_encoder={'type': 'conv', 'channels': [8, 16]}, embed_dim=16, num_heads=2),
                       PromptSpec.from_opt(None), stats_only=True)
    names = {n for n, p in net.named_parameters() if any(p is q for q in net.stats_parameters())}
    assert names and all(n.startswith(('image_encoder.dstat.', 'stats_img.', 'stats_q.')) for n in names)
    with pytest.raises(ValueError, match='needs stats_score'):
        IRPAD(3, 4, image_encoder=STATS_NET['image_encoder'], embed_dim=16, num_heads=2).stats_logits(torch.zeros(1, 159))


def test_stats_pretrain_fits_only_the_statistics_path_deterministically(tmp_path, small_cache):
    from dalpsr.data.lr_cache import CachedLRDataset
    from dalpsr.models.irpad_model import IRPADModel
    from dalpsr.utils.misc import set_random_seed
    from dalpsr.utils.options import OptionError
    sp = {'epochs': 40, 'lr': 1e-2, 'batch_size': 8}
    ds = CachedLRDataset(small_cache)                  # 12 LRs of 32 px -> 4 crops of 16 px each

    def build():
        set_random_seed(0)
        return IRPADModel(_model_opt(tmp_path, small_cache, network=dict(STATS_NET), train_crop=16, stats_pretrain=sp))

    m = build()
    feats, labels = m.statistics_of(ds)
    assert feats.shape == (48, 159) and torch.equal(labels[:4], torch.as_tensor(ds.labels[:1]).repeat(4, 1))
    before = {k: v.clone() for k, v in m.net.state_dict().items()}
    with torch.no_grad():   # on a copy: a forward in train mode moves the BatchNorm's running statistics
        loss0 = float(m.loss_fn(copy.deepcopy(m.net).train().stats_logits(feats), labels))
    acc = m.before_training(ds)
    with torch.no_grad():
        loss1 = float(m.loss_fn(copy.deepcopy(m.net).train().stats_logits(feats), labels))
    assert loss1 < 0.5 * loss0 and min(acc.values()) > 0.6      # 48 rows: the path can fit them
    after = m.net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(('image_encoder.dstat.', 'stats_img.', 'stats_q.')) for k in changed)
    assert 'image_encoder.dstat.norm.running_mean' in changed           # BatchNorm saw the statistics
    assert all(p.grad is None for p in m.net.parameters())
    m2 = build()
    m2.before_training(ds)
    assert all(torch.equal(v, m2.net.state_dict()[k]) for k, v in after.items())
    # the schedule (default cosine) is applied: a constant learning rate ends elsewhere
    sp['schedule'] = 'constant'
    m3 = build()
    m3.before_training(ds)
    assert any(not torch.equal(v, m3.net.state_dict()[k]) for k, v in after.items() if k.startswith('stats_q.'))
    # options
    for bad, msg in (({'epochs': 2, 'lrr': 1}, 'unknown key'), ({'epochs': -1}, 'epochs >= 0'), (5, 'a mapping'),
                     ({'freeze': 'yes'}, 'true or false'), ({'schedule': 'step'}, 'cosine')):
        with pytest.raises(OptionError, match=msg):
            IRPADModel(_model_opt(tmp_path, small_cache, network=dict(STATS_NET), stats_pretrain=bad))
    with pytest.raises(OptionError, match='stats_score: true'):
        IRPADModel(_model_opt(tmp_path, small_cache, stats_pretrain={'epochs': 2}))
    with pytest.raises(OptionError, match='cached LRs'):
        m.before_training(torch.utils.data.TensorDataset(torch.zeros(2)))
    assert IRPADModel(_model_opt(tmp_path, small_cache, network=dict(STATS_NET),
                                 stats_pretrain={'epochs': 0})).before_training(ds) is None


def test_stats_pretrain_runs_at_the_first_step_only_and_resumes_exactly(tmp_path, small_cache, monkeypatch):
    from dalpsr.models.irpad_model import IRPADModel
    from dalpsr.train import train
    calls = []
    orig = IRPADModel.before_training
    monkeypatch.setattr(IRPADModel, 'before_training', lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))

    def opt(root, **t):
        o = _model_opt(root, small_cache, network=dict(STATS_NET), train_crop=16,
                       stats_pretrain={'epochs': 3, 'batch_size': 8, 'freeze': True})
        o['train'].update(checkpoint_freq=2, val_freq=0, handle_signals=False, **t)
        o['_args'] = {'resume': 'auto', 'force': False}
        return o

    full = train(opt(tmp_path / 'a'))
    assert len(calls) == 1
    part = train(opt(tmp_path / 'b', stop_after_iter=4))
    assert part['step'] == 4 and len(calls) == 2
    resumed = train(opt(tmp_path / 'b'))
    assert len(calls) == 2, 'a resumed run must not pre-fit again (its checkpoint holds the weights)'
    assert resumed['step'] == 6 and resumed['losses'] == full['losses'][4:]
    a, b = (r['model'].unwrap(r['model'].net).state_dict() for r in (full, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # freeze: the statistics path ends the run as the pre-fit left it (BatchNorm statistics too),
    # the rest trained on
    from dalpsr.data.lr_cache import CachedLRDataset
    from dalpsr.utils.misc import set_random_seed
    set_random_seed(0)
    ref = IRPADModel(opt(tmp_path / 'c'))
    assert not any(p.requires_grad for p in ref.net.stats_parameters())
    assert not {id(p) for p in ref.net.stats_parameters()} & {id(p) for p in ref.param_groups()}
    init = {k: v.clone() for k, v in ref.net.state_dict().items()}
    orig(ref, CachedLRDataset(small_cache))
    assert not any(p.requires_grad for p in ref.net.stats_parameters())
    fitted = ref.net.state_dict()
    stats_keys = [k for k in a if k.startswith(('image_encoder.dstat.', 'stats_img.', 'stats_q.'))
                  and not k.endswith('num_batches_tracked')]   # a counter BatchNorm keeps even at momentum 0
    moved = [k for k in stats_keys if not torch.equal(a[k], fitted[k])]
    assert not moved, moved
    assert any(not torch.equal(init[k], fitted[k]) for k in stats_keys)
    assert not torch.equal(a['image_encoder.stem.0.weight'], init['image_encoder.stem.0.weight'])


def test_step_timing_in_the_log_leaves_out_the_pre_fit(tmp_path, small_cache, monkeypatch):
    """The first '[step n]' line's s/step and eta count training steps, not stats_pretrain before them."""
    import re
    import time as time_mod
    from dalpsr.models.irpad_model import IRPADModel
    from dalpsr.train import train
    real, offset = time_mod.time, [0.0]
    monkeypatch.setattr(time_mod, 'time', lambda: real() + offset[0])
    orig = IRPADModel.before_training

    def slow_pre_fit(self, *a, **k):     # as if the pre-fit took 1000 s
        offset[0] += 1000.0
        return orig(self, *a, **k)
    monkeypatch.setattr(IRPADModel, 'before_training', slow_pre_fit)
    o = _model_opt(tmp_path, small_cache, network=dict(STATS_NET), train_crop=16,
                   stats_pretrain={'epochs': 1, 'batch_size': 8})
    o['train'].update(val_freq=0, handle_signals=False)
    o['_args'] = {'resume': 'auto', 'force': False}
    res = train(o)
    assert offset[0] == 1000.0
    rates = [float(v) for v in re.findall(r'\| ([0-9.]+) s/step', (res['exp_dir'] / 'train.log').read_text())]
    assert len(rates) == 2 and max(rates) < 100, rates
