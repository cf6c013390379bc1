"""Encoder alignment for the captioner (DaLPSR paper III-C): fine-tune LLaVA's vision tower E so
that its features of an LR image approach those of the HR image,
``L_E = || E(I_LR) - E(I_HR) ||^2``.

The HR target comes from a frozen copy of the original tower (``E_0(I_HR)``, no gradient): with
both sides trainable the loss is minimised by features that ignore the image (collapse). The
student starts from the same weights, so the first step's loss is exactly the LR/HR gap of the
original encoder. Features are the ones LLaVA feeds its projector: the hidden states of
``vision_feature_layer`` (LLaVA-1.5: -2, the penultimate layer) without the CLS token
(``vision_feature_select_strategy: default``).

Inputs come from the triplet datasets (``gt`` [B,3,H,W] and ``lq`` [B,3,H/4,W/4] in [0,1]); both
are resized (bicubic) to the tower's input size (336 for LLaVA-1.5: the LR is upsampled x2.6, the
HR 512 crop downsampled) and normalised with the CLIP statistics of the LLaVA processor.
``export`` writes ``<dir>/vision_tower/`` (``CLIPVisionModel.save_pretrained``) that
``scripts/caption.py --vision-tower <dir>/vision_tower`` loads into LLaVA.
"""
from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from dalpsr.models.base_model import BaseModel
from dalpsr.utils.options import OptionError, check_keys
from dalpsr.utils.registry import MODEL_REGISTRY

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PREFIXES = ('model.vision_tower.', 'vision_tower.')


def _tower_key(key: str, want) -> str:
    """Hub LLaVA-1.5 files name tower tensors ``vision_model.encoder...``; transformers 5's
    CLIPVisionModel names them ``encoder...``: map to whichever the model has."""
    if key in want:
        return key
    if key.startswith('vision_model.') and key[len('vision_model.'):] in want:
        return key[len('vision_model.'):]
    if 'vision_model.' + key in want:
        return 'vision_model.' + key
    return key


def _safetensor_files(folder: Path) -> List[Path]:
    idx = folder / 'model.safetensors.index.json'
    if idx.is_file():  # only the shards that hold vision tower tensors
        wm = json.loads(idx.read_text())['weight_map']
        return [folder / f for f in sorted({f for k, f in wm.items() if k.startswith(_PREFIXES)})]
    return sorted(folder.glob('*.safetensors'))


def _fetch_tower_files(repo: str, revision: Optional[str]) -> Path:
    """Config, preprocessor config and only the safetensors shards that hold the vision tower
    (from the HF cache; downloaded when online)."""
    from huggingface_hub import hf_hub_download
    try:
        cfg = Path(hf_hub_download(repo, 'config.json', revision=revision))
        for extra in ('preprocessor_config.json',):
            try:
                hf_hub_download(repo, extra, revision=revision)
            except Exception:  # noqa: BLE001 - optional
                pass
        try:
            idx = Path(hf_hub_download(repo, 'model.safetensors.index.json', revision=revision))
            wm = json.loads(idx.read_text())['weight_map']
            shards = sorted({f for k, f in wm.items() if k.startswith(_PREFIXES)})
        except Exception:  # noqa: BLE001 - single-file checkpoint
            shards = ['model.safetensors']
        for f in shards:
            hf_hub_download(repo, f, revision=revision)
    except Exception as err:  # noqa: BLE001 - offline / not cached
        raise FileNotFoundError(
            f'LLaVA weights not available for {repo!r} ({type(err).__name__}); download them '
            f'(huggingface-cli download {repo} --local-dir pretrained_models/llava-1.5-7b-hf) and set '
            'model.llava to that folder') from None
    return cfg.parent


def load_llava_vision_tower(llava: str, revision: Optional[str] = None):
    """``(CLIPVisionModel, info)`` holding the vision tower of a LLaVA checkpoint, read without
    loading the language model: ``LlavaConfig`` gives the tower config, the safetensors shards
    holding ``vision_tower.*`` (hub layout) or ``model.vision_tower.*`` (transformers >= 5) give
    the weights. ``llava``: local folder or hub id (resolved through the HF cache).
    ``info``: ``{'vision_feature_layer', 'vision_feature_select_strategy', 'image_mean', 'image_std'}``.
    """
    from safetensors import safe_open
    from transformers import CLIPVisionModel, LlavaConfig
    folder = Path(llava)
    if not folder.is_dir():
        if llava.startswith(('.', '/', '~')) or llava.count('/') != 1:
            raise FileNotFoundError(f'LLaVA folder not found: {llava} (put it under pretrained_models/, see '
                                    'docs/captioning.md)')
        folder = _fetch_tower_files(llava, revision)
    if not (folder / 'config.json').is_file():
        raise FileNotFoundError(f'{folder}/config.json not found (not a LLaVA folder in transformers format)')
    cfg = LlavaConfig.from_pretrained(folder)
    tower = CLIPVisionModel(cfg.vision_config)
    want = set(tower.state_dict())
    sd: Dict[str, torch.Tensor] = {}
    for f in _safetensor_files(folder):
        with safe_open(str(f), framework='pt') as fh:
            for k in fh.keys():
                for pre in _PREFIXES:
                    if k.startswith(pre):
                        sd[_tower_key(k[len(pre):], want)] = fh.get_tensor(k)
                        break
    if not sd:
        raise FileNotFoundError(f'no vision_tower.* weights in the safetensors files of {folder}')
    missing = sorted(want - set(sd))
    if missing:
        raise RuntimeError(f'{folder}: vision tower weights incomplete, missing {missing[:3]}')
    tower.load_state_dict({k: v for k, v in sd.items() if k in want}, strict=True)
    mean, std = CLIP_MEAN, CLIP_STD
    pp = folder / 'preprocessor_config.json'
    if pp.is_file():
        ppc = json.loads(pp.read_text())
        mean, std = tuple(ppc.get('image_mean', mean)), tuple(ppc.get('image_std', std))
    info = {'vision_feature_layer': cfg.vision_feature_layer,
            'vision_feature_select_strategy': cfg.vision_feature_select_strategy,
            'image_mean': list(mean), 'image_std': list(std), 'source': str(llava)}
    return tower, info


