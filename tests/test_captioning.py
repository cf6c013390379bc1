"""Captioning: caption files (C6), RAM/CLIP taggers, LLaVA captioner, scripts/caption.py."""
import json
import shutil
import sys

import numpy as np
import pytest
import torch

from dalpsr.captioning import (DEFAULT_INSTRUCTION, CaptionPipeline, file_sha1, format_instruction, load_captions,
                               make_record)
from dalpsr.utils.misc import append_jsonl, read_jsonl


@pytest.fixture(scope='module')
def tiny_ram(tmp_path_factory):
    from dalpsr.archs.ram_arch import RAMTagger, save_ram_checkpoint, tiny_ram_config
    torch.manual_seed(0)
    m = RAMTagger(**tiny_ram_config()).eval()
    torch.nn.init.normal_(m.label_embed, std=1.0)
    d = tmp_path_factory.mktemp('ram')
    thr = [0.5] * 12
    thr[0] = 0.999  # effectively never
    save_ram_checkpoint(m, d, [f'thing{i}' for i in range(12)], thr)
    return d


@pytest.fixture(scope='module')
def tiny_llava(tmp_path_factory):
    from dalpsr.captioning.tiny import make_tiny_llava
    return make_tiny_llava(str(tmp_path_factory.mktemp('llava')))


