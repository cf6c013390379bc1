"""RAM tagger: official checkpoint layout, numerics against references, strict loading."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from dalpsr.archs import ram_arch
from dalpsr.archs.ram_arch import (RAMTagger, SwinEncoder, load_layout, load_ram_tagger, official_state_dict,
                                   prepare_state_dict, ram_preprocess, save_ram_checkpoint, tiny_ram_config)

TINY_TEXT = dict(caption_branch=True, text_layers=1, text_heads=2, text_intermediate=64, vocab_size=100,
                 max_positions=16)


def _layout_of(model):
    """The model's tensors under the official key names (buffers included), with shape and dtype."""
    return {k: (tuple(v.shape), str(v.dtype).replace('torch.', '')) for k, v in official_state_dict(model).items()}


def test_full_size_architecture_matches_recorded_official_layout():
    with torch.device('meta'):  # no weight allocation: the full model builds in ~3 s
        full = RAMTagger(caption_branch=True)
        tagger = RAMTagger()
    recorded = load_layout()
    mine = _layout_of(full)
    assert set(mine) == set(recorded), (sorted(set(recorded) - set(mine))[:5], sorted(set(mine) - set(recorded))[:5])
    wrong = [k for k in recorded if mine[k] != recorded[k][:2]]
    assert not wrong, wrong[:5]
    # the tagger without the caption branch holds exactly the 'tagging' part
    assert set(_layout_of(tagger)) == {k for k, v in recorded.items() if v[2] == 'tagging'}
    # recorded totals: 1042 tensors, 508.9 M elements = 1941.4 MiB in float32, consistent with the
    # published 1941.5 MiB F32 GGUF export of the same state dict (which adds tag metadata)
    doc = json.loads(ram_arch.LAYOUT_FILE.read_text())
    total = sum(math.prod(s) for s, _, _ in recorded.values())
    assert total == doc['total_numel'] and len(recorded) == doc['num_keys'] == 1042
    assert abs(total * 4 / 2 ** 20 - 1941.5) < 0.3
    assert sum(p.numel() for p in full.parameters()) > 4.5e8  # meta params count too


def test_swin_encoder_official_layout_is_what_timms_own_converter_reads():
    """SwinEncoder is timm's Swin; its weights written under the original Swin key names (the RAM
    checkpoint's) go through timm's converter for original Swin checkpoints into a plain timm
    SwinTransformer strictly, and give the same features: our key mapping is timm's, inverted."""
    from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn
    from dalpsr.archs.ram_arch import model_to_official_key, official_to_model_key
    torch.manual_seed(0)
    enc = SwinEncoder(image_size=64, patch_size=4, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4),
                      window_size=4).eval()
    for p in enc.parameters():
        p.data.normal_(0, 0.2)
    prefix = 'visual_encoder.'
    official = {model_to_official_key(prefix + k)[len(prefix):]: v for k, v in enc.state_dict().items()}
    assert 'layers.0.downsample.reduction.weight' in official and 'layers.2.downsample.norm.weight' not in official
    assert all(official_to_model_key(prefix + k)[len(prefix):] in enc.state_dict() for k in official)
    ref = SwinTransformer(img_size=64, patch_size=4, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4),
                          window_size=4, num_classes=0).eval()
    ref.load_state_dict(checkpoint_filter_fn({'model': official}, ref), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = enc(x)
        theirs = ref.forward_features(x).flatten(1, 2)
    assert ours.shape == (2, 1 + 16, 64)  # 64/4 = 16 -> 8 -> 4: 16 tokens + pooled
    torch.testing.assert_close(ours[:, 1:], theirs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours[:, 0], theirs.mean(1), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match='RAM expects 64x64 input'):
        enc(torch.randn(1, 3, 32, 32))


def _naive_swin_block(blk, x):
    """One Swin block (shifted-window attention with relative position bias, then the MLP) written
    out from the paper's definition with plain tensor ops. x: [B, H, W, C]."""
    b, h, w, c = x.shape
    ws, sh = blk.window_size[0], blk.shift_size[0]
    att = blk.attn
    nh = att.num_heads
    y = blk.norm1(x)
    if sh:
        y = torch.roll(y, (-sh, -sh), dims=(1, 2))
    win = y.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
    q, k, v = att.qkv(win).view(win.shape[0], ws * ws, 3, nh, c // nh).permute(2, 0, 3, 1, 4)
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing='ij')).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + ws - 1
    bias = att.relative_position_bias_table[(rel[..., 0] * (2 * ws - 1) + rel[..., 1]).view(-1)]
    logits = q @ k.transpose(-1, -2) / math.sqrt(c // nh) + bias.view(ws * ws, ws * ws, nh).permute(2, 0, 1)
    if sh:  # tokens from different regions of the rolled map must not attend to each other
        region = torch.zeros(h, w)
        for i, hs in enumerate((slice(0, -ws), slice(-ws, -sh), slice(-sh, None))):
            for j, wsl in enumerate((slice(0, -ws), slice(-ws, -sh), slice(-sh, None))):
                region[hs, wsl] = 3 * i + j
        rw = region.view(h // ws, ws, w // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
        mask = (rw[:, None, :] != rw[:, :, None]).float() * -100.0
        logits = logits + mask.repeat(b, 1, 1)[:, None]
    out = (torch.softmax(logits, -1) @ v).transpose(1, 2).reshape(-1, ws * ws, c)
    out = att.proj(out).view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
    if sh:
        out = torch.roll(out, (sh, sh), dims=(1, 2))
    x = x + out
    return x + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(x))))


