"""SRCLIP training model (for the loop in dalpsr/train.py), its export format and the retrieval metric.

* ``SRCLIPModel`` (registered): trains :class:`~dalpsr.archs.srclip_arch.SRCLIP` (paper) or
  :class:`~dalpsr.archs.srclip_arch.SRCLIPLite` (CPU) with DePLSR's objective
  ``w_c S(f_c, caption) + w_d S(f_d, degradation caption) + w_f mean_k S(f_fd_k, caption_k)``
  (S: :class:`~dalpsr.losses.siglip_loss.SigLIPLoss`, one learnable temperature and bias shared
  by the terms; weights 0.2 / 0.3 / 0.5). The content term is skipped for a batch without
  content captions (the CPU recipe has none). ``validate`` reports the zero-shot retrieval
  accuracy per degradation type (:func:`retrieval_accuracy`).
* :func:`save_srclip` / :func:`load_srclip`: ``srclip.json`` (arch, config) + ``srclip.safetensors``
  (trained tensors; the paper model stores its control tower, projections and fine head only,
  the frozen CLIP is rebuilt from ``model_name``/``pretrained``).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from dalpsr.models.base_model import BaseModel
from dalpsr.utils.registry import MODEL_REGISTRY

__all__ = ['SRCLIPModel', 'save_srclip', 'load_srclip', 'retrieval_accuracy', 'fine_by_item']

CONFIG_NAME = 'srclip.json'
WEIGHTS_NAME = 'srclip.safetensors'
FORMAT = 'dalpsr-srclip-1'


def build_srclip(network: Dict[str, Any]):
    from dalpsr.archs import build_network
    cfg = dict(network or {'type': 'SRCLIPLite'})
    if cfg.get('type') not in ('SRCLIP', 'SRCLIPLite'):
        from dalpsr.utils.options import OptionError
        raise OptionError(f"model.network.type must be SRCLIP or SRCLIPLite, got {cfg.get('type')!r}")
    return build_network(cfg, where='model.network')


def save_srclip(net, out_dir: str, extra: Optional[Dict[str, Any]] = None) -> None:
    from safetensors.torch import save_file
    from dalpsr.utils.misc import atomic_path, atomic_write_json
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.trainable_state_dict().items()}
    with atomic_path(os.path.join(out_dir, WEIGHTS_NAME)) as tmp:
        save_file(state, str(tmp))
    meta = {'format': FORMAT, 'type': type(net).__name__, 'config': net.config}
    meta.update(extra or {})
    atomic_write_json(os.path.join(out_dir, CONFIG_NAME), meta)


def _text_keys(net_type: str):
    """State-dict prefixes of the text side (not needed to encode images)."""
    return ('text.',) if net_type == 'SRCLIPLite' else ('clip.transformer.', 'clip.token_embedding.',
                                                       'clip.positional_embedding', 'clip.ln_final.',
                                                       'clip.text_projection')


def copy_image_encoder(src_dir: str, dst_dir: str) -> None:
    """Copy an SRCLIP export without its text-tower tensors (``image_only: true`` in its config):
    what RealDAT inference needs, a fraction of the size (the CPU text tower is mostly its
    49,408-token embedding)."""
    from safetensors.torch import load_file, save_file
    from dalpsr.utils.misc import atomic_path, atomic_write_json
    with open(os.path.join(src_dir, CONFIG_NAME), encoding='utf-8') as f:
        meta = json.load(f)
    drop = _text_keys(meta.get('type', ''))
    state = {k: v for k, v in load_file(os.path.join(src_dir, WEIGHTS_NAME)).items() if not k.startswith(drop)}
    os.makedirs(dst_dir, exist_ok=True)
    with atomic_path(os.path.join(dst_dir, WEIGHTS_NAME)) as tmp:
        save_file(state, str(tmp))
    atomic_write_json(os.path.join(dst_dir, CONFIG_NAME), dict(meta, image_only=True))


def load_srclip(path: str, map_location='cpu'):
    """``(encoder in eval mode, meta)`` from an export folder (or its srclip.json / .safetensors)."""
    from safetensors.torch import load_file
    from dalpsr.archs import build_network
    folder = os.path.dirname(path) or '.' if str(path).endswith(('.json', '.safetensors')) else str(path)
    cfg_path, w_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, WEIGHTS_NAME)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f'SRCLIP checkpoint incomplete: {p} not found (an SRCLIP export folder holds '
                                    f'{CONFIG_NAME} and {WEIGHTS_NAME}; train one with '
                                    'options/train/train_srclip_cpu.yml)')
    with open(cfg_path, encoding='utf-8') as f:
        meta = json.load(f)
    if meta.get('format') != FORMAT:
        raise ValueError(f"{cfg_path}: not an SRCLIP config (format {meta.get('format')!r})")
    net = build_network(dict(meta['config'], type=meta['type']), where=cfg_path)
    state = load_file(w_path, device='cpu')
    missing, unexpected = net.load_state_dict(state, strict=False)
    if meta['type'] == 'SRCLIP' and meta['config'].get('pretrained'):
        missing = [k for k in missing if not k.startswith('clip.')]
    if meta.get('image_only'):  # a copy for inference: text tensors left out on purpose
        missing = [k for k in missing if not k.startswith(_text_keys(meta['type']))]
        net.image_only = True
    if missing or unexpected:
        raise ValueError(f'{w_path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})')
    for p in net.parameters():
        p.requires_grad_(False)
    return net.to(map_location).eval(), meta


def fine_by_item(fine: Any) -> List[List[str]]:
    """The fine captions of a collated batch (default collate gives 5 lists of B) -> B lists of 5."""
    if fine and isinstance(fine[0], (list, tuple)) and fine and isinstance(fine[0][0], str):
        cols = [list(c) for c in fine]
        return [list(r) for r in zip(*cols)]
    raise ValueError('batch["fine"]: expected the collated lists of fine captions')


@torch.no_grad()
def retrieval_accuracy(enc, fine: torch.Tensor, values: torch.Tensor, template: str = '{}',
                       types: Sequence[str] = None) -> Dict[str, float]:
    """Zero-shot retrieval per type: the class caption (``template`` around the caption of each
    evaluation class) closest to the image's fine embedding of that type; correct when the
    class value is within the type's tolerance of the true value. Also the chance level: the
    expected accuracy of a uniformly random class for these samples.

    fine [N, 5, E] (normalised), values [N, 5] (order of ``TYPES``) -> {'acc/<t>', 'chance/<t>',
    'acc/mean', 'chance/mean'}."""
    from dalpsr.data.deplsr_degradation import EVAL_CLASSES, TYPES, class_captions
    types = list(types or TYPES)
    dev = fine.device
    out: Dict[str, float] = {}
    for t in types:
        k = TYPES.index(t)
        classes, tol = EVAL_CLASSES[t]
        txt = enc.encode_text(enc.tokenize(class_captions(t, template)).to(dev)).float()  # [C, E]
        pred = (fine[:, k].float() @ txt.t()).argmax(-1)  # [N]
        cls = torch.tensor(classes, device=dev, dtype=torch.float32)
        ok = (cls[None, :] - values[:, k:k + 1].float().to(dev)).abs() <= tol + 1e-6  # [N, C]
        out[f'acc/{t}'] = float(ok[torch.arange(len(pred), device=dev), pred].float().mean())
        out[f'chance/{t}'] = float(ok.float().mean())
    out['acc/mean'] = float(np.mean([out[f'acc/{t}'] for t in types]))
    out['chance/mean'] = float(np.mean([out[f'chance/{t}'] for t in types]))
    return out


@MODEL_REGISTRY.register()
class SRCLIPModel(BaseModel):
    """Options block ``model`` (documented in options/reference/deplsr.yml)::

        model:
          type: SRCLIPModel
          network: {type: SRCLIPLite, embed_dim: 128, ...}   # or {type: SRCLIP, model_name, pretrained}
          loss: {type: SigLIPLoss, init_logit_scale: 2.302585, init_logit_bias: -10.0, same_text_positive: false}
          weights: {content: 0.2, degradation: 0.3, fine: 0.5}
          eval_template: '{}'      # class captions at validation ('A photo with {}' in the paper)
          pretrained: null         # an SRCLIP export folder to start from

    Batch keys: ``lq`` [B, 3, h, w] in [0, 1], ``caption`` (B str, may be ''), ``degradation`` (B str),
    ``fine`` (collated 5 x B str), ``values`` [B, 5].
    """

    KEYS = {'type', 'network', 'loss', 'weights', 'eval_template', 'pretrained'}

    def __init__(self, opt: Dict[str, Any], accelerator=None):
        super().__init__(opt, accelerator)
        from dalpsr.losses import build_loss
        from dalpsr.utils.options import OptionError, check_keys, get_opt
        mopt = get_opt(opt, 'model')
        src = opt.get('_source', 'the options')
        check_keys(mopt, self.KEYS, f'model block of {src}')
        self.net = build_srclip(mopt.get('network'))
        if mopt.get('pretrained'):
            src_net, _ = load_srclip(mopt['pretrained'])
            self.net.load_state_dict(src_net.state_dict(), strict=False)
            for n, p in self.net.named_parameters():
                p.requires_grad_(not n.startswith('clip.'))
        lcfg = dict(mopt.get('loss') or {'type': 'SigLIPLoss'})
        self.loss_fn = build_loss(lcfg, where=f'model.loss in {src}')
        w = dict({'content': 0.2, 'degradation': 0.3, 'fine': 0.5}, **(mopt.get('weights') or {}))
        check_keys(w, {'content', 'degradation', 'fine'}, f'model.weights in {src}')
        if any(float(v) < 0 for v in w.values()):
            raise OptionError(f'model.weights in {src} must be >= 0, got {w}')
        self.weights = {k: float(v) for k, v in w.items()}
        self.eval_template = str(mopt.get('eval_template', '{}'))
        if '{}' not in self.eval_template:
            raise OptionError(f"model.eval_template in {src} must contain '{{}}', got {self.eval_template!r}")
        self.net.to(self.device)
        self.loss_fn.to(self.device)

    def trainable_modules(self):
        return {'net': self.net, 'loss_fn': self.loss_fn}

    def training_step(self, batch: Dict[str, Any], step: int) -> Dict[str, Any]:
        net = self.unwrap(self.net)
        lq = batch['lq'].to(self.device)
        fine = fine_by_item(batch['fine'])
        B, K = len(fine), len(fine[0])
        captions = list(batch.get('caption') or [])
        use_content = self.weights['content'] > 0 and bool(captions) and all(captions)
        degs = list(batch['degradation'])
        flat = [fine[i][k] for k in range(K) for i in range(B)]  # type-major
        texts = (captions if use_content else []) + degs + flat
        uniq = sorted(set(texts))  # repeated captions (e.g. the two ringing ones) are encoded once
        where = {t: i for i, t in enumerate(uniq)}
        emb, utxt = self.net(lq, net.tokenize(uniq).to(self.device))  # one call: what DDP wraps
        txt = utxt[torch.tensor([where[t] for t in texts], device=utxt.device)]
        out: Dict[str, Any] = {}
        total = 0.0
        if use_content:
            lc = self.loss_fn(emb['content'], txt[:B], captions)
            total = total + self.weights['content'] * lc
            out['loss_content'] = float(lc.detach())
            txt = txt[B:]
        ld = self.loss_fn(emb['degradation'], txt[:B], degs)
        tf = txt[B:].view(K, B, -1)
        lf = sum(self.loss_fn(emb['fine'][:, k], tf[k], flat[k * B:(k + 1) * B]) for k in range(K)) / K
        total = total + self.weights['degradation'] * ld + self.weights['fine'] * lf
        out.update(loss=total, loss_degradation=float(ld.detach()), loss_fine=float(lf.detach()),
                   logit_scale=float(self.unwrap(self.loss_fn).logit_scale.detach().exp()))
        return out

    @torch.no_grad()
    def validate(self, loader, step: int, writer=None) -> Dict[str, float]:
        net = self.unwrap(self.net)
        fines, values = [], []
        for batch in loader:
            fines.append(net.encode_image(batch['lq'].to(self.device))['fine'])
            values.append(batch['values'].to(self.device))
        fine, vals = torch.cat(fines), torch.cat(values)
        if self.accelerator is not None and getattr(self.accelerator, 'num_processes', 1) > 1:
            fine = self.accelerator.gather_for_metrics(fine)
            vals = self.accelerator.gather_for_metrics(vals)
        return retrieval_accuracy(net, fine, vals, self.eval_template)

    def export(self, out_dir: str) -> None:
        loss = self.unwrap(self.loss_fn)
        save_srclip(self.unwrap(self.net), out_dir, extra={
            'trained_with': self.opt.get('_source'), 'name': self.opt.get('name'),
            'logit_scale': float(loss.logit_scale.detach()), 'logit_bias': float(loss.logit_bias.detach())})
