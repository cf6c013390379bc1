"""IRPAD: the image-restoration prompt alignment decoder (DaLPSR paper III-B.2, Fig. 1a).

An LR image is encoded into image tokens; every candidate degradation prompt (one per
degradation type x interval, e.g. "Deblur with sigma 0.5~0.75") is embedded once; a
two-block alignment decoder (each block: cross-attention with the prompt embeddings as
queries and the image tokens as keys/values, then a feed-forward layer) aligns prompts with
the image; a scalar relevance score per decoded prompt gives, for each type, scores over its
K intervals. Prediction is retrieval: the interval with the highest score.

Parts (all chosen by options, see options/reference/irpad.yml):

* image encoder ``{'type': 'conv', ...}``: a small CNN trained from scratch (CPU friendly), or
  ``{'type': 'open_clip', 'model_name': 'ViT-B-16', 'pretrained': tag|file|None, ...}``: the
  visual tower of an open_clip model (frozen or trainable), patch tokens as image tokens.
* prompt embeddings ``{'type': 'learnable'}`` (a free embedding per candidate),
  ``{'type': 'open_clip', ...}`` or ``{'type': 'hf_clip', 'path': dir}`` (a frozen text
  encoder embeds the candidate phrases once at construction; the features are kept in the
  ``prompt_features`` buffer, so a saved IRPAD needs no text encoder to load), or
  ``{'type': 'cached', 'dim': D}`` (used when loading such a saved IRPAD).

Heavy libraries (open_clip, transformers) are imported only when those parts are used.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dalpsr.utils.registry import ARCH_REGISTRY

__all__ = ['IRPAD', 'ConvEncoder', 'OpenCLIPImageEncoder', 'AlignmentBlock', 'load_open_clip',
           'build_image_encoder']


# --------------------------------------------------------------------------------------------
# image encoders: lq [B, 3, h, w] in [0, 1] -> tokens [B, N, C]
# --------------------------------------------------------------------------------------------
class _ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.act = nn.GELU()

    def forward(self, x):
        return x + self.conv2(self.act(self.conv1(self.act(x))))


_POOLS = {'mean': lambda f: f.mean(-1), 'std': lambda f: f.std(-1, unbiased=False),
          'max': lambda f: f.amax(-1), 'min': lambda f: f.amin(-1)}


class ConvEncoder(nn.Module):
    """Small CNN trained from scratch; keeps full resolution in the stem (noise, JPEG blocks
    and blur are pixel-level cues), then halves the resolution per stage.

    Input ``x``: [B, 3, h, w] in [0, 1]. Output tokens: [B, (h/2^S) * (w/2^S), channels[-1]]
    where S = ``len(channels) - 1`` strided stages (default 3: a 128x128 LR gives 16x16 = 256
    tokens; total stride 8 keeps each token aligned with the 8x8 JPEG block grid).

    ``highpass`` > 0 adds 3 input channels ``highpass * (y - box3x3(y))`` (``y = 2x - 1``,
    reflect padding): the residual that holds noise, JPEG blocking and edge sharpness, scaled
    so that 8-bit noise of a few levels is not drowned by image content at initialisation.
    Without it a from-scratch CNN sits at chance for hundreds of steps (docs/irpad.md).

    ``stat_tokens=True`` appends one token per resolution level (stem and every stage): the
    spatial statistics ``stat_pool`` (any of mean, std, max, min; default mean and std) of that
    level's features, concatenated and linearly projected to ``channels[-1]`` (output
    [B, N + S + 1, C]). They give the decoder direct access to the global statistics of the
    shallow, full-resolution features where noise and JPEG cues live (min/max: the flattest
    and the sharpest places, where noise and blur are best measured).

    ``dstat_tokens=n`` (> 0) appends n more tokens made from hand-crafted degradation
    statistics of the whole LR (noise level in flat cells, gradient and spectrum fall-off,
    8x8 blockiness and DCT zero fractions; :mod:`dalpsr.archs.degradation_stats`), output
    [B, N + ... + n, C]. They need LR crops of at least 16x16. ``dstat_features`` chooses the
    statistics: ``'v1'`` (115), ``'v2'`` (v1 + 44 edge-width and spectrum features for blur) or
    ``'v3'`` (v2 + 31 re-blur features); ``dstat_dropout`` is the dropout on the hidden layer of
    the MLP that turns them into tokens.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64, 128), blocks_per_stage: int = 1,
                 highpass: float = 0.0, stat_tokens: bool = False, stat_pool: Sequence[str] = ('mean', 'std'),
                 dstat_tokens: int = 0, dstat_features: str = 'v1', dstat_dropout: float = 0.0):
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) < 1:
            raise ValueError('ConvEncoder: channels needs at least one entry')
        self.highpass = float(highpass)
        if self.highpass < 0:
            raise ValueError(f'ConvEncoder: highpass must be >= 0, got {highpass}')
        cin = 6 if self.highpass > 0 else 3
        self.stem = nn.Sequential(nn.Conv2d(cin, channels[0], 3, padding=1), nn.GELU(),
                                  nn.Conv2d(channels[0], channels[0], 3, padding=1))
        stages = []
        for cin, cout in zip(channels[:-1], channels[1:]):
            layers = [nn.GELU(), nn.Conv2d(cin, cout, 3, stride=2, padding=1)]
            layers += [_ResBlock(cout) for _ in range(blocks_per_stage)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.stat_tokens = bool(stat_tokens)
        self.stat_pool = [str(p) for p in stat_pool]
        if not self.stat_pool or any(p not in _POOLS for p in self.stat_pool) or len(set(self.stat_pool)) != len(self.stat_pool):
            raise ValueError(f'ConvEncoder: stat_pool must be distinct names from {sorted(_POOLS)}, got {stat_pool}')
        if self.stat_tokens:
            self.stat_proj = nn.ModuleList(nn.Linear(len(self.stat_pool) * c, channels[-1]) for c in channels)
        self.dstat_tokens = int(dstat_tokens or 0)
        if self.dstat_tokens < 0:
            raise ValueError(f'ConvEncoder: dstat_tokens must be >= 0, got {dstat_tokens}')
        if self.dstat_tokens:
            from dalpsr.archs.degradation_stats import DegradationStatsTokens
            self.dstat = DegradationStatsTokens(channels[-1], self.dstat_tokens, feature_set=dstat_features,
                                                dropout=dstat_dropout)
        self.norm = nn.LayerNorm(channels[-1])
        self.out_dim = channels[-1]
        self.stride = 2 ** (len(channels) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 2.0 - 1.0
        if self.highpass > 0:
            low = F.avg_pool2d(F.pad(y, (1, 1, 1, 1), mode='reflect'), 3, stride=1)
            y = torch.cat([y, self.highpass * (y - low)], 1)
        f = self.stem(y)
        extra = [self.dstat(x)] if self.dstat_tokens else []
        if not self.stat_tokens:
            f = self.stages(f)
            return self.norm(torch.cat([f.flatten(2).transpose(1, 2)] + extra, 1))
        stats = []
        for i, proj in enumerate(self.stat_proj):
            if i:
                f = self.stages[i - 1](f)
            flat = f.flatten(2)
            stats.append(proj(torch.cat([_POOLS[p](flat) for p in self.stat_pool], 1)))
        tokens = torch.cat([f.flatten(2).transpose(1, 2), torch.stack(stats, 1)] + extra, 1)
        return self.norm(tokens)


def load_open_clip(model_name: str, pretrained: Optional[str] = None, device='cpu'):
    """Build an open_clip model: ``model_name`` is a built-in name (``'ViT-B-16'``) with
    ``pretrained`` a tag (``'openai'``, ``'laion2b_s34b_b88k'``; downloaded into the open_clip
    cache) or a local checkpoint file, or ``'local-dir:/path'`` (a folder with
    ``open_clip_config.json`` and weights). ``pretrained=None`` gives random weights.
    Returns ``(model, tokenizer)``. A missing local file fails with one line."""
    import open_clip
    if pretrained and not model_name.startswith(('local-dir:', 'hf-hub:')):
        looks_like_path = os.sep in pretrained or pretrained.endswith(('.pt', '.pth', '.bin', '.safetensors'))
        if looks_like_path and not os.path.isfile(pretrained):
            raise FileNotFoundError(f"open_clip checkpoint not found: {pretrained} (download the weights of "
                                    f"{model_name} and give their path as 'pretrained', or use a pretrained tag)")
    if model_name.startswith('local-dir:') and not os.path.isdir(model_name[len('local-dir:'):]):
        raise FileNotFoundError(f"open_clip folder not found: {model_name[len('local-dir:'):]} (it needs "
                                "open_clip_config.json and the weights file)")
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained or None, device=device)
    except RuntimeError as err:
        raise RuntimeError(f"could not build open_clip '{model_name}' with pretrained={pretrained!r}: "
                           f"{str(err).splitlines()[0]}") from None
    tokenizer = open_clip.get_tokenizer(model_name)
    return model, tokenizer


class OpenCLIPImageEncoder(nn.Module):
    """Visual tower of an open_clip ViT; the LR image is resized to the tower's input size
    (bicubic, antialiased) and normalised with its mean/std.

    Input ``x``: [B, 3, h, w] in [0, 1]. Output tokens: [B, N, width] (patch tokens after the
    final LayerNorm, or the tokens of block ``token_layer`` when given; N = (size/patch)^2).
    ``frozen=True`` keeps the tower in eval mode without gradients.
    """

    def __init__(self, model_name: str = 'ViT-B-16', pretrained: Optional[str] = None, frozen: bool = True,
                 token_layer: Optional[int] = None, image_size: Optional[int] = None,
                 vision_spec: Optional[Dict[str, Any]] = None, _model=None):
        super().__init__()
        if vision_spec is not None and _model is None:
            # rebuilding a saved IRPAD: only the tower's architecture, weights come from its state dict
            from open_clip.model import _build_vision_tower
            visual = _build_vision_tower(**vision_spec)
        else:
            model = _model if _model is not None else load_open_clip(model_name, pretrained)[0]
            visual = model.visual
        self.vision_spec = vision_spec or _vision_spec(model_name, visual)
        if not hasattr(visual, 'transformer') or not hasattr(visual, '_embeds'):
            raise ValueError(f"open_clip image encoder: '{model_name}' has no ViT visual tower "
                             "(use a ViT model such as ViT-B-16)")
        self.visual = visual
        self.visual.output_tokens = True
        size = image_size or visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        cfg = getattr(visual, 'preprocess_cfg', {}) or {}
        mean = cfg.get('mean', getattr(visual, 'image_mean', None)) or (0.48145466, 0.4578275, 0.40821073)
        std = cfg.get('std', getattr(visual, 'image_std', None)) or (0.26862954, 0.26130258, 0.27577711)
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.frozen = bool(frozen)
        self.token_layer = token_layer
        self.out_dim = int(visual.transformer.width)
        if self.frozen:
            self.visual.requires_grad_(False)
            self.visual.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.visual.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            # antialiased: a large LR shrunk to the tower's size must not alias its noise and JPEG
            # grid away (no effect when enlarging, e.g. a training-size crop)
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode='bicubic', align_corners=False,
                              antialias=True)
        x = (x - self.mean) / self.std
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            if self.token_layer is None:
                _, tokens = self.visual(x)
            else:
                out = self.visual.forward_intermediates(x, indices=[int(self.token_layer)], output_fmt='NLC',
                                                        intermediates_only=True)
                tokens = out['image_intermediates'][0]
        return tokens


