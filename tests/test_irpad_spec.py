"""Issue 13.7: IRPAD predicts on crops of its training size (logits averaged), both exports record
the restoration prompt spec, and test.py refuses an IRPAD whose spec differs from the model's."""
import json
from pathlib import Path

import pytest
import torch

from dalpsr.archs.irpad_arch import IRPAD
from dalpsr.data.prompt_labels import PromptSpec
from dalpsr.inference.tiny import TINY_IRPAD
from dalpsr.models.irpad_model import IRPADPredictor, crop_starts, load_irpad, save_irpad
from tests.test_dalpsr_model import _build, _opt, tiny_sd  # noqa: F401 (fixture)


def _net(spec=None, seed=0):
    spec = spec or PromptSpec()
    torch.manual_seed(seed)
    return IRPAD(len(spec.types), spec.num_intervals, spec.candidates(), **TINY_IRPAD).eval()


def _lq(h, w, seed=1):
    return torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_crop_starts_cover_the_image_and_keep_the_alignment():
    assert crop_starts(32, 32) == [0] and crop_starts(20, 32) == [0]
    s = crop_starts(100, 32)
    assert s[0] == 0 and s[-1] == 100 - 32 and len(s) == 4
    assert all(b - a <= 32 for a, b in zip(s, s[1:]))          # no gap between crops
    a8 = crop_starts(100, 32, align=8)
    assert all(v % 8 == 0 for v in a8) and a8[-1] == 64 and 100 - (a8[-1] + 32) < 8


def test_crop_average_is_the_mean_of_the_per_crop_logits():
    net = _net()
    pred = IRPADPredictor(net, PromptSpec(), crop=16, crop_align=4, crop_batch=3)
    lq = _lq(40, 58)
    boxes = pred.crops(40, 58)
    assert len(boxes) == len(crop_starts(40, 16, 4)) * len(crop_starts(58, 16, 4)) > 4
    with torch.no_grad():
        want = torch.stack([net(lq[:, :, y:y + ch, x:x + cw]) for y, x, ch, cw in boxes]).mean(0)
        whole = net(lq)
    got = pred.predict_logits(lq)
    assert got.shape == (2, 3, 4)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, whole, atol=1e-3)          # a larger LR is not seen whole
    # each sample of the batch is averaged over its own crops
    assert torch.allclose(pred.predict_logits(lq[1:]), got[1:], atol=1e-6)


def test_tta_averages_the_eight_flips_and_rotations():
    """``tta``: the mean of the (crop-averaged) logits of the 8 dihedral views; a non-square LR's
    rotated views are cropped in their own orientation."""
    net = _net()
    lq = _lq(24, 40, seed=3)
    plain = IRPADPredictor(net, PromptSpec(), crop=16, crop_align=8)
    tta = IRPADPredictor(net, PromptSpec(), crop=16, crop_align=8, tta=True)
    views = []
    for flip in (False, True):
        for k in range(4):
            views.append(torch.rot90(lq.flip(-1) if flip else lq, k, (-2, -1)))
    assert {tuple(v.shape[-2:]) for v in views} == {(24, 40), (40, 24)}
    want = torch.stack([plain.predict_logits(v) for v in views]).mean(0)
    got = tta.predict_logits(lq)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, plain.predict_logits(lq), atol=1e-4)   # the random net is not invariant
    assert tta.predict_labels(lq).shape == (2, 3)


def test_training_size_image_is_one_crop_wherever_it_comes_from():
    net = _net()
    pred = IRPADPredictor(net, PromptSpec(), crop=16, crop_align=8)
    big = _lq(32, 32, seed=4)
    assert pred.crops(32, 32) == [(0, 0, 16, 16), (0, 16, 16, 16), (16, 0, 16, 16), (16, 16, 16, 16)]
    with torch.no_grad():
        tiles = [big[:, :, y:y + 16, x:x + 16] for y in (0, 16) for x in (0, 16)]
        per_tile = [pred.predict_logits(t) for t in tiles]      # each tile: a training-size LR
        for t, logits in zip(tiles, per_tile):
            assert pred.crops(16, 16) == [(0, 0, 16, 16)]
            assert torch.equal(logits, net(t))                  # one crop: the image itself
    # the same 16x16 content gives the same logits alone or inside the larger LR
    assert torch.allclose(pred.predict_logits(big), torch.stack(per_tile).mean(0), atol=1e-6)