@pytest.fixture(scope='module')
def clip_config(tmp_path_factory):
    cfg = {'embed_dim': 32, 'vision_cfg': {'image_size': 32, 'layers': 1, 'width': 64, 'patch_size': 16, 'head_width': 32},
           'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 32, 'heads': 2, 'layers': 1}}
    p = tmp_path_factory.mktemp('clip') / 'dalpsr-tiny-clip.json'
    p.write_text(json.dumps(cfg))
    return str(p)


@pytest.fixture
def image_dir(tmp_path, sample_paths):
    d = tmp_path / 'imgs'
    d.mkdir()
    for p in sample_paths['train'][:3]:
        shutil.copyfile(p, d / p.name)
    (d / 'broken.png').write_bytes(b'definitely not a png')
    return d


# ---- caption files -------------------------------------------------------------------------
def test_load_captions_last_success_wins_and_indexes_sha1(tmp_path):
    f = tmp_path / 'c.jsonl'
    append_jsonl(f, make_record('a', '/x/a.png', 'aa' * 20, ['cat'], 'first', {}, 'ins'))
    append_jsonl(f, make_record('b', '/x/b.png', 'bb' * 20, error='unreadable: boom'))
    append_jsonl(f, make_record('a', '/x/a.png', 'aa' * 20, ['cat'], 'second', {}, 'ins'))
    append_jsonl(f, make_record('c', '/x/c.png', 'cc' * 20, error='RuntimeError: x'))
    append_jsonl(f, make_record('c', '/x/c.png', 'cc' * 20, [], 'retried', {}, ''))
    with open(f, 'a') as fh:
        fh.write('{"key": "trunc')  # interrupted writer
    caps = load_captions(f)
    assert caps['a'] == 'second' and caps['aa' * 20] == 'second'
    assert 'b' not in caps and caps['c'] == 'retried'
    rec = read_jsonl(f)[1]
    assert set(rec) == {'key', 'path', 'sha1', 'tags', 'description', 'models', 'instruction', 'error'}
    assert rec['description'] == ''
    with pytest.raises(FileNotFoundError, match='scripts/caption.py'):
        load_captions(tmp_path / 'missing.jsonl')
    (tmp_path / 'other.jsonl').write_text('{"x": 1}\n')
    with pytest.raises(ValueError, match="lacks 'key'"):
        load_captions(tmp_path / 'other.jsonl')


def test_instruction_is_the_papers_sentence():
    assert format_instruction(DEFAULT_INSTRUCTION, ['cat', 'sofa']) == (
        'Describe this image and its style in a very detailed manner around the following tags: cat, sofa.')
    assert format_instruction(DEFAULT_INSTRUCTION, []) == 'Describe this image and its style in a very detailed manner.'
    assert format_instruction('Tags {tags}!', ['a'], 'none') == 'Tags a!'


# ---- taggers ---------------------------------------------------------------------------------
def test_ram_backend_applies_file_thresholds_limits_and_exclusions(tiny_ram):
    from dalpsr.captioning.taggers import RAMTaggerBackend
    imgs = [np.random.default_rng(i).random((40 + 10 * i, 50, 3)).astype(np.float32) for i in range(2)]
    t = RAMTaggerBackend(str(tiny_ram))
    probs = t.probabilities(imgs)
    assert probs.shape == (2, 12) and float(probs.min()) >= 0 and float(probs.max()) <= 1
    tags = t(imgs)
    for p, got in zip(probs, tags):
        want = {f'thing{i}' for i in range(12) if p[i] > (0.999 if i == 0 else 0.5)}
        assert set(got) == want
        assert [float(p[int(g[5:])]) for g in got] == sorted((float(p[int(g[5:])]) for g in got), reverse=True)
    assert any(len(g) > 0 for g in tags)
    few = RAMTaggerBackend(str(tiny_ram), max_tags=2, exclude=[tags[0][0]])(imgs)
    assert all(len(g) <= 2 for g in few) and tags[0][0] not in few[0]
    none = RAMTaggerBackend(str(tiny_ram), threshold_scale=2.1)(imgs)  # every threshold > 1
    assert none == [[], []]


def test_clip_tagger_scores_match_open_clip_and_respect_top_k(clip_config, tmp_path):
    import open_clip
    import torch.nn.functional as F
    from dalpsr.captioning.taggers import CLIPTagger
    vocab = tmp_path / 'vocab.txt'
    vocab.write_text('cat\ndog\nhouse\ntree\ncar\ncat\n\n')  # duplicates and blanks are dropped
    torch.manual_seed(0)
    t = CLIPTagger(model_config=clip_config, pretrained='none', vocabulary=str(vocab), top_k=3, min_prob=0.0)
    assert t.tags == ['cat', 'dog', 'house', 'tree', 'car']
    img = torch.rand(2, 3, 48, 40)
    probs = t.probabilities(img)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    # independent recomputation through open_clip's own API
    x = F.interpolate(img, size=(32, 32), mode='bicubic', antialias=True, align_corners=False).clamp(0, 1)
    x = (x - t.mean) / t.std
    tok = open_clip.get_tokenizer('dalpsr-tiny-clip')
    with torch.no_grad():
        fi = F.normalize(t.model.encode_image(x), dim=-1)
        ft = F.normalize(t.model.encode_text(tok([f'a photo of a {w}.' for w in t.tags])), dim=-1)
        ref = torch.softmax(t.model.logit_scale.exp() * fi @ ft.T, -1)
    torch.testing.assert_close(probs, ref, atol=1e-5, rtol=1e-4)
    tags = t(img)
    assert [len(g) for g in tags] == [3, 3]
    assert tags[0][0] == t.tags[int(probs[0].argmax())]
    t.min_prob = 1.5  # nothing qualifies: the best tag is still reported
    assert [len(g) for g in t(img)] == [1, 1]
    with pytest.raises(FileNotFoundError, match='pretrained_models/open_clip'):
        CLIPTagger(model_config=clip_config, pretrained=str(tmp_path / 'nope.pt'))


# ---- LLaVA -----------------------------------------------------------------------------------
def test_llava_greedy_batched_equals_single_and_instruction_reaches_the_prompt(tiny_llava):
    from dalpsr.captioning.llava import LlavaCaptioner
    cap = LlavaCaptioner(tiny_llava, max_new_tokens=6, batch_size=3)
    imgs = [np.random.default_rng(i).random((30 + 7 * i, 40, 3)).astype(np.float32) for i in range(3)]
    ins = ['Describe a cat.', format_instruction(DEFAULT_INSTRUCTION, ['dog', 'tree', 'house', 'river']), 'Hi.']
    batched = cap(imgs, ins)
    single = [cap([im], [i])[0] for im, i in zip(imgs, ins)]
    assert batched == single  # left padding: batch composition does not change a description
    assert cap(imgs, ins) == batched  # greedy: deterministic
    prompt = cap.prompts([ins[1]])[0]
    assert prompt.startswith('USER: <image>\n') and ins[1] in prompt and prompt.endswith('ASSISTANT:')
    with pytest.raises(ValueError, match='2 images but 1 instructions'):
        cap(imgs[:2], ins[:1])


def test_llava_uses_a_tuned_vision_tower_and_rejects_a_mismatched_one(tiny_llava, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from dalpsr.captioning.llava import LlavaCaptioner, load_llava
    base, _ = load_llava(tiny_llava)
    tower = base.model.vision_tower
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(0.5)
    tower.save_pretrained(tmp_path / 'tower')
    cap = LlavaCaptioner(tiny_llava, vision_tower=str(tmp_path / 'tower'), max_new_tokens=2)
    got = dict(cap.model.model.vision_tower.named_parameters())
    for n, p in tower.named_parameters():
        torch.testing.assert_close(got[n], p)
    assert 'tower' in cap.model_id
    other = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=32, patch_size=8))
    other.save_pretrained(tmp_path / 'other')
    with pytest.raises(ValueError, match='does not fit'):
        LlavaCaptioner(tiny_llava, vision_tower=str(tmp_path / 'other'))
    with pytest.raises(FileNotFoundError, match='config.json'):
        LlavaCaptioner(tiny_llava, vision_tower=str(tmp_path / 'none'))