def _vision_spec(model_name: str, visual) -> Optional[Dict[str, Any]]:
    """Arguments of open_clip's ``_build_vision_tower`` that rebuild ``visual`` (None if unknown)."""
    import json
    import open_clip
    try:
        if model_name.startswith('local-dir:'):
            with open(os.path.join(model_name[len('local-dir:'):], 'open_clip_config.json'), encoding='utf-8') as f:
                cfg = json.load(f)['model_cfg']
        elif model_name.startswith('hf-hub:'):
            return None
        else:
            cfg = open_clip.get_model_config(model_name.replace('/', '-'))
        from open_clip.transformer import QuickGELU
        quick = any(isinstance(m, QuickGELU) for m in visual.modules()) or bool(cfg.get('quick_gelu', False))
        return {'embed_dim': int(cfg['embed_dim']), 'vision_cfg': copy.deepcopy(cfg['vision_cfg']), 'quick_gelu': quick}
    except Exception:  # noqa: BLE001 - best effort; loading then rebuilds from model_name
        return None


def build_image_encoder(cfg: Dict[str, Any], shared_clip=None) -> nn.Module:
    cfg = {k: v for k, v in (cfg or {'type': 'conv'}).items() if not str(k).startswith('_')}
    kind = cfg.pop('type', 'conv')
    if kind == 'conv':
        return ConvEncoder(**cfg)
    if kind == 'open_clip':
        return OpenCLIPImageEncoder(**cfg, _model=shared_clip)
    raise ValueError(f"IRPAD image_encoder.type must be 'conv' or 'open_clip', got '{kind}'")


