"""Encoder alignment (CaptionAlignModel) through the shared training loop, on a tiny LLaVA."""
import copy

import pytest
import torch

from dalpsr.utils.options import OptionError


@pytest.fixture(scope='module')
def tiny_llava(tmp_path_factory):
    from dalpsr.captioning.tiny import make_tiny_llava
    return make_tiny_llava(str(tmp_path_factory.mktemp('llava')))


@pytest.fixture(scope='module')
def hr_dirs(tmp_path_factory):
    from dalpsr.data.sample_images import link_sample_images
    root = tmp_path_factory.mktemp('samples')
    link_sample_images(str(root / 'train'), 'train')
    link_sample_images(str(root / 'val'), 'val')
    return root


def _opt(root, llava, hr, total=30, **model):
    from dalpsr.utils.options import load_options
    opt = load_options('options/train/train_caption_align_tiny.yml')
    opt['path'] = {'experiments_root': str(root)}
    opt['model'].update(llava=llava, **model)
    opt['datasets']['train']['dataroot_gt'] = str(hr / 'train')
    opt['datasets']['val']['dataroot_gt'] = str(hr / 'val')
    opt['datasets']['val']['length'] = 8
    opt['train'].update(total_iter=total, val_freq=total, tensorboard=False, progress_bar=False, print_freq=10)
    return opt


def test_tower_is_read_from_the_llava_checkpoint_without_the_language_model(tiny_llava):
    from transformers import LlavaForConditionalGeneration
    from dalpsr.models.caption_align_model import load_llava_vision_tower, tower_features
    tower, info = load_llava_vision_tower(tiny_llava)
    full = LlavaForConditionalGeneration.from_pretrained(tiny_llava).eval()
    ref = full.model.vision_tower.state_dict()
    for k, v in tower.state_dict().items():
        torch.testing.assert_close(v, ref[k])
    assert info['vision_feature_layer'] == -2 and info['vision_feature_select_strategy'] == 'default'
    img = torch.rand(2, 3, 20, 20)
    feats = tower_features(tower.eval(), img, -2, 'default', info['image_mean'], info['image_std'])
    assert feats.shape == (2, 16, 32)  # 32 px / patch 8 = 16 patches, CLS dropped
    # the same features LLaVA projects: its get_image_features path = projector(feats)
    with torch.no_grad():
        proc_px = torch.nn.functional.interpolate(img, size=(32, 32), mode='bicubic', antialias=True,
                                                  align_corners=False).clamp(0, 1)
        m = torch.tensor(info['image_mean']).view(1, 3, 1, 1)
        s = torch.tensor(info['image_std']).view(1, 3, 1, 1)
        hs = full.model.vision_tower((proc_px - m) / s, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(feats.detach(), hs)
    with pytest.raises(FileNotFoundError, match='pretrained_models'):
        load_llava_vision_tower('./no/such/llava')


def test_alignment_reduces_the_lr_hr_feature_gap_and_export_plugs_into_llava(tmp_path, tiny_llava, hr_dirs):
    from dalpsr.captioning.llava import LlavaCaptioner
    from dalpsr.models.caption_align_model import load_llava_vision_tower
    from dalpsr.train import train
    torch.manual_seed(0)
    # 50 steps: with the issue-13 degradation (USM-sharpened GT degraded, area resize) the LR
    # inputs changed and 30 steps moved the gap by 4.2% only (mse/mse_untuned 0.958); 50 give 0.891
    opt = _opt(tmp_path, tiny_llava, hr_dirs, total=50)
    opt['train']['val_at_start'] = True
    res = train(opt)
    exp = tmp_path / 'caption_align_tiny'
    log = (exp / 'train.log').read_text()
    vals = [ln for ln in log.splitlines() if '[val step' in ln]
    first, last = vals[0], vals[-1]
    get = lambda ln, k: float(ln.split(f' {k} ')[1].split(',')[0])  # noqa: E731
    assert get(first, 'mse') == pytest.approx(get(first, 'mse_untuned'))  # student starts as the original
    assert get(last, 'mse') < 0.95 * get(last, 'mse_untuned')  # the LR features moved toward the HR ones
    # export: a CLIPVisionModel folder LLaVA loads in place of its tower
    tower_dir = exp / 'export' / 'vision_tower'
    assert (tower_dir / 'config.json').is_file() and (exp / 'export' / 'caption_align.json').is_file()
    original, _ = load_llava_vision_tower(tiny_llava)
    cap = LlavaCaptioner(tiny_llava, vision_tower=str(exp / 'export'), max_new_tokens=2)
    tuned = dict(cap.model.model.vision_tower.named_parameters())
    changed = [n for n, p in original.named_parameters() if not torch.allclose(p, tuned[n])]
    assert changed  # the tuned weights are in use
    assert isinstance(res, dict)


def test_trainable_patterns_and_frozen_teacher(tmp_path, tiny_llava, hr_dirs):
    from dalpsr.models import build_model
    opt = _opt(tmp_path, tiny_llava, hr_dirs, trainable=['*embeddings.*', '*encoder.layers.0.*'])
    model = build_model(opt)
    names = {n for n, p in model.student.named_parameters() if p.requires_grad}
    assert names and all('embeddings.' in n or 'encoder.layers.0.' in n for n in names)
    assert any('encoder.layers.1.' in n for n, _ in model.student.named_parameters())  # exists, frozen
    assert not any(p.requires_grad for p in model.teacher.parameters())
    teacher0 = copy.deepcopy(model.teacher.state_dict())
    opt_ = torch.optim.SGD([p for p in model.student.parameters() if p.requires_grad], lr=0.1)
    batch = {'gt': torch.rand(2, 3, 64, 64), 'lq': torch.rand(2, 3, 16, 16)}
    out = model.training_step(batch, 0)
    out['loss'].backward()
    before = {n: p.detach().clone() for n, p in model.student.named_parameters()}
    opt_.step()
    after = dict(model.student.named_parameters())
    assert all(torch.equal(before[n], after[n]) == (n not in names) for n in before)
    for k, v in model.teacher.state_dict().items():
        torch.testing.assert_close(v, teacher0[k])
    bad = _opt(tmp_path, tiny_llava, hr_dirs, trainable=['nothing.*'])
    with pytest.raises(OptionError, match='match no vision tower parameter'):
        build_model(bad)
    bad = _opt(tmp_path, tiny_llava, hr_dirs, learning_rate=1)
    with pytest.raises(OptionError, match='learning_rate'):
        build_model(bad)


def test_hub_style_tower_key_names_are_accepted(tmp_path, tiny_llava):
    """llava-hf/llava-1.5-7b-hf stores ``vision_tower.vision_model.*`` (older transformers layout)."""
    import shutil
    from safetensors.torch import load_file, save_file
    from dalpsr.models.caption_align_model import load_llava_vision_tower
    d = tmp_path / 'hubstyle'
    shutil.copytree(tiny_llava, d)
    f = next(d.glob('*.safetensors'))
    sd = load_file(str(f))
    renamed = {('vision_tower.vision_model.' + k[len('vision_tower.'):] if k.startswith('vision_tower.') else
                'language_model.' + k if k.startswith('model.language_model') else k): v for k, v in sd.items()}
    save_file(renamed, str(f), metadata={'format': 'pt'})
    a, _ = load_llava_vision_tower(tiny_llava)
    b, _ = load_llava_vision_tower(str(d))
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v)
