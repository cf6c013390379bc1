"""SRCLIP: DePLSR's degradation-aware CLIP, and SRCLIPLite, its small from-scratch CPU variant.

Both have one interface (what the SRCLIP training model, RealDAT and scripts/eval_srclip.py use)::

    enc.encode_image(img [B, 3, H, W] in [0, 1]) -> {'content': [B, E], 'degradation': [B, E],
                                                      'fine': [B, 5, E]}      (all L2-normalised)
    enc.encode_text(tokens [N, T]) -> [N, E] (L2-normalised);   enc.tokenize(list of str) -> [N, T]
    enc.embed_dim (E), enc.config (constructor kwargs)

* :class:`SRCLIP` (paper): a frozen open_clip CLIP (ViT-B/32 ``laion2b_s34b_b79k``: E 512, width
  768, 12 blocks, 224 input) plus a trainable copy of its visual tower (the *control* tower) and
  one zero-initialised Linear(width, width) per block. Control block l's output, projected, is
  added to the residual stream after frozen block L-1-l (reverse order; open_clip's transformer
  has no control argument, so the blocks are run here one by one). content = frozen tower under
  control, degradation = control tower (pooled, projected), fine = Linear(E -> 5E)(degradation).
  Images are resized (bilinear) to the tower's input size and CLIP-normalised inside
  ``encode_image``. Text goes through the frozen CLIP text tower.
* :class:`SRCLIPLite` (CPU): a small conv degradation encoder (stride-2 stages, mean + std
  pooling) with content / degradation / fine heads of the same shapes, and a small open_clip
  ``TextTransformer`` trained from scratch with it (no pretrained text tower exists offline).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dalpsr.utils.registry import ARCH_REGISTRY

__all__ = ['SRCLIP', 'SRCLIPLite', 'build_open_clip']

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def build_open_clip(model_name: str = 'ViT-B-32', pretrained: Optional[str] = None,
                    config: Optional[Dict[str, Any]] = None):
    """An open_clip CLIP: ``config`` (kwargs of ``open_clip.model.CLIP``: embed_dim, vision_cfg,
    text_cfg; tests build tiny ones) or ``model_name`` with ``pretrained`` (a tag such as
    ``laion2b_s34b_b79k``, a local checkpoint file, or None for random weights)."""
    import open_clip
    if config is not None:
        from open_clip.model import CLIP
        cfg = copy.deepcopy(dict(config))
        return CLIP(**cfg)
    try:
        return open_clip.create_model(model_name, pretrained=pretrained)
    except Exception as err:  # noqa: BLE001 - offline hub, missing file: one line naming what to fetch
        raise FileNotFoundError(
            f"open_clip {model_name} weights '{pretrained}' could not be loaded ({type(err).__name__}); "
            f"download the open_clip checkpoint (e.g. laion/CLIP-ViT-B-32-laion2B-s34B-b79K "
            f"open_clip_pytorch_model.bin) into pretrained_models/ and pass its path as pretrained") from None


def _check_text(net) -> None:
    if getattr(net, 'image_only', False):
        raise RuntimeError('this SRCLIP copy holds the image encoder only (the one inside a RealDAT export); '
                           'encode text with the full SRCLIP export')


def _tokenizer(context_length: int):
    from open_clip.tokenizer import SimpleTokenizer
    return SimpleTokenizer(context_length=int(context_length))


class _TwoTowerCalls:
    """What SRCLIP and SRCLIPLite share: open_clip tokenization of captions and one ``forward``
    that encodes images and/or tokens (DDP wraps one call)."""

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Captions -> open_clip token ids ``[N, context_length]``."""
        if self._tok is None:
            self._tok = _tokenizer(self.context_length)
        return self._tok(list(texts))

    def forward(self, img: Optional[torch.Tensor] = None, tokens: Optional[torch.Tensor] = None):
        """``(encode_image(img) or None, encode_text(tokens) or None)`` in one call (what DDP wraps)."""
        return (self.encode_image(img) if img is not None else None,
                self.encode_text(tokens) if tokens is not None else None)


