"""Image taggers: RAM (default) and open_clip zero-shot scoring over a tag vocabulary.

Both take a batch of RGB images in [0, 1] (``[B,3,H,W]`` tensor or a list of HxWx3 numpy arrays
of any sizes) and return one list of tag strings per image, most confident first.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

Images = Union[torch.Tensor, Sequence[np.ndarray]]
BUILTIN_VOCAB = Path(__file__).with_name('vocab.txt')


def resolve_dtype(dtype: str, device) -> torch.dtype:
    """'auto' -> bf16 on a GPU that supports it, else fp16 on GPU, fp32 on CPU; or 'fp32'|'fp16'|'bf16'."""
    table = {'fp32': torch.float32, 'float32': torch.float32, 'fp16': torch.float16, 'float16': torch.float16,
             'bf16': torch.bfloat16, 'bfloat16': torch.bfloat16}
    if dtype == 'auto':
        if torch.device(device).type == 'cuda':
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in table:
        raise ValueError(f"dtype must be auto|fp32|fp16|bf16, got {dtype!r}")
    return table[dtype]


def to_batch(images: Images, size: int, mode: str = 'bicubic') -> torch.Tensor:
    """Images in [0,1] -> float tensor ``[B,3,size,size]`` (``mode`` interpolation, antialiased)."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f'expected [B,3,H,W] images, got {tuple(images.shape)}')
        return F.interpolate(images.float(), size=(size, size), mode=mode, antialias=True,
                             align_corners=False).clamp(0, 1)
    out = []
    for img in images:
        t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)[None]
        out.append(to_batch(t, size, mode))
    return torch.cat(out)


class RAMTaggerBackend:
    """RAM (``ram_swin_large_14m.pth``) with per-tag thresholds read next to the checkpoint.

    Args:
        path: folder with the checkpoint, ``ram_tag_list.txt`` and ``ram_tag_list_threshold.txt``
            (default ``pretrained_models/ram``) or the .pth file.
        threshold_scale: multiply every per-tag threshold (1.0 = official behaviour).
        max_tags: keep at most this many tags (highest probability first; 0 = all).
        exclude: tags never reported.
    """

    name = 'ram'

    def __init__(self, path: str = 'pretrained_models/ram', device='cpu', dtype: str = 'auto',
                 threshold_scale: float = 1.0, max_tags: int = 0, exclude: Sequence[str] = ()):
        from dalpsr.archs.ram_arch import load_ram_tagger
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model, self.tags, thr = load_ram_tagger(path, device=self.device, dtype=self.dtype)
        self.thresholds = (thr * threshold_scale).to(self.device)
        self.max_tags = int(max_tags)
        self.excluded = torch.tensor([t in set(exclude) for t in self.tags], device=self.device)
        self.model_id = f'ram:{path}'

    @torch.no_grad()
    def probabilities(self, images: Images) -> torch.Tensor:
        """[B, num_tags] sigmoid probabilities in [0,1] (input prepared like RAM's own transform)."""
        from dalpsr.archs.ram_arch import ram_preprocess
        x = ram_preprocess(to_batch(images, self.model.image_size, 'bilinear').to(self.device), self.model.image_size)
        return torch.sigmoid(self.model(x.to(self.dtype)).float())

    def __call__(self, images: Images) -> List[List[str]]:
        probs = self.probabilities(images)
        keep = (probs > self.thresholds) & ~self.excluded
        out = []
        for p, k in zip(probs, keep):
            idx = torch.nonzero(k).flatten()
            idx = idx[torch.argsort(p[idx], descending=True)]
            if self.max_tags > 0:
                idx = idx[:self.max_tags]
            out.append([self.tags[i] for i in idx.tolist()])
        return out


def read_vocabulary(vocabulary: Union[str, Sequence[str], None]) -> List[str]:
    """A tag vocabulary: a list, a text file (one tag a line), or None for the built-in list."""
    if vocabulary is None:
        vocabulary = str(BUILTIN_VOCAB)
    if isinstance(vocabulary, str):
        p = Path(vocabulary)
        if not p.is_file():
            raise FileNotFoundError(f'tag vocabulary file not found: {p}')
        vocabulary = [ln.strip() for ln in p.read_text(encoding='utf-8').splitlines()]
    tags = list(dict.fromkeys(t for t in vocabulary if t))
    if not tags:
        raise ValueError('empty tag vocabulary')
    return tags