def test_irpad_export_records_spec_and_crop_and_old_exports_load(tmp_path, caplog):
    spec = PromptSpec(types=('blur', 'noise'), num_intervals=3, noise_severity='measured')
    net = _net(spec)
    save_irpad(net, {'types': ['blur', 'noise'], 'num_intervals': 3, 'noise_severity': 'measured'},
               str(tmp_path / 'new'), extra={'train_crop': 16, 'train_crop_align': 8})
    meta = json.loads((tmp_path / 'new' / 'irpad.json').read_text())
    assert meta['prompt'] == spec.to_opt() and meta['prompt']['noise_severity'] == 'measured'
    pred = IRPADPredictor.from_pretrained(str(tmp_path / 'new'))
    assert pred.spec == spec and (pred.crop, pred.crop_align) == (16, 8)
    # an older export: no spec, no train_crop -> default spec, whole LR, both logged
    save_irpad(_net(), None, str(tmp_path / 'old'))
    meta = json.loads((tmp_path / 'old' / 'irpad.json').read_text())
    del meta['prompt']
    (tmp_path / 'old' / 'irpad.json').write_text(json.dumps(meta))
    with caplog.at_level('INFO', logger='dalpsr'):
        old = IRPADPredictor.from_pretrained(str(tmp_path / 'old'))
    assert old.spec == PromptSpec() and old.crop == 0 and old.crops(40, 50) == [(0, 0, 40, 50)]
    assert 'no prompt spec' in caplog.text and 'no train_crop' in caplog.text
    lq = _lq(40, 50)
    assert torch.equal(old.predict_logits(lq), old.net(lq))
    assert load_irpad(str(tmp_path / 'old'))[1] == PromptSpec()


def test_irpad_model_export_records_train_crop(tmp_path):
    from dalpsr.models.irpad_model import IRPADModel
    from tests.test_irpad import _model_opt
    m = IRPADModel(_model_opt(tmp_path, str(tmp_path / 'unused.npz'), train_crop=24, train_crop_align=8,
                              prompt={'num_intervals': 3}))
    m.export(str(tmp_path / 'export'))
    pred = IRPADPredictor.from_pretrained(str(tmp_path / 'export'))
    assert (pred.crop, pred.crop_align) == (24, 8) and pred.spec == PromptSpec(num_intervals=3)


def test_dalpsr_export_records_the_restoration_prompt_spec(tiny_sd, tmp_path):  # noqa: F811
    opt = _opt(tmp_path, tiny_sd)
    opt['datasets']['train']['prompt'] = {'types': ['blur', 'jpeg'], 'num_intervals': 5}
    meta = _build(opt).export_meta()
    assert meta['restoration_prompt_spec'] == PromptSpec(types=('blur', 'jpeg'), num_intervals=5).to_opt()
    spec = PromptSpec(num_intervals=3)
    save_irpad(_net(spec), spec.to_opt(), str(tmp_path / 'irpad'))
    opt = _opt(tmp_path, tiny_sd)
    opt['model'].update(restoration_prompt_source='irpad', irpad={'path': str(tmp_path / 'irpad')})
    assert _build(opt).export_meta()['restoration_prompt_spec'] == spec.to_opt()
    opt = _opt(tmp_path, tiny_sd)
    opt['model']['restoration_prompt_source'] = 'none'
    assert _build(opt).export_meta()['restoration_prompt_spec'] is None


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    from dalpsr.inference.tiny import build_tiny_dalpsr
    return build_tiny_dalpsr(str(tmp_path_factory.mktemp('tiny') / 'models'))