# --------------------------------------------------------------------------------------------
# candidate prompt embeddings
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def _encode_phrases_open_clip(model, tokenizer, phrases: List[str]) -> torch.Tensor:
    model.eval()
    tokens = tokenizer(phrases)
    feats = model.encode_text(tokens)
    return F.normalize(feats.float(), dim=-1)


@torch.no_grad()
def _encode_phrases_hf_clip(path: str, phrases: List[str]) -> torch.Tensor:
    from transformers import CLIPTextModelWithProjection
    if not os.path.isdir(path):
        raise FileNotFoundError(f"CLIP text model folder not found: {path} (a transformers CLIP text model "
                                "saved with save_pretrained, with its tokenizer files or none)")
    model = CLIPTextModelWithProjection.from_pretrained(path).eval()
    if any(os.path.isfile(os.path.join(path, n)) for n in ('tokenizer.json', 'vocab.json')):
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(path)
    else:  # no tokenizer files next to the model: the offline CLIP tokenizer (same ids as OpenAI CLIP)
        from dalpsr.utils.clip_tokenizer import offline_clip_tokenizer
        tok = offline_clip_tokenizer()
    max_len = min(int(tok.model_max_length), int(model.config.max_position_embeddings))
    ids = tok(phrases, padding='max_length', max_length=max_len, truncation=True, return_tensors='pt')
    feats = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask).text_embeds
    return F.normalize(feats.float(), dim=-1)


