"""RAM (Recognize Anything Model) image tagger, written for dalpsr.

The network reproduces the module layout of the official ``ram_swin_large_14m.pth``, so that
checkpoint loads strictly (see ``ram_layout.json`` next to this file for the recorded key
names/shapes and where they were read from); the only renames are the official loader's
``vision_multi`` -> ``tagging_head`` and timm's place of Swin's patch merging
(:func:`official_to_model_key`):

- ``visual_encoder``: timm's Swin transformer (Swin-L 384: embed 192, depths 2-2-18-2, heads
  6-12-24-48, window 12) returning ``[B, 1 + L, C]`` (a mean-pooled token, then the L patch tokens).
- ``image_proj``: ``C -> 512``.
- ``label_embed`` ``[num_classes, 512]`` -> ``relu(wordvec_proj(.))`` ``[num_classes, 768]``: one
  query per tag.
- ``tagging_head``: 2 BERT-style layers without self-attention (Query2Label): cross-attention
  from the tag queries to the image tokens, then a feed-forward block.
- ``fc``: ``768 -> 1`` gives one logit per tag; ``sigmoid(logit) > threshold[tag]`` selects tags.

``caption_branch=True`` also builds the Tag2Text-style ``tag_encoder`` (12 layers) and
``text_decoder`` (12 layers + LM head) that the official checkpoint carries, so the whole file
loads with ``strict=True``; the tagger itself never uses them (default ``False``: their keys are
checked against the recorded layout and dropped).

Tag list and per-tag thresholds are read from the files the official repository ships,
placed next to the checkpoint: ``ram_tag_list.txt`` (one tag a line) and
``ram_tag_list_threshold.txt`` (one float a line). An optional ``ram_config.json`` there gives
non-default architecture kwargs (used by tiny test models); without it the Swin-L 384 config is used.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, WindowAttention
from torch import nn

from dalpsr.utils.registry import ARCH_REGISTRY

LAYOUT_FILE = Path(__file__).with_name('ram_layout.json')
CHECKPOINT_NAME = 'ram_swin_large_14m.pth'
TAG_LIST_NAME = 'ram_tag_list.txt'
THRESHOLD_NAME = 'ram_tag_list_threshold.txt'
CONFIG_NAME = 'ram_config.json'
DEFAULT_DIR = 'pretrained_models/ram'
#: ImageNet statistics used by RAM's input transform (resize to image_size, normalise).
RAM_MEAN = (0.485, 0.456, 0.406)
RAM_STD = (0.229, 0.224, 0.225)
#: Buffers rebuilt at construction; the checkpoint's copies are compared, then dropped.
_BUFFER_SUFFIXES = ('relative_position_index', 'attn_mask', 'embeddings.position_ids')


# ------------------------------------------------------------------------------------------
# Swin transformer (timm's), in the layout of the original Swin code that RAM uses
# ------------------------------------------------------------------------------------------
#: Original Swin code (RAM's checkpoint) merges patches at the *end* of stage i; timm at the
#: *start* of stage i + 1. Every other parameter has the same name and shape.
_OFFICIAL_DOWNSAMPLE = re.compile(r'^visual_encoder\.layers\.(\d+)\.downsample\.')


def official_to_model_key(key: str) -> str:
    """Key of the official checkpoint -> key of :class:`RAMTagger` (``vision_multi.`` ->
    ``tagging_head.``; ``visual_encoder.layers.i.downsample`` -> ``layers.(i+1).downsample``)."""
    if key.startswith('vision_multi.'):
        key = 'tagging_head.' + key[len('vision_multi.'):]
    return _OFFICIAL_DOWNSAMPLE.sub(lambda m: f'visual_encoder.layers.{int(m.group(1)) + 1}.downsample.', key)


def model_to_official_key(key: str) -> str:
    """Inverse of :func:`official_to_model_key` (``tagging_head.`` stays, as the official file has it)."""
    return _OFFICIAL_DOWNSAMPLE.sub(lambda m: f'visual_encoder.layers.{int(m.group(1)) - 1}.downsample.', key)


class SwinEncoder(SwinTransformer):
    """Swin image encoder (timm's ``SwinTransformer``, no head):
    ``[B, 3, S, S]`` normalised -> ``[B, 1 + (S / (patch * 2^(stages-1)))^2, C_last]`` (the
    mean-pooled token first, then the patch tokens).

    Attention runs through ``F.scaled_dot_product_attention`` (timm's fused path), as RAM's own
    Swin code computes it up to rounding; drop path is off (RAM is used for inference only).
    Relative position indices and shifted-window masks are timm's non-persistent buffers: the
    official checkpoint's copies are compared against them in :func:`prepare_state_dict`.
    """

    def __init__(self, image_size=384, patch_size=4, embed_dim=192, depths=(2, 2, 18, 2),
                 num_heads=(6, 12, 24, 48), window_size=12):
        super().__init__(img_size=image_size, patch_size=patch_size, embed_dim=embed_dim, depths=tuple(depths),
                         num_heads=tuple(num_heads), window_size=window_size, num_classes=0, global_pool='',
                         drop_path_rate=0.0)
        self.image_size = image_size
        for m in self.modules():
            if isinstance(m, WindowAttention):
                m.fused_attn = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f'RAM expects {self.image_size}x{self.image_size} input, got {tuple(x.shape[-2:])}')
        x = self.forward_features(x).flatten(1, 2)  # NHWC -> [B, L, C]
        return torch.cat([x.mean(1, keepdim=True), x], dim=1)


# ------------------------------------------------------------------------------------------
# BERT-style blocks (BLIP "med" naming), enough for the Query2Label tagging head
# ------------------------------------------------------------------------------------------
class _Linear3(nn.Module):
    """query / key / value projections (key and value read ``kv_dim`` inputs)."""

    def __init__(self, hidden, kv_dim):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_dim, hidden)
        self.value = nn.Linear(kv_dim, hidden)


class _AddNorm(nn.Module):
    def __init__(self, d_in, hidden, eps):
        super().__init__()
        self.dense = nn.Linear(d_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, h, residual):
        return self.LayerNorm(self.dense(h) + residual)


class _BertAttention(nn.Module):
    def __init__(self, hidden, kv_dim, heads, eps):
        super().__init__()
        self.heads = heads
        self.self = _Linear3(hidden, kv_dim)
        self.output = _AddNorm(hidden, hidden, eps)

    def forward(self, x, context=None, causal=False):
        context = x if context is None else context
        b, n, d = x.shape
        split = lambda t: t.view(t.shape[0], t.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.self.query(x)), split(self.self.key(context)), split(self.self.value(context))
        if q.shape[0] == 1 and k.shape[0] > 1:  # shared queries (tag embeddings) for a batch of images
            q = q.expand(k.shape[0], -1, -1, -1)
        h = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        h = h.transpose(1, 2).reshape(h.shape[0], n, d)
        return self.output(h, x)


class _Intermediate(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.dense = nn.Linear(hidden, inter)

    def forward(self, x):
        return F.gelu(self.dense(x))


class _BertLayer(nn.Module):
    def __init__(self, hidden, heads, inter, enc_width, eps, self_attention=True):
        super().__init__()
        if self_attention:
            self.attention = _BertAttention(hidden, hidden, heads, eps)
        self.crossattention = _BertAttention(hidden, enc_width, heads, eps)
        self.intermediate = _Intermediate(hidden, inter)
        self.output = _AddNorm(inter, hidden, eps)

    def forward(self, x, context, causal=False):
        if hasattr(self, 'attention'):
            x = self.attention(x, causal=causal)
        x = self.crossattention(x, context)
        return self.output(self.intermediate(x), x)


class _BertEncoder(nn.Module):
    def __init__(self, layers, **kw):
        super().__init__()
        self.layer = nn.ModuleList([_BertLayer(**kw) for _ in range(layers)])


class _BertEmbeddings(nn.Module):
    def __init__(self, vocab, hidden, positions, eps):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden, padding_idx=0)
        self.position_embeddings = nn.Embedding(positions, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.register_buffer('position_ids', torch.arange(positions).unsqueeze(0), persistent=False)


class _BertModel(nn.Module):
    def __init__(self, layers, hidden, heads, inter, enc_width, eps, embeddings=None, self_attention=True):
        super().__init__()
        if embeddings is not None:
            self.embeddings = _BertEmbeddings(*embeddings, eps=eps)
        self.encoder = _BertEncoder(layers, hidden=hidden, heads=heads, inter=inter, enc_width=enc_width,
                                    eps=eps, self_attention=self_attention)

    def forward(self, hidden_states, context):
        for layer in self.encoder.layer:
            hidden_states = layer(hidden_states, context)
        return hidden_states


class _PredTransform(nn.Module):
    def __init__(self, hidden, eps):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)


class _Predictions(nn.Module):
    def __init__(self, hidden, vocab, eps):
        super().__init__()
        self.transform = _PredTransform(hidden, eps)
        self.decoder = nn.Linear(hidden, vocab)
        self.bias = self.decoder.bias  # shared, as in the original LM head


class _Cls(nn.Module):
    def __init__(self, hidden, vocab, eps):
        super().__init__()
        self.predictions = _Predictions(hidden, vocab, eps)


class _BertLMHead(nn.Module):
    """Parameter container of the official caption decoder (layout only; not run by dalpsr)."""

    def __init__(self, layers, hidden, heads, inter, vocab, positions, eps):
        super().__init__()
        self.bert = _BertModel(layers, hidden, heads, inter, hidden, eps, embeddings=(vocab, hidden, positions))
        self.cls = _Cls(hidden, vocab, eps)


# ------------------------------------------------------------------------------------------
# The tagger
# ------------------------------------------------------------------------------------------
@ARCH_REGISTRY.register()
class RAMTagger(nn.Module):
    """RAM image tagger.

    Input: ``[B, 3, image_size, image_size]`` RGB normalised with ImageNet mean/std (see
    :func:`ram_preprocess`, which takes images in [0, 1] of any size). Output of ``forward``:
    logits ``[B, num_classes]``; ``sigmoid`` gives per-tag probabilities in [0, 1].
    Defaults are the official Swin-L 384 / 4585-tag configuration.
    """

    def __init__(self, image_size: int = 384, patch_size: int = 4, embed_dim: int = 192,
                 depths: Sequence[int] = (2, 2, 18, 2), num_heads: Sequence[int] = (6, 12, 24, 48),
                 window_size: int = 12, num_classes: int = 4585, label_dim: int = 512,
                 head_hidden: int = 768, head_layers: int = 2, head_heads: int = 4,
                 head_intermediate: int = 3072, caption_branch: bool = False, text_layers: int = 12,
                 text_heads: int = 12, text_intermediate: int = 3072, vocab_size: int = 30524,
                 max_positions: int = 512, layer_norm_eps: float = 1e-12):
        super().__init__()
        self.config = dict(image_size=image_size, patch_size=patch_size, embed_dim=embed_dim, depths=list(depths),
                           num_heads=list(num_heads), window_size=window_size, num_classes=num_classes,
                           label_dim=label_dim, head_hidden=head_hidden, head_layers=head_layers,
                           head_heads=head_heads, head_intermediate=head_intermediate,
                           caption_branch=caption_branch, text_layers=text_layers, text_heads=text_heads,
                           text_intermediate=text_intermediate, vocab_size=vocab_size,
                           max_positions=max_positions, layer_norm_eps=layer_norm_eps)
        self.image_size = image_size
        self.visual_encoder = SwinEncoder(image_size, patch_size, embed_dim, depths, num_heads, window_size)
        vision_width = self.visual_encoder.num_features
        eps = layer_norm_eps
        if caption_branch:
            self.tag_encoder = _BertModel(text_layers, head_hidden, text_heads, text_intermediate, label_dim, eps,
                                          embeddings=(vocab_size, head_hidden, max_positions))
            self.text_decoder = _BertLMHead(text_layers, head_hidden, text_heads, text_intermediate, vocab_size,
                                            max_positions, eps)
        self.tagging_head = _BertModel(head_layers, head_hidden, head_heads, head_intermediate, label_dim, eps,
                                       self_attention=False)
        self.label_embed = nn.Parameter(torch.zeros(num_classes, label_dim))
        self.wordvec_proj = nn.Linear(label_dim, head_hidden) if head_hidden != label_dim else nn.Identity()
        self.fc = nn.Linear(head_hidden, 1)
        self.image_proj = nn.Linear(vision_width, label_dim)
        self.num_classes = num_classes

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image: [B,3,S,S] normalised -> logits [B, num_classes]."""
        img = self.image_proj(self.visual_encoder(image))  # [B, 1+L, label_dim]
        queries = F.relu(self.wordvec_proj(self.label_embed)).unsqueeze(0)  # [1, N, hidden]
        h = self.tagging_head(queries, img)  # [B, N, hidden]
        return self.fc(h).squeeze(-1)


def ram_preprocess(images: torch.Tensor, image_size: int = 384) -> torch.Tensor:
    """[B,3,H,W] RGB in [0,1] (any size) -> [B,3,S,S] resized and normalised, as RAM's own
    transform does (``Resize((S, S))``: bilinear, antialiased; ImageNet mean/std)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f'expected images [B,3,H,W], got {tuple(images.shape)}')
    x = F.interpolate(images.float(), size=(image_size, image_size), mode='bilinear', align_corners=False,
                      antialias=True).clamp(0, 1)
    mean = torch.tensor(RAM_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(RAM_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# ------------------------------------------------------------------------------------------
# Layout and loading
# ------------------------------------------------------------------------------------------
def load_layout() -> Dict[str, Tuple[Tuple[int, ...], str, str]]:
    """Recorded official layout: ``{key: (shape, dtype, part)}`` (part: 'tagging' or 'caption')."""
    doc = json.loads(LAYOUT_FILE.read_text())
    return {k: (tuple(s), dt, part) for k, s, dt, part in doc['keys']}


def _missing(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"RAM {what} not found: {path} (download it from the recognize-anything release and put it in "
        f"{DEFAULT_DIR}/ or the folder given as ram path; see docs/captioning.md)")


def resolve_ram_files(path: str) -> Dict[str, Path]:
    """``path``: a folder holding ``ram_swin_large_14m.pth`` (or any single .pth) or the .pth itself.

    Returns ``{'checkpoint', 'tag_list', 'thresholds', 'config' (may not exist)}``; raises a
    one-line ``FileNotFoundError`` naming the first missing file and where to put it.
    """
    p = Path(path)
    if p.is_dir():
        ckpt = p / CHECKPOINT_NAME
        if not ckpt.is_file():
            others = sorted(p.glob('*.pth'))
            if len(others) == 1:
                ckpt = others[0]
            else:
                raise _missing(ckpt, 'checkpoint')
        folder = p
    else:
        if not p.is_file():
            raise _missing(p, 'checkpoint')
        ckpt, folder = p, p.parent
    files = {'checkpoint': ckpt, 'tag_list': folder / TAG_LIST_NAME, 'thresholds': folder / THRESHOLD_NAME,
             'config': folder / CONFIG_NAME}
    for key, what in (('tag_list', 'tag list'), ('thresholds', 'per-tag threshold file')):
        if not files[key].is_file():
            raise _missing(files[key], what)
    return files


def read_tag_files(tag_list: Path, thresholds: Path, num_classes: int) -> Tuple[List[str], torch.Tensor]:
    """Tags (one a line) and per-tag thresholds (one float a line, same order)."""
    tags = Path(tag_list).read_text(encoding='utf-8').splitlines()
    if tags and tags[-1] == '':
        tags = tags[:-1]
    try:
        thr = [float(s) for s in Path(thresholds).read_text(encoding='utf-8').split()]
    except ValueError as err:
        raise ValueError(f'{thresholds}: not a list of numbers ({err})') from None
    if len(tags) != num_classes:
        raise ValueError(f'{tag_list}: {len(tags)} tags, the checkpoint has {num_classes} classes')
    if len(thr) != num_classes:
        raise ValueError(f'{thresholds}: {len(thr)} thresholds for {num_classes} tags')
    return tags, torch.tensor(thr, dtype=torch.float32)


def _torch_load(path: Path):
    """Read a checkpoint memory-mapped. Tensors-only unpickling first; official files that pickle
    plain extras next to the weights fall back to full unpickling (with a notice): only load
    checkpoints you trust."""
    errors = []
    for weights_only in (True, False):
        for mmap in (True, False):
            try:
                obj = torch.load(path, map_location='cpu', weights_only=weights_only, mmap=mmap)
                if not weights_only:
                    print(f'note: {path} holds non-tensor objects; loaded with full unpickling')
                return obj
            except Exception as err:  # noqa: BLE001
                errors.append(f'{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ""}')
    raise RuntimeError(f'cannot read RAM checkpoint {path}: {errors[-1]}')


def official_state_dict(model: RAMTagger) -> Dict[str, torch.Tensor]:
    """``model``'s tensors under the official checkpoint's key names, buffers included (the
    official file stores ``relative_position_index``, ``attn_mask`` and ``position_ids``)."""
    out = {model_to_official_key(k): v for k, v in model.state_dict().items()}
    for k, v in model.named_buffers():
        if k.endswith(_BUFFER_SUFFIXES):
            out[model_to_official_key(k)] = v
    return out


def prepare_state_dict(model: RAMTagger, raw: Dict[str, torch.Tensor], source: str = '') -> Dict[str, torch.Tensor]:
    """Map an official RAM state dict onto ``model`` strictly; returns ``model``'s state dict.

    - keys are renamed by :func:`official_to_model_key` (``vision_multi.*`` -> ``tagging_head.*``
      as the official loader does; patch merging moves to the start of the next Swin stage);
    - rebuilt buffers (``relative_position_index``, ``attn_mask``, ``position_ids``) must equal the
      model's own (a different window/size would show here) and are then dropped;
    - without ``caption_branch`` the ``tag_encoder.*`` / ``text_decoder.*`` keys are dropped;
    - every other key must exist in the model with the same shape and every model key must be
      present: otherwise a ``RuntimeError`` lists the offending keys (official names).
    """
    sd = {official_to_model_key(k): v for k, v in raw.items()}
    own = model.state_dict()
    buffers = dict(model.named_buffers())
    bad_buffers = []
    for k in list(sd):
        if k.endswith(_BUFFER_SUFFIXES):
            b = buffers.get(k)
            if b is not None and (b.shape != sd[k].shape or not torch.equal(b.to(sd[k].dtype), sd[k])):
                bad_buffers.append(k)
            sd.pop(k)
    if not model.config['caption_branch']:
        for k in list(sd):
            if k.startswith(('tag_encoder.', 'text_decoder.')):
                sd.pop(k)
    expected = set(own)
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    shape = sorted(k for k in expected & set(sd) if tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shape or bad_buffers:
        parts = []
        for name, keys in (('missing', missing), ('unexpected', unexpected), ('shape mismatch', shape),
                           ('buffer mismatch', bad_buffers)):
            if keys:
                keys = [model_to_official_key(k) for k in keys]
                parts.append(f"{name}: {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        raise RuntimeError(f"RAM checkpoint {source} does not match the architecture: " + '; '.join(parts))
    return sd


def load_ram_tagger(path: str = DEFAULT_DIR, device='cpu', dtype=torch.float32, **overrides):
    """Build a :class:`RAMTagger`, load its checkpoint strictly, read tags and thresholds.

    Returns ``(model.eval(), tags: List[str], thresholds: FloatTensor [num_classes])``.
    """
    files = resolve_ram_files(path)
    cfg = {}
    if files['config'].is_file():
        cfg = json.loads(files['config'].read_text())
    cfg.update(overrides)
    ckpt = _torch_load(files['checkpoint'])
    raw = ckpt.get('model', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(raw, dict):
        raise RuntimeError(f"RAM checkpoint {files['checkpoint']}: expected a state dict (optionally under 'model')")
    with torch.device('meta'):  # no allocation/initialisation of weights that are overwritten anyway
        model = RAMTagger(**cfg)
    model = model.to_empty(device='cpu')
    _reset_buffers(model)
    model.load_state_dict(prepare_state_dict(model, raw, str(files['checkpoint'])), strict=True)
    tags, thr = read_tag_files(files['tag_list'], files['thresholds'], model.num_classes)
    return model.to(device=device, dtype=dtype).eval(), tags, thr


def _reset_buffers(model: RAMTagger) -> None:
    """Recompute the deterministic buffers after ``to_empty`` (meta construction leaves them empty)."""
    for m in model.modules():
        if hasattr(m, 'init_non_persistent_buffers'):  # timm's Swin blocks and window attention
            m.init_non_persistent_buffers()
        elif isinstance(m, _BertEmbeddings):
            m.position_ids = torch.arange(m.position_embeddings.num_embeddings).unsqueeze(0)


def save_ram_checkpoint(model: RAMTagger, out_dir: str, tags: Sequence[str], thresholds: Sequence[float]) -> Path:
    """Write ``out_dir`` in the official layout: ``{'model': official_state_dict(model)}`` .pth +
    tag/threshold files (+ ``ram_config.json`` with the architecture kwargs). Used for tiny test models."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from dalpsr.utils.misc import atomic_path, atomic_write_json, atomic_write_text
    with atomic_path(out / CHECKPOINT_NAME) as tmp:
        torch.save({'model': official_state_dict(model)}, tmp)
    atomic_write_text(out / TAG_LIST_NAME, '\n'.join(tags) + '\n')
    atomic_write_text(out / THRESHOLD_NAME, '\n'.join(f'{float(t):.4f}' for t in thresholds) + '\n')
    atomic_write_json(out / CONFIG_NAME, model.config)
    return out / CHECKPOINT_NAME


def tiny_ram_config(num_classes: int = 12) -> dict:
    """A CPU-sized RAMTagger config (64 px input, 2 Swin stages, 32-dim head) for tests."""
    return dict(image_size=64, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=4,
                num_classes=num_classes, label_dim=16, head_hidden=32, head_layers=2, head_heads=2,
                head_intermediate=64)