def _test_opt(tiny, irpad, tmp_path):
    return {'name': 'spec', 'path': {'results_root': str(tmp_path / 'results')}, 'model': {'path': tiny['dalpsr']},
            'irpad': {'source': 'irpad', 'path': irpad}, 'captioner': {'mode': 'none'},
            'datasets': {'s': {'dataroot_lq': str(tmp_path)}}}


def test_test_script_refuses_an_irpad_of_another_spec_in_one_line(tiny, tmp_path, capsys):
    import yaml

    from dalpsr import test as T
    from dalpsr.inference.options import resolve_test_opt
    from dalpsr.utils.options import OptionError
    recorded = json.loads((Path(tiny['dalpsr']) / 'dalpsr.json').read_text())['restoration_prompt_spec']
    assert recorded == PromptSpec().to_opt()
    resolve_test_opt(_test_opt(tiny, tiny['irpad'], tmp_path))         # same spec: accepted
    other = PromptSpec(noise_severity='measured')
    save_irpad(_net(other), other.to_opt(), str(tmp_path / 'irpad_measured'))
    with pytest.raises(OptionError) as err:
        resolve_test_opt(_test_opt(tiny, str(tmp_path / 'irpad_measured'), tmp_path))
    msg = str(err.value)
    assert '\n' not in msg and str(tmp_path / 'irpad_measured') in msg and tiny['dalpsr'] in msg
    assert 'noise_severity=measured' in msg and 'noise_severity=params' in msg
    # through the command line: one line on stderr, nothing written
    p = tmp_path / 'o.yml'
    p.write_text(yaml.safe_dump(_test_opt(tiny, str(tmp_path / 'irpad_measured'), tmp_path)))
    assert T.main(['-opt', str(p)]) == 2
    out = capsys.readouterr().err.strip()
    assert out.startswith('error: ') and '\n' not in out and 'irpad_measured' in out
    assert not (tmp_path / 'results').exists()
    # an older DaLPSR export (no recorded spec) is taken as the default spec
    meta = json.loads((Path(tiny['dalpsr']) / 'dalpsr.json').read_text())
    old_dir = tmp_path / 'old_dalpsr'
    old_dir.mkdir()
    del meta['restoration_prompt_spec']
    (old_dir / 'dalpsr.json').write_text(json.dumps(meta))
    opt = _test_opt(tiny, tiny['irpad'], tmp_path)
    opt['model']['path'] = str(old_dir)
    resolve_test_opt(opt)
    opt['irpad']['path'] = str(tmp_path / 'irpad_measured')
    with pytest.raises(OptionError, match=r'not recorded: default'):
        resolve_test_opt(opt)


def test_clip_path_resizes_with_antialiasing():
    """A large LR shrunk to the CLIP tower's input is low-passed first: white noise keeps far less
    of its std than with a plain bicubic resize (which aliases it through unchanged)."""
    import open_clip
    import torch.nn.functional as F

    from dalpsr.archs.irpad_arch import OpenCLIPImageEncoder
    cfg = {'embed_dim': 16, 'vision_cfg': {'image_size': 32, 'layers': 1, 'width': 32, 'patch_size': 8,
                                           'head_width': 16},
           'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 32, 'heads': 2, 'layers': 1}}
    torch.manual_seed(0)
    enc = OpenCLIPImageEncoder('tiny', _model=open_clip.CLIP(**cfg))
    seen = {}
    enc.visual.register_forward_pre_hook(lambda m, args: seen.update(x=args[0] * enc.std + enc.mean))
    lq = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        enc(lq)
    got = seen['x']
    assert got.shape == (1, 3, 32, 32)
    assert torch.allclose(got, F.interpolate(lq, size=(32, 32), mode='bicubic', antialias=True), atol=1e-5)
    plain = F.interpolate(lq, size=(32, 32), mode='bicubic', align_corners=False)
    assert float(got.std()) < 0.5 * float(plain.std())