@ARCH_REGISTRY.register()
class SRCLIP(_TwoTowerCalls, nn.Module):
    """Module doc. Args: ``model_name``/``pretrained``/``clip_config`` (see :func:`build_open_clip`),
    ``num_fine`` (5 degradation types)."""

    def __init__(self, model_name: str = 'ViT-B-32', pretrained: Optional[str] = None,
                 clip_config: Optional[Dict[str, Any]] = None, num_fine: int = 5):
        super().__init__()
        self.config = dict(model_name=model_name, pretrained=pretrained, clip_config=clip_config,
                           num_fine=int(num_fine))
        self.clip = build_open_clip(model_name, pretrained, clip_config)
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.clip.eval()
        visual = self.clip.visual
        self.control = copy.deepcopy(visual)
        for p in self.control.parameters():
            p.requires_grad_(True)
        width = visual.transformer.width
        n = len(visual.transformer.resblocks)
        self.zero_proj = nn.ModuleList([nn.Linear(width, width) for _ in range(n)])
        for lin in self.zero_proj:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.embed_dim = int(visual.output_dim)
        self.num_fine = int(num_fine)
        self.fine_head = nn.Linear(self.embed_dim, self.num_fine * self.embed_dim)
        size = visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        pcfg = getattr(visual, 'preprocess_cfg', None) or {}
        self.register_buffer('mean', torch.tensor(pcfg.get('mean', OPENAI_MEAN)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(pcfg.get('std', OPENAI_STD)).view(1, 3, 1, 1), persistent=False)
        self.context_length = int(self.clip.context_length)
        self._tok = None

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # the frozen CLIP never trains (no dropout / batch statistics)
        return self

    def preprocess(self, img: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> resized (bilinear) to the tower's input and CLIP-normalised."""
        if tuple(img.shape[-2:]) != self.image_size:
            img = F.interpolate(img, size=self.image_size, mode='bilinear', align_corners=False)
        return (img - self.mean.to(img)) / self.std.to(img)

    @staticmethod
    def _run(visual, x: torch.Tensor, proj: Optional[nn.ModuleList] = None,
             control: Optional[List[torch.Tensor]] = None):
        """Run a visual tower block by block; collect ``proj[l](x_l)`` and/or add ``control[L-1-l]``."""
        x = visual._embeds(x)
        tr = visual.transformer
        if not getattr(tr, 'batch_first', True):
            x = x.transpose(0, 1)
        hiddens = []
        n = len(tr.resblocks)
        for i, blk in enumerate(tr.resblocks):
            x = blk(x)
            if proj is not None:
                hiddens.append(proj[i](x))
            if control is not None:
                x = x + control[n - 1 - i]
        if not getattr(tr, 'batch_first', True):
            x = x.transpose(0, 1)
        pooled, _ = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return pooled, hiddens

    def encode_image(self, img: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.preprocess(img)
        deg, hiddens = self._run(self.control, x, proj=self.zero_proj)
        content, _ = self._run(self.clip.visual, x, control=hiddens)
        fine = self.fine_head(deg).view(deg.shape[0], self.num_fine, self.embed_dim)
        return {'content': F.normalize(content, dim=-1), 'degradation': F.normalize(deg, dim=-1),
                'fine': F.normalize(fine, dim=-1)}

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        _check_text(self)
        with torch.no_grad():
            return F.normalize(self.clip.encode_text(tokens), dim=-1)

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """The trained parts (control tower, zero projections, fine head); the frozen CLIP comes
        from ``model_name``/``pretrained`` when loading, so it is stored too only when it has no
        such source (random weights: tests, tiny configs)."""
        if not self.config['pretrained']:
            return dict(self.state_dict())
        return {k: v for k, v in self.state_dict().items() if not k.startswith('clip.')}


class _ConvStage(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(nn.Conv2d(cin, cout, 3, stride, 1), nn.GELU(), nn.Conv2d(cout, cout, 3, 1, 1), nn.GELU())


@ARCH_REGISTRY.register()
class SRCLIPLite(_TwoTowerCalls, nn.Module):
    """Module doc. Args: ``embed_dim`` E; ``channels`` of the conv stages (the first keeps the
    resolution, the others halve it); ``input_size`` (resize the image to it, bilinear; None:
    native size, the encoder pools globally); text tower ``text_width``/``text_layers``/
    ``text_heads``/``context_length``; ``num_fine``."""

    def __init__(self, embed_dim: int = 128, channels: Sequence[int] = (32, 64, 96, 128), input_size: Optional[int] = None,
                 text_width: int = 128, text_layers: int = 2, text_heads: int = 4, context_length: int = 40,
                 num_fine: int = 5):
        super().__init__()
        from open_clip.transformer import TextTransformer
        channels = [int(c) for c in channels]
        self.config = dict(embed_dim=int(embed_dim), channels=channels, input_size=input_size,
                           text_width=int(text_width), text_layers=int(text_layers), text_heads=int(text_heads),
                           context_length=int(context_length), num_fine=int(num_fine))
        self.embed_dim, self.num_fine = int(embed_dim), int(num_fine)
        self.input_size = None if input_size in (None, 0) else int(input_size)
        stages, cin = [], 3
        for i, c in enumerate(channels):
            stages.append(_ConvStage(cin, c, 1 if i == 0 else 2))
            cin = c
        self.trunk = nn.Sequential(*stages)
        feat = 2 * cin
        self.content_head = nn.Sequential(nn.Linear(feat, feat), nn.GELU(), nn.Linear(feat, self.embed_dim))
        self.degradation_head = nn.Sequential(nn.Linear(feat, feat), nn.GELU(), nn.Linear(feat, self.embed_dim))
        self.fine_head = nn.Linear(self.embed_dim, self.num_fine * self.embed_dim)
        self.text = TextTransformer(context_length=int(context_length), width=int(text_width), heads=int(text_heads),
                                    layers=int(text_layers), output_dim=self.embed_dim)
        self.context_length = int(context_length)
        self._tok = None

    def preprocess(self, img: torch.Tensor) -> torch.Tensor:
        if self.input_size and tuple(img.shape[-2:]) != (self.input_size, self.input_size):
            img = F.interpolate(img, size=(self.input_size, self.input_size), mode='bilinear', align_corners=False)
        return img * 2.0 - 1.0

    def encode_image(self, img: torch.Tensor) -> Dict[str, torch.Tensor]:
        f = self.trunk(self.preprocess(img)).flatten(2)  # [B, C, h*w]
        feat = torch.cat([f.mean(-1), f.std(-1, unbiased=False)], -1)
        content = self.content_head(feat)
        deg = self.degradation_head(feat)
        fine = self.fine_head(deg).view(deg.shape[0], self.num_fine, self.embed_dim)
        return {'content': F.normalize(content, dim=-1), 'degradation': F.normalize(deg, dim=-1),
                'fine': F.normalize(fine, dim=-1)}

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        _check_text(self)
        return F.normalize(self.text(tokens), dim=-1)

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        return dict(self.state_dict())