def test_missing_llava_folder_is_a_one_line_error(tmp_path):
    from dalpsr.captioning.llava import load_llava
    with pytest.raises(FileNotFoundError) as e:
        load_llava(str(tmp_path / 'no_llava'))
    assert '\n' not in str(e.value)


def test_pipeline_modes(tiny_ram, tiny_llava):
    imgs = torch.rand(2, 3, 32, 32)
    tags_only = CaptionPipeline('ram', 'ram', {'path': str(tiny_ram)})(imgs)
    assert all(r['description'] == ', '.join(r['tags']) and r['instruction'] == '' for r in tags_only)
    both = CaptionPipeline('ram+llava', 'ram', {'path': str(tiny_ram)}, {'model': tiny_llava, 'max_new_tokens': 3})
    res = both(imgs)
    assert [r['tags'] for r in res] == [r['tags'] for r in tags_only]
    assert res[0]['instruction'] == format_instruction(DEFAULT_INSTRUCTION, res[0]['tags'])
    assert both.models['tagger'].startswith('ram:') and both.models['llava'].startswith('llava:')
    assert CaptionPipeline('none')(imgs) == [{'tags': [], 'description': '', 'instruction': ''}] * 2
    with pytest.raises(ValueError, match='captioner must be one of'):
        CaptionPipeline('blip')


# ---- scripts/caption.py ----------------------------------------------------------------------
@pytest.fixture(scope='module')
def caption_script(repo_root):
    sys.path.insert(0, str(repo_root + '/scripts'))
    import caption
    return caption


def test_caption_script_writes_resumes_refuses_and_archives(caption_script, image_dir, tiny_ram, tiny_llava,
                                                             tmp_path, capsys):
    out = tmp_path / 'caps.jsonl'
    base = ['--input', str(image_dir), '--out', str(out), '--ram', str(tiny_ram), '--llava', tiny_llava,
            '--max-new-tokens', '4', '--batch-size', '2', '--device', 'cpu']
    assert caption_script.main(base) == 0
    recs = read_jsonl(out)
    assert len(recs) == 4
    by = {r['key']: r for r in recs}
    assert by['broken']['error'].startswith('unreadable') and by['broken']['description'] == ''
    good = [r for r in recs if r['error'] is None]
    assert len(good) == 3
    for r in good:
        assert r['sha1'] == file_sha1(r['path'])
        assert r['instruction'] == format_instruction(DEFAULT_INSTRUCTION, r['tags'])
        assert r['models']['captioner'] == 'ram+llava'
        assert r['models']['instruction_template'] == DEFAULT_INSTRUCTION
    # rerun: only the failed image is retried
    assert caption_script.main(base) == 0
    recs2 = read_jsonl(out)
    assert len(recs2) == 5 and recs2[-1]['key'] == 'broken'
    assert 'already captioned' in capsys.readouterr().out
    # other settings: refused, then archived with --overwrite
    other = base + ['--captioner', 'ram']
    assert caption_script.main(other) == 2
    assert 'other settings' in capsys.readouterr().err
    assert caption_script.main(other + ['--overwrite']) == 0
    assert len(list(tmp_path.glob('caps_archived_*.jsonl'))) == 1
    caps = load_captions(out)
    assert caps['astronaut'] == ', '.join(next(r for r in read_jsonl(out) if r['key'] == 'astronaut')['tags'])