class CLIPTagger:
    """Zero-shot tagging with an open_clip model: cosine similarity of the image to
    ``template.format(tag)`` for every tag, softmax over the vocabulary (temperature: the
    model's logit scale), then tags with probability >= ``min_prob`` (at most ``top_k``,
    at least one).

    Args:
        model: open_clip architecture name (e.g. ``ViT-B-32``, ``ViT-L-14``).
        pretrained: a local checkpoint file, an open_clip pretrained tag (needs the weights in
            the open_clip/HF cache), or ``none`` for random weights (tests only).
        model_config: optional JSON file with an open_clip model config (registered under its stem).
        vocabulary: list, file (one tag a line) or None (``dalpsr/captioning/vocab.txt``).
    """

    name = 'clip'

    def __init__(self, model: str = 'ViT-B-32', pretrained: Optional[str] = None, vocabulary=None,
                 template: str = 'a photo of a {}.', top_k: int = 8, min_prob: float = 0.05, device='cpu',
                 dtype: str = 'auto', model_config: Optional[str] = None, batch_text: int = 256):
        import open_clip
        if model_config:
            cfg = Path(model_config)
            if not cfg.is_file():
                raise FileNotFoundError(f'open_clip model config not found: {cfg}')
            open_clip.add_model_config(cfg)
            model = cfg.stem
        if pretrained in (None, '', 'none', 'None'):
            pretrained = None
        elif not Path(pretrained).is_file() and pretrained not in open_clip.list_pretrained_tags_by_model(model):
            raise FileNotFoundError(
                f'open_clip weights not found: {pretrained} (put the checkpoint file under pretrained_models/open_clip/ '
                f'and pass its path, or an open_clip pretrained tag of {model})')
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        try:
            self.model = open_clip.create_model(model, pretrained=pretrained, device=self.device).eval()
        except RuntimeError as err:
            raise RuntimeError(f'open_clip {model} ({pretrained}): {str(err).splitlines()[0]}') from None
        self.model.to(self.dtype)
        self.tokenizer = open_clip.get_tokenizer(model)
        self.tags = read_vocabulary(vocabulary)
        self.template, self.top_k, self.min_prob = template, int(top_k), float(min_prob)
        size = self.model.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.mean = torch.tensor(getattr(self.model.visual, 'image_mean', (0.48145466, 0.4578275, 0.40821073)),
                                 device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(getattr(self.model.visual, 'image_std', (0.26862954, 0.26130258, 0.27577711)),
                                device=self.device).view(1, 3, 1, 1)
        with torch.no_grad():
            feats = []
            for i in range(0, len(self.tags), batch_text):
                toks = self.tokenizer([template.format(t) for t in self.tags[i:i + batch_text]]).to(self.device)
                feats.append(F.normalize(self.model.encode_text(toks).float(), dim=-1))
        self.text_features = torch.cat(feats)  # [T, D]
        self.model_id = f'clip:{model}:{pretrained or "random"}'

    @torch.no_grad()
    def probabilities(self, images: Images) -> torch.Tensor:
        """[B, T] softmax over the vocabulary."""
        x = (to_batch(images, self.image_size).to(self.device) - self.mean) / self.std
        img = F.normalize(self.model.encode_image(x.to(self.dtype)).float(), dim=-1)
        scale = float(self.model.logit_scale.exp()) if hasattr(self.model, 'logit_scale') else 100.0
        return torch.softmax(scale * img @ self.text_features.T, dim=-1)

    def __call__(self, images: Images) -> List[List[str]]:
        probs = self.probabilities(images)
        out = []
        for p in probs:
            order = torch.argsort(p, descending=True)[:max(1, self.top_k)]
            keep = [int(i) for i in order if p[i] >= self.min_prob] or [int(order[0])]
            out.append([self.tags[i] for i in keep])
        return out


def build_tagger(kind: str, **kwargs):
    """``kind``: 'ram' | 'clip'; kwargs go to the backend's constructor."""
    if kind == 'ram':
        return RAMTaggerBackend(**kwargs)
    if kind == 'clip':
        return CLIPTagger(**kwargs)
    raise ValueError(f"tagger must be 'ram' or 'clip', got {kind!r}")