def tower_features(tower, images: torch.Tensor, layer: int, select: str, mean, std) -> torch.Tensor:
    """[B,3,H,W] in [0,1] -> [B, N, D] features LLaVA uses (N = patches, or patches + CLS for 'full')."""
    size = tower.config.image_size
    x = F.interpolate(images.float(), size=(size, size), mode='bicubic', align_corners=False,
                      antialias=True).clamp(0, 1)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    x = ((x - m) / s).to(next(tower.parameters()).dtype)
    out = tower(pixel_values=x, output_hidden_states=True)
    h = out.hidden_states[layer]
    return h[:, 1:] if select == 'default' else h


@MODEL_REGISTRY.register()
class CaptionAlignModel(BaseModel):
    """Options (``opt['model']``, documented in options/reference/captioning.yml)::

        type: CaptionAlignModel
        llava: llava-hf/llava-1.5-7b-hf   # LLaVA folder / hub id whose vision tower is tuned
        feature_layer: null               # hidden-state index (null: the LLaVA config's, -2)
        feature_select: null              # default (drop CLS) | full (null: the LLaVA config's)
        trainable: ['*']                  # glob patterns of tower parameter names to train
        gradient_checkpointing: false
        loss_weight: 1.0
    """

    KEYS = {'type', 'llava', 'revision', 'feature_layer', 'feature_select', 'trainable', 'gradient_checkpointing',
            'loss_weight'}

    def __init__(self, opt: Dict[str, Any], accelerator=None):
        super().__init__(opt, accelerator)
        mopt = opt['model']
        where = f"model block of {opt.get('_source', 'the options')}"
        check_keys(mopt, self.KEYS, where)
        if not mopt.get('llava'):
            raise OptionError(f"{where}: 'llava' (LLaVA folder or hub id) is required")
        import copy
        self.student, self.info = load_llava_vision_tower(mopt['llava'], mopt.get('revision'))
        self.teacher = copy.deepcopy(self.student).requires_grad_(False).eval().to(self.device)
        self.layer = int(mopt['feature_layer']) if mopt.get('feature_layer') is not None \
            else int(self.info['vision_feature_layer'])
        self.select = mopt.get('feature_select') or self.info['vision_feature_select_strategy']
        if self.select not in ('default', 'full'):
            raise OptionError(f"{where}: feature_select must be 'default' or 'full', got {self.select!r}")
        patterns = mopt.get('trainable', ['*'])
        if isinstance(patterns, str):
            patterns = [patterns]
        n_train = 0
        for name, p in self.student.named_parameters():
            p.requires_grad_(any(fnmatch.fnmatchcase(name, pat) for pat in patterns))
            n_train += p.requires_grad
        if not n_train:
            raise OptionError(f"{where}: trainable patterns {patterns} match no vision tower parameter")
        if mopt.get('gradient_checkpointing'):
            self.student.gradient_checkpointing_enable()
        self.student.train().to(self.device)
        self.loss_weight = float(mopt.get('loss_weight', 1.0))

    def trainable_modules(self):
        return {'student': self.student}

    def _feats(self, tower, images):
        return tower_features(tower, images.to(self.device), self.layer, self.select, self.info['image_mean'],
                              self.info['image_std'])

    def training_step(self, batch, step):
        with torch.no_grad():
            target = self._feats(self.teacher, batch['gt']).float()
        pred = self._feats(self.student, batch['lq']).float()
        loss = F.mse_loss(pred, target)
        return {'loss': self.loss_weight * loss, 'mse': float(loss.detach())}

    @torch.no_grad()
    def validate(self, loader, step, writer=None):
        """mse: tuned E(LR) vs E_0(HR); mse_untuned: E_0(LR) vs E_0(HR); cos: mean cosine similarity."""
        student = self.unwrap(self.student)
        was_training = student.training
        student.eval()
        tot = {'mse': 0.0, 'mse_untuned': 0.0, 'cos': 0.0}
        n = 0
        for batch in loader:
            hr = self._feats(self.teacher, batch['gt']).float()
            lr = self._feats(student, batch['lq']).float()
            lr0 = self._feats(self.teacher, batch['lq']).float()
            b = hr.shape[0]
            tot['mse'] += float(F.mse_loss(lr, hr)) * b
            tot['mse_untuned'] += float(F.mse_loss(lr0, hr)) * b
            tot['cos'] += float(F.cosine_similarity(lr, hr, dim=-1).mean()) * b
            n += b
        student.train(was_training)
        return {k: v / max(n, 1) for k, v in tot.items()}

    def export(self, out_dir: str) -> None:
        """``<out_dir>/vision_tower/`` (CLIPVisionModel) + ``caption_align.json`` (source, feature choice)."""
        tower = self.unwrap(self.student)
        tower.save_pretrained(os.path.join(out_dir, 'vision_tower'))
        from dalpsr.utils.misc import atomic_write_json
        atomic_write_json(Path(out_dir) / 'caption_align.json',
                          {'llava': self.info['source'], 'feature_layer': self.layer, 'feature_select': self.select,
                           'image_mean': self.info['image_mean'], 'image_std': self.info['image_std'],
                           'use': 'scripts/caption.py --vision-tower <this folder>/vision_tower'})