def test_caption_script_one_failing_image_does_not_stop_the_run(caption_script, image_dir, tmp_path, monkeypatch,
                                                                 clip_config):
    real = caption_script.build_pipeline

    def fragile(args, device):
        pipe = real(args, device)
        inner = pipe.__call__

        class Fragile:
            models = pipe.models
            llava = None

            def __call__(self, images):
                if any(im.shape[0] == 300 for im in images):  # chelsea.png is 300 px high
                    raise RuntimeError('model exploded')
                return inner(images)
        return Fragile()

    monkeypatch.setattr(caption_script, 'build_pipeline', fragile)
    out = tmp_path / 'c.jsonl'
    rc = caption_script.main(['--input', str(image_dir), '--out', str(out), '--captioner', 'ram', '--tagger', 'clip',
                              '--clip-model-config', clip_config, '--clip-pretrained', 'none', '--batch-size', '4',
                              '--device', 'cpu'])
    assert rc == 0
    by = {r['key']: r for r in read_jsonl(out)}
    assert by['chelsea']['error'] == 'RuntimeError: model exploded'
    assert by['astronaut']['error'] is None and by['astronaut']['tags']
    assert by['astronaut']['models']['tagger'].startswith('clip:')


def test_caption_script_options_file_and_bad_paths(caption_script, tmp_path, image_dir, capsys):
    opt = tmp_path / 'c.yml'
    opt.write_text(f'input: {image_dir}\nout: {tmp_path / "o.jsonl"}\ncaptioner: none\n')
    assert caption_script.main(['-opt', str(opt)]) == 0
    assert {r['description'] for r in read_jsonl(tmp_path / 'o.jsonl') if r['error'] is None} == {''}
    ref = caption_script.main(['-opt', 'options/reference/captioning.yml', '--input', str(image_dir),
                               '--out', str(tmp_path / 'ref.jsonl')])
    assert ref == 0 and len(read_jsonl(tmp_path / 'ref.jsonl')) == 4
    opt.write_text('inptu: x\n')
    from dalpsr.utils.options import OptionError
    with pytest.raises(OptionError, match='inptu'):
        caption_script.main(['-opt', str(opt)])
    assert caption_script.main(['--input', str(tmp_path / 'nope'), '--out', str(tmp_path / 'x.jsonl'),
                                '--captioner', 'none']) == 2
    assert caption_script.main(['--input', str(image_dir), '--out', str(tmp_path / 'y.jsonl'),
                                '--ram', str(tmp_path / 'noram')]) == 2
    assert 'pretrained_models/ram' in capsys.readouterr().err


def test_triplet_dataset_reads_captions_written_by_the_script(caption_script, tiny_ram, hr_folder, tmp_path):
    from dalpsr.data.triplet_dataset import TripletDataset
    out = tmp_path / 'hr_caps.jsonl'
    assert caption_script.main(['--input', str(hr_folder), '--out', str(out), '--captioner', 'ram',
                                '--ram', str(tiny_ram), '--device', 'cpu']) == 0
    caps = {r['key']: r['description'] for r in read_jsonl(out)}
    ds = TripletDataset(dataroot_gt=str(hr_folder), gt_size=64, caption_file=str(out), seed=0)
    for i in range(len(ds)):
        item = ds[i]
        assert item['caption'] == caps[item['key']]