def test_swin_encoder_matches_naive_swin_definition():
    """The encoder against the Swin definition written out (patch embedding, shifted windows with
    the -100 region mask, patch merging in the original x0, x1, x2, x3 order, final norm, pooled
    token first), with weights loaded through the official key names."""
    torch.manual_seed(0)
    enc = SwinEncoder(image_size=64, patch_size=4, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4),
                      window_size=4).eval()
    for p in enc.parameters():
        p.data.normal_(0, 0.2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = enc.patch_embed.norm(enc.patch_embed.proj(x).permute(0, 2, 3, 1))
        for stage in enc.layers:
            if not isinstance(stage.downsample, torch.nn.Identity):
                ds = stage.downsample
                h = torch.cat([h[:, 0::2, 0::2], h[:, 1::2, 0::2], h[:, 0::2, 1::2], h[:, 1::2, 1::2]], -1)
                h = ds.reduction(ds.norm(h))
            for blk in stage.blocks:
                h = _naive_swin_block(blk, h)
        tokens = enc.norm(h).flatten(1, 2)
        ours = enc(x)
    assert [b.shift_size[0] for st in enc.layers for b in st.blocks] == [0, 2, 0, 2, 0, 0]  # 4x4 map: no shift
    torch.testing.assert_close(ours[:, 1:], tokens, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours[:, 0], tokens.mean(1), atol=1e-5, rtol=1e-4)


def _naive_tagging_logits(m: RAMTagger, image):
    """Query2Label head written out with plain matmuls (independent of the module code)."""
    img = m.image_proj(m.visual_encoder(image))
    h = F.relu(m.wordvec_proj(m.label_embed)).unsqueeze(0).expand(image.shape[0], -1, -1)
    for layer in m.tagging_head.encoder.layer:
        att = layer.crossattention
        nh = att.heads
        q, k, v = att.self.query(h), att.self.key(img), att.self.value(img)
        sp = lambda t: t.view(t.shape[0], t.shape[1], nh, -1).transpose(1, 2)  # noqa: E731
        w = torch.softmax(sp(q) @ sp(k).transpose(-1, -2) / math.sqrt(q.shape[-1] // nh), -1)
        a = (w @ sp(v)).transpose(1, 2).reshape(h.shape)
        h = att.output.LayerNorm(att.output.dense(a) + h)
        inter = F.gelu(layer.intermediate.dense(h))
        h = layer.output.LayerNorm(layer.output.dense(inter) + h)
    return m.fc(h).squeeze(-1)


def test_tagging_head_matches_naive_reference_and_batch_is_independent():
    torch.manual_seed(0)
    m = RAMTagger(**tiny_ram_config()).eval()
    torch.nn.init.normal_(m.label_embed, std=0.5)
    x = ram_preprocess(torch.rand(3, 3, 40, 56), 64)
    assert x.shape == (3, 3, 64, 64)
    with torch.no_grad():
        logits = m(x)
        ref = _naive_tagging_logits(m, x)
        single = m(x[1:2])
    assert logits.shape == (3, 12)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(single[0], logits[1], atol=1e-5, rtol=1e-4)
    assert logits.std() > 0


def _tiny_official_dir(tmp_path, **extra):
    torch.manual_seed(1)
    cfg = {**tiny_ram_config(), **TINY_TEXT, **extra}
    m = RAMTagger(**cfg).eval()
    torch.nn.init.normal_(m.label_embed, std=0.5)
    tags = [f'tag{i}' for i in range(m.num_classes)]
    thr = [0.68] * m.num_classes
    thr[3] = 0.9
    d = tmp_path / 'ram'
    save_ram_checkpoint(m, d, tags, thr)
    # the official folder has no config with caption_branch: keep only architecture kwargs of the tagger
    conf = json.loads((d / 'ram_config.json').read_text())
    conf['caption_branch'] = False
    (d / 'ram_config.json').write_text(json.dumps(conf))
    return m, d, tags


def test_save_and_load_round_trip_through_the_official_file_layout(tmp_path):
    m, d, tags = _tiny_official_dir(tmp_path)
    sd = torch.load(d / 'ram_swin_large_14m.pth', weights_only=True)
    assert set(sd) == {'model'}
    assert any(k.startswith('text_decoder.') for k in sd['model'])  # like the official file
    assert any(k.endswith('attn_mask') for k in sd['model'])
    loaded, got_tags, thr = load_ram_tagger(str(d))
    assert not hasattr(loaded, 'text_decoder')  # caption branch dropped after the layout check
    assert got_tags == tags and thr.shape == (12,) and float(thr[3]) == pytest.approx(0.9)
    x = ram_preprocess(torch.rand(2, 3, 64, 64), 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x))
    # path to the .pth file itself works too
    loaded2, _, _ = load_ram_tagger(str(d / 'ram_swin_large_14m.pth'))
    with torch.no_grad():
        torch.testing.assert_close(loaded2(x), m(x))


def test_strict_loading_reports_missing_unexpected_and_buffer_mismatch(tmp_path):
    torch.manual_seed(0)
    m = RAMTagger(**tiny_ram_config())
    good = official_state_dict(m)
    assert set(prepare_state_dict(m, good)) == set(m.state_dict())  # accepted as is
    renamed = {('vision_multi.' + k[len('tagging_head.'):] if k.startswith('tagging_head.') else k): v
               for k, v in good.items()}
    assert 'tagging_head.encoder.layer.0.crossattention.self.query.weight' in prepare_state_dict(m, renamed)
    bad = dict(good)
    bad.pop('fc.weight')
    with pytest.raises(RuntimeError, match='missing: 1 \\(fc.weight\\)'):
        prepare_state_dict(m, bad)
    bad = dict(good, **{'something.else': torch.zeros(1)})
    with pytest.raises(RuntimeError, match='unexpected: 1'):
        prepare_state_dict(m, bad)
    bad = dict(good)
    bad['image_proj.weight'] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match='shape mismatch'):
        prepare_state_dict(m, bad)
    bad = dict(good)
    key = 'visual_encoder.layers.0.blocks.0.attn.relative_position_index'
    bad[key] = bad[key].flip(0)
    with pytest.raises(RuntimeError, match='buffer mismatch'):
        prepare_state_dict(m, bad)


def test_missing_files_give_one_line_errors_naming_file_and_place(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_ram_tagger(str(tmp_path / 'nowhere'))
    msg = str(e.value)
    assert '\n' not in msg and 'pretrained_models/ram' in msg and 'nowhere' in msg
    m, d, _ = _tiny_official_dir(tmp_path)
    (d / 'ram_tag_list_threshold.txt').unlink()
    with pytest.raises(FileNotFoundError, match='ram_tag_list_threshold.txt'):
        load_ram_tagger(str(d))
    (d / 'ram_tag_list_threshold.txt').write_text('0.5\n' * 5)
    with pytest.raises(ValueError, match='5 thresholds for 12 tags'):
        load_ram_tagger(str(d))
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match='ram_swin_large_14m.pth'):
        load_ram_tagger(str(empty))