# --------------------------------------------------------------------------------------------
# the alignment decoder
# --------------------------------------------------------------------------------------------
class AlignmentBlock(nn.Module):
    """Cross-attention (queries: prompt embeddings [B, Q, D]; keys/values: image tokens
    [B, N, D]) followed by a feed-forward layer; pre-norm residual form."""

    def __init__(self, dim: int, num_heads: int = 8, ffn_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm_ffn = nn.LayerNorm(dim)
        hidden = int(dim * ffn_ratio)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))

    def forward(self, q: torch.Tensor, kv: torch.Tensor, need_weights: bool = False):
        kvn = self.norm_kv(kv)
        att, weights = self.attn(self.norm_q(q), kvn, kvn, need_weights=need_weights, average_attn_weights=True)
        q = q + att
        q = q + self.ffn(self.norm_ffn(q))
        return q, weights


@ARCH_REGISTRY.register()
class IRPAD(nn.Module):
    """Image-restoration prompt alignment decoder.

    Args:
        num_types: T, number of degradation types (e.g. 3: blur, noise, jpeg).
        num_intervals: K, intervals per type.
        candidates: T x K phrases (``PromptSpec.candidates()``); needed by text-encoder prompt
            embeddings, stored for reference otherwise.
        image_encoder: ``{'type': 'conv', channels, blocks_per_stage}`` or ``{'type':
            'open_clip', model_name, pretrained, frozen, token_layer, image_size}``.
        prompt_embedding: ``{'type': 'learnable'}``, ``{'type': 'open_clip', model_name,
            pretrained}``, ``{'type': 'hf_clip', path}`` or ``{'type': 'cached', dim}``.
            Text features are frozen; a trainable linear projection maps them to ``embed_dim``
            and a learnable per-candidate offset (zero-initialised) is added.
        embed_dim, num_blocks (paper: 2), num_heads, ffn_ratio, dropout: decoder sizes.
        stats_score: add to every candidate's score its similarity with the statistics embedding
            (the mean of the conv encoder's ``dstat_tokens``, layer-normed) through a linear map of
            the candidate's prompt embedding: a retrieval on the hand-crafted statistics alone,
            next to the decoder's, so they reach the scores without passing the attention
            (needs ``image_encoder.dstat_tokens > 0``).

    ``forward(lq)``: lq [B, 3, h, w] in [0, 1] -> logits [B, T, K] (unnormalised scores;
    softmax over K gives per-type interval probabilities).
    """

    def __init__(self, num_types: int = 3, num_intervals: int = 4,
                 candidates: Optional[List[List[str]]] = None,
                 image_encoder: Optional[Dict[str, Any]] = None,
                 prompt_embedding: Optional[Dict[str, Any]] = None,
                 embed_dim: int = 128, num_blocks: int = 2, num_heads: int = 4, ffn_ratio: float = 2.0,
                 dropout: float = 0.0, stats_score: bool = False):
        super().__init__()
        self.num_types, self.num_intervals = int(num_types), int(num_intervals)
        if self.num_types < 1 or self.num_intervals < 2:
            raise ValueError(f'IRPAD needs num_types >= 1 and num_intervals >= 2, got {num_types}, {num_intervals}')
        if candidates is not None:
            if len(candidates) != self.num_types or any(len(c) != self.num_intervals for c in candidates):
                raise ValueError(f'IRPAD candidates must be {self.num_types} x {self.num_intervals} phrases')
            candidates = [[str(p) for p in row] for row in candidates]
        self.candidates = candidates
        image_encoder = copy.deepcopy(image_encoder) if image_encoder else {'type': 'conv'}
        prompt_embedding = copy.deepcopy(prompt_embedding) if prompt_embedding else {'type': 'learnable'}
        self.config = dict(num_types=self.num_types, num_intervals=self.num_intervals, candidates=candidates,
                           image_encoder=copy.deepcopy(image_encoder),
                           prompt_embedding=copy.deepcopy(prompt_embedding), embed_dim=embed_dim,
                           num_blocks=num_blocks, num_heads=num_heads, ffn_ratio=ffn_ratio, dropout=dropout,
                           stats_score=bool(stats_score))
        q = self.num_types * self.num_intervals

        # text features of the candidates (frozen) --------------------------------------
        ptype = prompt_embedding.get('type', 'learnable')
        allowed = {'learnable': {'type'}, 'cached': {'type', 'dim'},
                   'open_clip': {'type', 'model_name', 'pretrained'}, 'hf_clip': {'type', 'path'}}
        if ptype not in allowed:
            raise ValueError(f"IRPAD prompt_embedding.type must be one of {sorted(allowed)}, got '{ptype}'")
        extra = set(prompt_embedding) - allowed[ptype]
        if extra:
            raise ValueError(f"IRPAD prompt_embedding (type {ptype}): unknown key(s) {sorted(extra)}")
        shared_clip = None
        feats = None
        if ptype in ('open_clip', 'hf_clip'):
            if candidates is None:
                raise ValueError(f"IRPAD prompt_embedding.type '{ptype}' needs the candidate phrases")
            phrases = [p for row in candidates for p in row]
            if ptype == 'open_clip':
                name = prompt_embedding.get('model_name', 'ViT-B-16')
                pre = prompt_embedding.get('pretrained')
                model, tok = load_open_clip(name, pre)
                feats = _encode_phrases_open_clip(model, tok, phrases)
                if (image_encoder.get('type') == 'open_clip' and image_encoder.get('model_name', 'ViT-B-16') == name
                        and image_encoder.get('pretrained') == pre):
                    shared_clip = model  # one load for both towers
            else:
                feats = _encode_phrases_hf_clip(prompt_embedding['path'], phrases)
            # a saved IRPAD keeps the features and reloads as 'cached'
            self.config['prompt_embedding'] = {'type': 'cached', 'dim': int(feats.shape[-1])}
        elif ptype == 'cached':
            feats = torch.zeros(q, int(prompt_embedding['dim']))
        if feats is not None:
            self.register_buffer('prompt_features', feats.clone())
            self.prompt_proj = nn.Linear(feats.shape[-1], embed_dim)
            self.prompt_offset = nn.Parameter(torch.zeros(q, embed_dim))
        else:
            self.prompt_features = None
            self.prompt_proj = None
            self.prompt_offset = nn.Parameter(torch.randn(q, embed_dim) * 0.02)

        self.prompt_norm = nn.LayerNorm(embed_dim)

        # image encoder ---------------------------------------------------------------
        self.image_encoder = build_image_encoder(image_encoder, shared_clip=shared_clip)
        if self.config['image_encoder'].get('type') == 'open_clip':
            # the saved weights hold the tower: rebuild with random init, then load_state_dict
            self.config['image_encoder']['pretrained'] = None
            self.config['image_encoder']['vision_spec'] = self.image_encoder.vision_spec
            self.config['image_encoder']['_saved_from'] = image_encoder.get('pretrained')
        self.image_proj = nn.Sequential(nn.Linear(self.image_encoder.out_dim, embed_dim), nn.LayerNorm(embed_dim))

        # decoder ---------------------------------------------------------------------
        self.blocks = nn.ModuleList(AlignmentBlock(embed_dim, num_heads, ffn_ratio, dropout)
                                    for _ in range(int(num_blocks)))
        self.norm_out = nn.LayerNorm(embed_dim)
        # score = relevance of a decoded prompt: a linear term plus its similarity with the
        # pooled image embedding (retrieval); no bias (it would cancel in the softmax over K)
        self.score = nn.Linear(embed_dim, 1, bias=False)
        self.sim_q = nn.Linear(embed_dim, embed_dim, bias=False)
        self.sim_img = nn.LayerNorm(embed_dim)
        self.stats_tokens = 0
        if stats_score:
            self.stats_tokens = int(getattr(self.image_encoder, 'dstat_tokens', 0) or 0)
            if self.stats_tokens < 1:
                raise ValueError('IRPAD stats_score needs an image encoder with statistics tokens '
                                 '(image_encoder: {type: conv, dstat_tokens: n > 0})')
            self.stats_q = nn.Linear(embed_dim, embed_dim, bias=False)
            self.stats_img = nn.LayerNorm(embed_dim)

    # -----------------------------------------------------------------------------------
    def prompt_queries(self) -> torch.Tensor:
        """Candidate prompt embeddings [T*K, D] (type-major: index t*K + k)."""
        if self.prompt_proj is None:
            q = self.prompt_offset
        else:
            q = self.prompt_proj(self.prompt_features) + self.prompt_offset
        # unit-scale queries, so their identity is not drowned by the first residual update
        return self.prompt_norm(q)

    def image_tokens(self, lq: torch.Tensor) -> torch.Tensor:
        """lq [B, 3, h, w] in [0, 1] -> image tokens [B, N, D]."""
        return self.image_proj(self.image_encoder(lq))

    def forward(self, lq: torch.Tensor, return_attention: bool = False):
        """lq [B, 3, h, w] in [0, 1] -> logits [B, T, K] (and, if asked, the last block's
        attention [B, T*K, N])."""
        if lq.dim() != 4 or lq.shape[1] != 3:
            raise ValueError(f'IRPAD expects lq of shape [B, 3, h, w], got {tuple(lq.shape)}')
        kv = self.image_tokens(lq)
        prompts = self.prompt_queries()
        q = prompts.unsqueeze(0).expand(lq.shape[0], -1, -1)
        weights = None
        for i, blk in enumerate(self.blocks):
            q, weights = blk(q, kv, need_weights=return_attention and i == len(self.blocks) - 1)
        qn = self.norm_out(q)
        g = self.sim_img(kv.mean(1))                                   # [B, D]
        sim = (self.sim_q(qn) * g[:, None]).sum(-1) / qn.shape[-1] ** 0.5  # [B, Q]
        if self.stats_tokens:                                          # the conv encoder appends them last
            sim = sim + self._stats_sim(kv[:, -self.stats_tokens:], prompts)
        logits = (self.score(qn).squeeze(-1) + sim).view(-1, self.num_types, self.num_intervals)
        return (logits, weights) if return_attention else logits

    def _stats_sim(self, stats_kv: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Projected statistics tokens [B, n, D], candidate embeddings [Q, D] -> the ``stats_score``
        term [B, Q]: the candidates' similarity with the tokens' mean."""
        st = self.stats_img(stats_kv.mean(1))                          # [B, D]
        return st @ self.stats_q(prompts).t() / prompts.shape[-1] ** 0.5

    def stats_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Raw degradation statistics [B, F] of the LRs (``degradation_statistics`` of the encoder's
        ``dstat_features``) -> the ``stats_score`` term alone as logits [B, T, K]: what the
        statistics path adds to ``forward``'s scores, computed without the image (needs
        ``stats_score``). Used to pre-train that path on statistics computed once."""
        if not self.stats_tokens:
            raise ValueError('IRPAD.stats_logits needs stats_score: true')
        enc = self.image_encoder
        kv = self.image_proj(enc.norm(enc.dstat.from_features(features)))
        return self._stats_sim(kv, self.prompt_queries()).view(-1, self.num_types, self.num_intervals)

    def stats_parameters(self) -> List[nn.Parameter]:
        """The parameters only the statistics path uses (the statistics MLP and its BatchNorm,
        ``stats_img``, ``stats_q``); the layers it shares with the conv tokens are not included."""
        if not self.stats_tokens:
            return []
        mods = [self.image_encoder.dstat, self.stats_img, self.stats_q]
        return [p for m in mods for p in m.parameters()]

    @torch.no_grad()
    def predict(self, lq: torch.Tensor) -> torch.Tensor:
        """lq [B, 3, h, w] in [0, 1] -> LongTensor [B, T] (interval index 0..K-1 per type)."""
        return self.forward(lq).argmax(-1)
