"""dalpsr/test.py end to end on tiny random models: a messy LR folder with GT, input rules,
cached prompts, metrics, resume, per-image seeds, refusing/archiving a run with other options."""
import json
import os
import re

import cv2
import numpy as np
import pytest

from dalpsr import test as T
from dalpsr.restorers import dalpsr_diffusion
from dalpsr.utils.options import OptionError, load_options
from tests.script_loader import load_script



@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    from dalpsr.captioning.tiny import make_tiny_llava
    from dalpsr.inference.tiny import build_tiny_dalpsr
    root = tmp_path_factory.mktemp('tiny')
    paths = build_tiny_dalpsr(str(root / 'models'))
    paths['llava'] = make_tiny_llava(str(root / 'llava'))
    return paths


def _smooth(rng, h, w, c=3):
    x = rng.random((h // 4 + 2, w // 4 + 2, c)).astype(np.float32)
    return cv2.resize(x, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1).reshape(h, w, c)


@pytest.fixture(scope='module')
def messy(tmp_path_factory):
    """LR folder: 2 plain images with GT, gray, RGBA, 16-bit, tiny, huge, corrupt, text as .jpg, a .txt."""
    root = tmp_path_factory.mktemp('messy')
    lq, gt = root / 'lq', root / 'gt'
    lq.mkdir()
    gt.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in {'a': (24, 32), 'b': (20, 28)}.items():
        g = _smooth(rng, h * 4, w * 4)
        cv2.imwrite(str(gt / f'{name}_HR.png'), (g * 255).astype(np.uint8))  # suffix stripped when pairing
        cv2.imwrite(str(lq / f'{name}.png'), (cv2.resize(g, (w, h), interpolation=cv2.INTER_AREA) * 255).astype(np.uint8))
    cv2.imwrite(str(lq / 'gray.png'), (_smooth(rng, 24, 24, 1)[:, :, 0] * 255).astype(np.uint8))
    rgba = np.concatenate([_smooth(rng, 24, 24), np.full((24, 24, 1), 0.5, np.float32)], 2)
    cv2.imwrite(str(lq / 'rgba.png'), (rgba * 255).astype(np.uint8))
    cv2.imwrite(str(lq / 'deep.png'), (_smooth(rng, 24, 24) * 65535).astype(np.uint16))
    cv2.imwrite(str(lq / 'tiny.png'), (_smooth(rng, 8, 8) * 255).astype(np.uint8))
    cv2.imwrite(str(lq / 'huge.png'), (_smooth(rng, 120, 120) * 255).astype(np.uint8))
    (lq / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'garbage' * 10)
    (lq / 'text.jpg').write_text('not an image')
    (lq / 'notes.txt').write_text('ignored')
    caps = root / 'captions.jsonl'
    caps.write_text(json.dumps({'key': 'a', 'path': 'a.png', 'sha1': '', 'tags': [], 'description': 'a red kite',
                                'models': {}, 'instruction': '', 'error': None}) + '\n')
    return {'lq': str(lq), 'gt': str(gt), 'captions': str(caps), 'root': root}


def test_input_rules_and_keys_without_models(tmp_path):
    rules = dict(T.TEST_DEFAULTS['test'], max_lr_pixels=40 * 40)
    rng = np.random.default_rng(1)
    cv2.imwrite(str(tmp_path / 'ok.png'), (_smooth(rng, 20, 24) * 255).astype(np.uint8))
    cv2.imwrite(str(tmp_path / 'ok.jpg'), (_smooth(rng, 20, 24) * 255).astype(np.uint8))
    cv2.imwrite(str(tmp_path / 'big.png'), (_smooth(rng, 80, 60) * 255).astype(np.uint8))
    from PIL import Image
    la = np.dstack([(_smooth(rng, 20, 20, 1)[:, :, 0] * 255).astype(np.uint8), np.zeros((20, 20), np.uint8)])
    Image.fromarray(la, mode='LA').save(tmp_path / 'la.png')
    (tmp_path / 'empty.png').write_bytes(b'')
    img, notes = T.load_lr(tmp_path / 'ok.png', rules)
    assert img.shape == (20, 24, 3) and img.dtype == np.float32 and notes == []
    with pytest.raises(T.InputRejected, match=r'80x60 LR exceeds test.max_lr_pixels=1600') as err:
        T.load_lr(tmp_path / 'big.png', rules)
    assert err.value.status == 'skipped'
    img, notes = T.load_lr(tmp_path / 'big.png', dict(rules, huge='resize'))
    assert img.shape[0] * img.shape[1] <= 1600 and notes == ['resized 80x60->46x34']
    img, notes = T.load_lr(tmp_path / 'la.png', rules)  # gray + fully transparent alpha -> white
    assert notes == ['alpha->white'] and np.allclose(img, 1.0)  # OpenCV decodes LA as 4 channels
    with pytest.raises(T.InputRejected, match='empty file') as err:
        T.load_lr(tmp_path / 'empty.png', rules)
    assert err.value.status == 'failed'
    keys, ignored = T.list_set_images(tmp_path, recursive=False)
    assert [k for k, _ in keys] == ['big', 'empty', 'la', 'ok', 'ok_png'] and ignored == 0
    (tmp_path / 'gt').mkdir()
    cv2.imwrite(str(tmp_path / 'gt' / 'ok_x4_HR.png'), np.zeros((8, 8, 3), np.uint8))
    assert set(T.gt_index(str(tmp_path / 'gt'), False)) == {'ok'} and T._gt_key('ok_LR4') == 'ok'
    assert T.image_seed(0, 'ok') == T.image_seed(0, 'ok') != T.image_seed(1, 'ok')


def _opt(tiny, messy, results, name='run', **blocks):
    opt = {'name': name, 'seed': 3, 'path': {'results_root': str(results)},
           'model': {'path': tiny['dalpsr']},
           'irpad': {'source': 'irpad', 'path': tiny['irpad']},
           'captioner': {'mode': 'llava', 'llava_opts': {'model': tiny['llava'], 'max_new_tokens': 3}},
           'sampler': {'num_steps': 2, 'scheduler': 'ddim'},
           'test': {'max_lr_pixels': 64 * 64, 'progress_bar': False},
           'datasets': {'set1': {'dataroot_lq': messy['lq'], 'dataroot_gt': messy['gt'],
                                 'caption_file': messy['captions']}}}
    for k, v in blocks.items():
        opt[k] = {**opt.get(k, {}), **v} if isinstance(v, dict) and k != 'datasets' else v
    return opt


def _img(path):
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


@pytest.fixture(scope='module')
def first_run(tiny, messy, tmp_path_factory):
    results = tmp_path_factory.mktemp('results')
    res = T.test(_opt(tiny, messy, results))
    return res, results


def test_messy_folder_outputs_rules_prompts_and_metrics(first_run, messy):
    res, _ = first_run
    d = res['dir'] / 'set1'
    recs = {r['key']: r for r in map(json.loads, (d / 'records.jsonl').read_text().splitlines())}
    assert sorted(recs) == ['a', 'b', 'corrupt', 'deep', 'gray', 'huge', 'rgba', 'text', 'tiny']
    status = {k: r['status'] for k, r in recs.items()}
    assert status == {'a': 'ok', 'b': 'ok', 'deep': 'ok', 'gray': 'ok', 'rgba': 'ok', 'corrupt': 'failed',
                      'text': 'failed', 'tiny': 'skipped', 'huge': 'skipped'}
    assert 'corrupt.png: not a readable image' in recs['corrupt']['message']
    assert 'smaller than test.min_size=16' in recs['tiny']['message']
    assert '120x120 LR exceeds test.max_lr_pixels=4096' in recs['huge']['message']
    assert recs['gray']['notes'] == ['gray->rgb', 'no GT with this key']
    assert recs['rgba']['notes'][0] == 'alpha->white' and recs['deep']['notes'][0] == '16bit->8bit output'
    assert recs['a']['notes'] == []
    for k, (h, w) in {'a': (24, 32), 'b': (20, 28), 'gray': (24, 24), 'rgba': (24, 24), 'deep': (24, 24)}.items():
        out = _img(d / f'{k}.png')
        assert out.shape == (h * 4, w * 4, 3) and out.dtype == np.uint8, k
    assert not (d / 'tiny.png').exists() and not (d / 'notes.png').exists()
    # prompts: p_r from IRPAD (cached), p_s from the caption file for 'a' and the captioner for the rest
    restoration = {r['key']: r for r in map(json.loads, (d / 'restoration.jsonl').read_text().splitlines())}
    assert set(restoration) == {'a', 'b', 'deep', 'gray', 'rgba'}
    assert re.match(r'Deblur with sigma [\d.]+~[\d.]+, Denoise', recs['a']['restoration_prompt'])
    assert recs['a']['caption'] == 'a red kite'
    assert recs['a']['prompt'] == f"{recs['a']['restoration_prompt']}. a red kite. clean, high-resolution, 8k"
    captions = [json.loads(x) for x in (d / 'captions.jsonl').read_text().splitlines()]
    assert {c['key'] for c in captions} == {'b', 'deep', 'gray', 'rgba'}  # 'a' came from the caption file
    assert all(c['models']['captioner'] == 'llava' for c in captions)
    # per-image seeds, timing, memory; metrics where GT exists (a, b), means in the summary
    assert recs['a']['seed'] == T.image_seed(3, 'a') != recs['b']['seed']
    assert recs['a']['seconds'] > 0 and recs['a']['peak_mem_mb'] > 0 and recs['a']['unet_calls'] == 2  # untiled
    # per-stage times of the image (issue 13.11): VAE encode, denoising steps, VAE decode
    assert all(recs['a'][k] > 0 for k in ('encode_s', 'denoise_s', 'decode_s'))
    assert recs['a']['encode_s'] + recs['a']['denoise_s'] + recs['a']['decode_s'] <= recs['a']['seconds'] + 1e-3
    assert set(recs['a']['metrics']) == {'psnr', 'ssim'} and 'metrics' in recs['gray']
    assert recs['gray']['metrics'] == {}
    summary = json.loads((d / 'summary.json').read_text())
    assert (summary['ok'], summary['skipped'], summary['failed']) == (5, 2, 2)
    assert summary['ignored_non_image_files'] == 1
    assert summary['metrics']['psnr']['count'] == 2
    assert summary['metrics']['psnr']['mean'] == pytest.approx(np.mean([recs[k]['metrics']['psnr'] for k in 'ab']))
    assert summary['metric_info']['psnr']['options']['test_y_channel'] is True
    assert json.loads((res['dir'] / 'summary.json').read_text())['sets']['set1']['ok'] == 5
    log = (res['dir'] / 'test.log').read_text()
    assert 'corrupt.png: not a readable image' in log and 'ok 5/9 (skipped 2, failed 2)' in log


def test_rerun_skips_finished_images_without_loading_the_sampler(first_run, tiny, messy, monkeypatch):
    res, results = first_run
    d = res['dir'] / 'set1'
    before = {p.name: p.stat().st_mtime_ns for p in d.glob('*.png')}
    n_lines = len((d / 'records.jsonl').read_text().splitlines())

    def boom(*a, **k):
        raise AssertionError('the sampler must not be built when every image is done')
    monkeypatch.setattr(dalpsr_diffusion, 'build_sampler', boom)
    again = T.test(_opt(tiny, messy, results))
    assert {p.name: p.stat().st_mtime_ns for p in d.glob('*.png')} == before
    s = again['sets']['set1']
    assert s['resumed'] == 5 and s['ok'] == 5 and s['metrics']['psnr']['count'] == 2
    # only the rejected files were looked at again (4 new lines), nothing else was redone
    assert len((d / 'records.jsonl').read_text().splitlines()) == n_lines + 4


def test_interrupted_image_is_redone_and_same_seed_gives_same_pixels(first_run, tiny, messy):
    res, results = first_run
    d = res['dir'] / 'set1'
    ref = _img(d / 'b.png')
    os.remove(d / 'b.png')  # as if the run stopped before writing it
    again = T.test(_opt(tiny, messy, results))
    assert again['sets']['set1']['resumed'] == 4
    assert np.array_equal(_img(d / 'b.png'), ref)


def test_result_does_not_depend_on_batch_composition_and_seed_matters(first_run, tiny, messy, tmp_path):
    res, _ = first_run
    d = res['dir'] / 'set1'
    # batches of 2 (gray/rgba/deep share a size and run together), other folder, other order of work
    other = T.test(_opt(tiny, messy, tmp_path, name='batched', sampler={'batch_size': 3}))
    for k in ('a', 'gray', 'rgba', 'deep'):
        diff = np.abs(_img(other['dir'] / 'set1' / f'{k}.png').astype(int) - _img(d / f'{k}.png').astype(int))
        assert diff.max() <= 1, k  # equal up to 8-bit rounding of float noise from batched convolutions
    recs = [json.loads(x) for x in (other['dir'] / 'set1' / 'records.jsonl').read_text().splitlines()]
    assert {r['batch'] for r in recs if r['key'] in ('gray', 'rgba', 'deep')} == {3}
    seeded = T.test(_opt(tiny, messy, tmp_path, name='seed4', seed=4,
                         datasets={'set1': {'dataroot_lq': messy['lq']}}))
    assert not np.array_equal(_img(seeded['dir'] / 'set1' / 'a.png'), _img(d / 'a.png'))
    assert seeded['sets']['set1']['metrics'] == {}  # no GT folder: no metrics


def test_different_options_are_refused_then_archived_with_force(tiny, messy, tmp_path):
    opt = _opt(tiny, messy, tmp_path, name='x', captioner={'mode': 'none'}, irpad={'source': 'none'},
               datasets={'set1': {'dataroot_lq': messy['lq']}})
    T.test(opt)
    changed = _opt(tiny, messy, tmp_path, name='x', captioner={'mode': 'none'}, irpad={'source': 'none'},
                   sampler={'num_steps': 3}, datasets={'set1': {'dataroot_lq': messy['lq']}})
    with pytest.raises(FileExistsError, match=r'different options \(sampler\.num_steps\)'):
        T.test(changed)
    out = T.test(changed, force=True)
    archived = [p.name for p in tmp_path.iterdir() if p.name.startswith('x_archived_')]
    assert len(archived) == 1 and (tmp_path / archived[0] / 'set1' / 'a.png').is_file()
    rec = json.loads((out['dir'] / 'set1' / 'records.jsonl').read_text().splitlines()[-1])
    assert rec['restoration_prompt'] == '' and rec['caption'] == ''
    assert rec['prompt'] == 'clean, high-resolution, 8k'
    # a folder that is not a test.py result is never taken over
    (tmp_path / 'foreign').mkdir()
    (tmp_path / 'foreign' / 'keep.txt').write_text('x')
    with pytest.raises(FileExistsError, match='holds no run.json'):
        T.test({**opt, 'name': 'foreign'})


def test_restoration_prompts_from_file_and_bad_options(tiny, messy, tmp_path):
    rfile = tmp_path / 'pr.jsonl'
    rfile.write_text(json.dumps({'key': 'a', 'labels': [0, 1, 2]}) + '\n' + json.dumps({'key': 'b', 'prompt': 'P'}) + '\n')
    ds = {'set1': {'dataroot_lq': messy['lq'], 'restoration_file': str(rfile)}}
    tile = {'latent_size': 8, 'latent_overlap': 4, 'vae_decoder_tile': 8, 'vae_decoder_overlap': 2}
    res = T.test(_opt(tiny, messy, tmp_path, name='pr', captioner={'mode': 'none'}, irpad={'source': 'file'},
                      sampler={'tile': tile}, datasets=ds))
    recs = {r['key']: r for r in map(json.loads, (res['dir'] / 'set1' / 'records.jsonl').read_text().splitlines())}
    assert recs['a']['restoration_prompt'] == ('Deblur with sigma 0~0.25, Denoise with sigma 0.25~0.5, '
                                               'Dejpeg with sigma 0.5~0.75')
    assert recs['b']['restoration_prompt'] == 'P' and recs['gray']['notes'] == ['gray->rgb', 'no restoration prompt']
    assert 'no restoration prompt' not in recs['a']['notes']
    # 24x32 LR -> 96x128 px padded to 128x128 -> 16x16 latent in 8x8 tiles (overlap 4): 3 x 3 tiles, 2 steps
    assert recs['a']['unet_calls'] == 2 * 3 * 3 == recs['b']['unet_calls']
    assert _img(res['dir'] / 'set1' / 'a.png').shape == (96, 128, 3)
    base = _opt(tiny, messy, tmp_path)
    with pytest.raises(OptionError, match="sampler block .*unknown key 'num_step'"):
        T.resolve_test_opt({**base, 'sampler': {'num_step': 2}})
    with pytest.raises(OptionError, match='sampler.start must be one of lr, noise, noise_guidance'):
        T.resolve_test_opt({**base, 'sampler': {'start': 'zero'}})
    with pytest.raises(OptionError, match="unknown 'euler_x'"):
        T.resolve_test_opt({**base, 'sampler': {'scheduler': 'euler_x'}})
    with pytest.raises(OptionError, match="missing required key 'dataroot_lq'"):
        T.resolve_test_opt({**base, 'datasets': {'s': {'dataroot_gt': 'x'}}})
    with pytest.raises(FileNotFoundError, match='dataroot_lq: folder not found'):
        T.test({**base, 'name': 'nolq', 'datasets': {'s': {'dataroot_lq': str(tmp_path / 'nope')}}})
    assert not (tmp_path / 'nolq').exists()


def test_command_line_one_line_errors(tmp_path, capsys):
    p = tmp_path / 'o.yml'
    p.write_text('name: n\nmodel: {path: /nonexistent/dalpsr}\ndatasets: {s: {dataroot_lq: /x}}\n')
    assert T.main(['-opt', str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: model folder not found: /nonexistent/dalpsr') and '\n' not in err


def test_option_files_and_reference_document_every_key(repo_root):
    for name in ('test_dalpsr_sd21.yml', 'test_dalpsr_tiny.yml'):
        T.resolve_test_opt(load_options(f'{repo_root}/options/test/{name}', is_train=False))
    path = f'{repo_root}/options/reference/test.yml'
    opt = T.resolve_test_opt(load_options(path, is_train=False))
    text = open(path).read()
    keys = {k for block in T.TEST_DEFAULTS.values() if isinstance(block, dict) for k in block}
    keys |= set(T.DATASET_KEYS) | {'name', 'seed', 'imports', 'datasets'} | set(T.TEST_DEFAULTS)
    for key in sorted(keys):
        lines = [ln for ln in text.splitlines() if re.match(rf'\s*#?\s*{key}:', ln)]
        assert lines, key
        assert any('#' in ln.split(f'{key}:', 1)[1] for ln in lines), f'{key} has no comment'
    assert opt['sampler']['num_steps'] == 50 and opt['sampler']['guidance_scale'] == 5.5


def test_demo_sr_runs_the_tiny_stand_in_labelled_as_such(tiny, tmp_path, repo_root, capsys):
    demo = load_script('demo_sr')
    found = demo.find_real_weights(tmp_path)  # an empty root: no DaLPSR export (SD may sit in the HF cache)
    assert found['dalpsr'] is None and found['irpad'] is None and found['sd'] in (None, demo.SD_ID)
    tiny_root = os.path.dirname(tiny['sd'])
    rc = demo.main(['--tiny', '--tiny-dir', tiny_root, '--results-root', str(tmp_path), '--num-images', '1',
                    '--steps', '2'])
    out = capsys.readouterr().out
    assert rc == 0 and 'TINY RANDOM STAND-IN - not a real model' in out
    d = tmp_path / 'demo_sr_TINY_RANDOM_STAND-IN' / 'demo'
    sr = [p for p in d.glob('*.png')]
    assert len(sr) == 1 and _img(sr[0]).shape == (128, 128, 3)
    assert 'TINY RANDOM STAND-IN' in (tmp_path / 'demo_sr_TINY_RANDOM_STAND-IN' / 'test.log').read_text()
    assert json.loads((d / 'summary.json').read_text())['metrics']['psnr']['count'] == 1


def test_demo_sr_finds_real_weights_and_builds_valid_options(tmp_path, repo_root):
    demo = load_script('demo_sr')
    pm = tmp_path / 'pretrained_models'
    for f in ('stable-diffusion-2-1-base/unet/config.json', 'dalpsr/dalpsr.json', 'irpad/irpad.json',
              'llava-1.5-7b-hf/config.json'):
        (pm / f).parent.mkdir(parents=True, exist_ok=True)
        (pm / f).write_text('{}')
    found = demo.find_real_weights(tmp_path)
    assert found['sd'] == str(pm / 'stable-diffusion-2-1-base') and found['dalpsr'] == str(pm / 'dalpsr')
    assert found['irpad'] == str(pm / 'irpad') and found['ram'] is None
    opt = demo.build_options(found, None, {'lq': 'l', 'gt': 'g'}, str(tmp_path / 'r'), None, 'auto')
    res = T.resolve_test_opt(opt)
    assert res['name'] == 'demo_sr_sd21' and res['sampler']['num_steps'] == 50
    assert res['captioner']['mode'] == 'llava' and res['irpad']['source'] == 'irpad'
    assert res['model']['sd'] == {'pretrained': str(pm / 'stable-diffusion-2-1-base')}


def test_device_names_resolve_or_fail_as_option_errors(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert T._device(None) == 'cpu' and T._device('auto') == 'cpu' and T._device('cpu') == 'cpu'
    with pytest.raises(OptionError, match='device cuda: no CUDA device is available'):
        T._device('cuda')
