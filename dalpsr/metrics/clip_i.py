"""CLIP-I: cosine similarity of the CLIP image embeddings of an SR image and its GT.

``CLIP-I(sr, gt) = <e(sr), e(gt)> / (|e(sr)| |e(gt)|)`` with ``e`` the image tower of an
open_clip model, each image preprocessed by that model's own evaluation transform (resize of
the short side + centre crop + normalisation, on the 8-bit image, exactly as when the files
are read with PIL). 1.0 for identical images, higher is better.

Weights (never downloaded, see docs/metrics.md):

* ``pretrained`` is a local checkpoint path (``.pt``/``.pth``/``.bin``/``.safetensors``), or
* an open_clip tag (``openai``, ``laion2b_s34b_b79k``, ...), resolved offline to
  ``<weights>/open_clip/<url basename>`` (e.g. ``ViT-B-32.pt``) or to the file of the tag's
  Hugging Face repo already in the HF cache.

``model`` is an open_clip model name (``ViT-B-32``), ``local-dir:/path`` or a custom name
whose JSON config is given as ``model_config`` (file ``<name>.json`` or a folder of them).
``quick_gelu``: null = what the tag was trained with (False for a path).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from dalpsr.metrics.weights import MissingWeightsError, WeightFile, _basename


def _hf_cached(repo_and_file: str) -> Optional[str]:
    """Path of an open_clip HF checkpoint already in the HF cache (safetensors preferred)."""
    from huggingface_hub import try_to_load_from_cache
    repo, filename = os.path.split(repo_and_file)
    names = [filename] if filename else ['open_clip_model.safetensors', 'open_clip_pytorch_model.bin']
    for name in names:
        if name.endswith('.bin'):
            names.append(name[:-4] + '.safetensors')
    for name in names:
        try:
            hit = try_to_load_from_cache(repo_id=repo, filename=name)
        except Exception:  # noqa: BLE001 - a malformed repo id just means "not cached"
            hit = None
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def resolve_clip_checkpoint(model: str, pretrained: Optional[str], hub: Path) -> Dict[str, Any]:
    """Find the checkpoint for ``(model, pretrained)`` offline.

    Returns ``{'path': str|None, 'tag_cfg': dict}``; raises :class:`MissingWeightsError` (one
    line) when a tag's file is nowhere on disk or a given path does not exist.
    """
    if pretrained in (None, '', 'none', 'random'):
        return {'path': None, 'tag_cfg': {}}
    if model.startswith(('local-dir:', 'hf-hub:')):
        return {'path': None, 'tag_cfg': {}}
    looks_like_path = os.sep in str(pretrained) or str(pretrained).endswith(
        ('.pt', '.pth', '.bin', '.safetensors', '.npz'))
    if looks_like_path:
        if not os.path.isfile(pretrained):
            raise MissingWeightsError(f"clip_i: checkpoint file not found: {pretrained} "
                                      "(clip_i.pretrained must be an existing file or an open_clip tag)")
        return {'path': str(pretrained), 'tag_cfg': {}}
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model
    cfg = get_pretrained_cfg(model, pretrained)
    if not cfg:
        tags = list_pretrained_tags_by_model(model)
        raise MissingWeightsError(f"clip_i: '{pretrained}' is neither a file nor an open_clip tag of "
                                  f"{model} (tags: {', '.join(tags) or 'none'})")
    places: List[str] = []
    url = cfg.get('url', '')
    if url:
        local = WeightFile(str(hub / 'open_clip' / _basename(url)), url)
        if local.exists():
            return {'path': local.path, 'tag_cfg': cfg}
        places.append(f"{local.path} (get {local.basename} from {url})")
    if cfg.get('hf_hub'):
        hit = _hf_cached(cfg['hf_hub'])
        if hit:
            return {'path': hit, 'tag_cfg': cfg}
        places.append(f"the HF cache entry of {cfg['hf_hub'].rstrip('/')} (open_clip_model.safetensors)")
    raise MissingWeightsError(f"clip_i: weights of {model}/{pretrained} missing: put them at "
                              f"{' or '.join(places)}, or set clip_i.pretrained to a local checkpoint "
                              "(see docs/metrics.md)")


def is_torchscript(path: Optional[str]) -> bool:
    """True for a TorchScript archive (OpenAI's original CLIP ``.pt`` files are)."""
    import zipfile
    if not path or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith('/constants.pkl') or '/code/' in n for n in z.namelist())


class CLIPImageSimilarity(torch.nn.Module):
    """Image-image CLIP cosine similarity. ``forward(sr, gt)``: (B, 3, H, W) in [0, 1] each
    (sizes may differ between sr and gt) -> (B,) similarities in [-1, 1]."""

    def __init__(self, model: str = 'ViT-B-32', pretrained: Optional[str] = 'openai',
                 model_config: Optional[str] = None, quick_gelu: Optional[bool] = None,
                 hub: Optional[Path] = None, device: str = 'cpu'):
        super().__init__()
        import open_clip
        from dalpsr.metrics.weights import resolve_weights_dir
        hub = hub or resolve_weights_dir()
        if model_config:
            if not os.path.exists(model_config):
                raise FileNotFoundError(f"clip_i.model_config not found: {model_config}")
            open_clip.add_model_config(model_config)
        found = resolve_clip_checkpoint(model, pretrained, hub)
        tag_cfg = found['tag_cfg']
        if quick_gelu is None:
            quick_gelu = bool(tag_cfg.get('quick_gelu', False))
        kwargs: Dict[str, Any] = {'force_quick_gelu': bool(quick_gelu)}
        if is_torchscript(found['path']):
            # torch.load refuses TorchScript with weights_only=True; it then goes through
            # torch.jit.load (TorchScript, not arbitrary pickled objects)
            kwargs['weights_only'] = False
        for src, dst in (('mean', 'image_mean'), ('std', 'image_std'),
                         ('interpolation', 'image_interpolation'), ('resize_mode', 'image_resize_mode')):
            if tag_cfg.get(src) is not None:
                kwargs[dst] = tag_cfg[src]
        import huggingface_hub.constants as hf_constants
        saved = hf_constants.HF_HUB_OFFLINE
        hf_constants.HF_HUB_OFFLINE = True  # 'hf-hub:' names resolve from the cache only
        try:
            net, _, preprocess = open_clip.create_model_and_transforms(
                model, pretrained=found['path'], device='cpu', **kwargs)
        finally:
            hf_constants.HF_HUB_OFFLINE = saved
        self.net = net.eval().to(device)
        self.preprocess = preprocess
        self.device = torch.device(device)
        self.info = {'model': model, 'pretrained': pretrained, 'checkpoint': found['path'],
                     'quick_gelu': bool(quick_gelu), 'model_config': model_config,
                     'open_clip_version': getattr(open_clip, '__version__', 'unknown'),
                     'preprocess': str(preprocess).replace('\n', ' ')}

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        from PIL import Image
        imgs = []
        for t in x:
            arr = (t.detach().float().clamp(0, 1).cpu().numpy().transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8)
            imgs.append(self.preprocess(Image.fromarray(arr)))
        batch = torch.stack(imgs).to(self.device)
        with torch.no_grad():
            emb = self.net.encode_image(batch).float()
        return torch.nn.functional.normalize(emb, dim=-1)

    def forward(self, sr: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        return (self._embed(sr) * self._embed(gt)).sum(dim=-1)
