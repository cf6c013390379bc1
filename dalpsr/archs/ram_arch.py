"""RAM (Recognize Anything Model) image tagger, written for dalpsr.

The network reproduces the module layout of the official ``ram_swin_large_14m.pth`` so that
checkpoint loads without renaming (see ``ram_layout.json`` next to this file for the recorded
key names/shapes and where they were read from):

- ``visual_encoder``: a Swin transformer (Swin-L 384: embed 192, depths 2-2-18-2, heads
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
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
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
# Swin transformer
# ------------------------------------------------------------------------------------------
def _windows(x: torch.Tensor, w: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * H/w * W/w, w*w, C]."""
    b, h, wd, c = x.shape
    x = x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, c)


def _unwindows(x: torch.Tensor, w: int, h: int, wd: int) -> torch.Tensor:
    """Inverse of :func:`_windows`: [B * nW, w*w, C] -> [B, H, W, C]."""
    c = x.shape[-1]
    b = x.shape[0] // ((h // w) * (wd // w))
    x = x.view(b, h // w, wd // w, w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, wd, c)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _WindowAttention(nn.Module):
    """Multi-head self-attention inside w x w windows with a learned relative position bias."""

    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        self.window, self.heads = window, heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer('relative_position_index', relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x: [B*nW, N, C]; mask: [nW, N, N] additive (0 / -100) or None."""
        bn, n, c = x.shape
        q, k, v = self.qkv(x).view(bn, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, self.heads).permute(2, 0, 1).unsqueeze(0).to(q.dtype)  # [1, h, N, N]
        if mask is not None:
            nw = mask.shape[0]
            bias = (bias.unsqueeze(1) + mask.to(q.dtype)[None, :, None]).expand(bn // nw, -1, -1, -1, -1)
            bias = bias.reshape(bn, self.heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(bn, n, c))


def relative_position_index(window: int) -> torch.Tensor:
    """[w*w, w*w] int64 index into the (2w-1)^2 bias table (Swin's definition)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing='ij')).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shifted_window_mask(res: int, window: int, shift: int) -> torch.Tensor:
    """[nW, w*w, w*w] additive mask (0 within a region, -100 across) for a cyclic shift."""
    img = torch.zeros(1, res, res, 1)
    cnt = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    win = _windows(img, window).squeeze(-1)  # [nW, w*w]
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class _SwinBlock(nn.Module):
    def __init__(self, dim: int, res: int, heads: int, window: int, shift: int, mlp_ratio: float = 4.0):
        super().__init__()
        if res <= window:  # a single window covers the map: no partition, no shift
            window, shift = res, 0
        self.res, self.window, self.shift = res, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        self.register_buffer('attn_mask', shifted_window_mask(res, window, shift) if shift > 0 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.norm1(x).view(b, self.res, self.res, c)
        if self.shift:
            h = torch.roll(h, (-self.shift, -self.shift), dims=(1, 2))
        h = self.attn(_windows(h, self.window), self.attn_mask)
        h = _unwindows(h, self.window, self.res, self.res)
        if self.shift:
            h = torch.roll(h, (self.shift, self.shift), dims=(1, 2))
        x = x + h.reshape(b, n, c)
        return x + self.mlp(self.norm2(x))


class _PatchMerging(nn.Module):
    def __init__(self, dim: int, res: int):
        super().__init__()
        self.res = res
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x):
        b, _, c = x.shape
        x = x.view(b, self.res, self.res, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class _SwinStage(nn.Module):
    def __init__(self, dim, res, depth, heads, window, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            [_SwinBlock(dim, res, heads, window, 0 if i % 2 == 0 else window // 2) for i in range(depth)])
        self.downsample = _PatchMerging(dim, res) if downsample else None

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class _PatchEmbed(nn.Module):
    def __init__(self, image_size: int, patch: int, dim: int):
        super().__init__()
        self.image_size = image_size
        self.proj = nn.Conv2d(3, dim, patch, patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f'RAM expects {self.image_size}x{self.image_size} input, got {tuple(x.shape[-2:])}')
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class SwinEncoder(nn.Module):
    """Swin image encoder: [B,3,S,S] normalised -> [B, 1 + (S / (patch * 2^(stages-1)))^2, C_last] (pooled token first)."""

    def __init__(self, image_size=384, patch_size=4, embed_dim=192, depths=(2, 2, 18, 2),
                 num_heads=(6, 12, 24, 48), window_size=12):
        super().__init__()
        self.patch_embed = _PatchEmbed(image_size, patch_size, embed_dim)
        res = image_size // patch_size
        self.layers = nn.ModuleList()
        for i, (d, h) in enumerate(zip(depths, num_heads)):
            self.layers.append(_SwinStage(embed_dim * 2 ** i, res // 2 ** i, d, h, window_size,
                                          downsample=i < len(depths) - 1))
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)

    def forward(self, x):
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
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
        self.register_buffer('position_ids', torch.arange(positions).unsqueeze(0))


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


def prepare_state_dict(model: RAMTagger, raw: Dict[str, torch.Tensor], source: str = '') -> Dict[str, torch.Tensor]:
    """Map an official RAM state dict onto ``model`` strictly.

    - ``vision_multi.*`` is renamed to ``tagging_head.*`` (as the official loader does);
    - rebuilt buffers (``relative_position_index``, ``attn_mask``, ``position_ids``) must equal the
      model's own (a different window/size would show here) and are then dropped;
    - without ``caption_branch`` the ``tag_encoder.*`` / ``text_decoder.*`` keys are dropped;
    - every other key must exist in the model with the same shape and every model key must be
      present: otherwise a ``RuntimeError`` lists the offending keys.
    """
    sd = {}
    for k, v in raw.items():
        if k.startswith('vision_multi.'):
            k = 'tagging_head.' + k[len('vision_multi.'):]
        sd[k] = v
    own = model.state_dict()
    bad_buffers = []
    for k in list(sd):
        if k.endswith(_BUFFER_SUFFIXES):
            if k in own and (own[k].shape != sd[k].shape or not torch.equal(own[k].to(sd[k].dtype), sd[k])):
                bad_buffers.append(k)
            sd.pop(k)
    if not model.config['caption_branch']:
        for k in list(sd):
            if k.startswith(('tag_encoder.', 'text_decoder.')):
                sd.pop(k)
    expected = {k for k in own if not k.endswith(_BUFFER_SUFFIXES)}
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    shape = sorted(k for k in expected & set(sd) if tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shape or bad_buffers:
        parts = []
        for name, keys in (('missing', missing), ('unexpected', unexpected), ('shape mismatch', shape),
                           ('buffer mismatch', bad_buffers)):
            if keys:
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
    sd = prepare_state_dict(model, raw, str(files['checkpoint']))
    model.load_state_dict(sd, strict=False)  # strictness enforced above (buffers are rebuilt)
    tags, thr = read_tag_files(files['tag_list'], files['thresholds'], model.num_classes)
    return model.to(device=device, dtype=dtype).eval(), tags, thr


def _reset_buffers(model: RAMTagger) -> None:
    """Recompute the deterministic buffers after ``to_empty`` (meta construction leaves them empty)."""
    for m in model.modules():
        if isinstance(m, _WindowAttention):
            m.relative_position_index = relative_position_index(m.window)
        elif isinstance(m, _SwinBlock) and m.shift:
            m.attn_mask = shifted_window_mask(m.res, m.window, m.shift)
        elif isinstance(m, _BertEmbeddings):
            m.position_ids = torch.arange(m.position_embeddings.num_embeddings).unsqueeze(0)


def save_ram_checkpoint(model: RAMTagger, out_dir: str, tags: Sequence[str], thresholds: Sequence[float]) -> Path:
    """Write ``out_dir`` in the official layout: ``{'model': state_dict}`` .pth + tag/threshold files
    (+ ``ram_config.json`` with the architecture kwargs). Used for tiny test models."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from dalpsr.utils.misc import atomic_path, atomic_write_json, atomic_write_text
    with atomic_path(out / CHECKPOINT_NAME) as tmp:
        torch.save({'model': model.state_dict()}, tmp)
    atomic_write_text(out / TAG_LIST_NAME, '\n'.join(tags) + '\n')
    atomic_write_text(out / THRESHOLD_NAME, '\n'.join(f'{float(t):.4f}' for t in thresholds) + '\n')
    atomic_write_json(out / CONFIG_NAME, model.config)
    return out / CHECKPOINT_NAME


def tiny_ram_config(num_classes: int = 12) -> dict:
    """A CPU-sized RAMTagger config (64 px input, 2 Swin stages, 32-dim head) for tests."""
    return dict(image_size=64, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=4,
                num_classes=num_classes, label_dim=16, head_hidden=32, head_layers=2, head_heads=2,
                head_intermediate=64)
