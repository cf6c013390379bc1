"""RealDAT training model (DePLSR stage 2, for the loop in dalpsr/train.py) and its export format.

``RealDATModel`` (registered) trains :class:`~dalpsr.archs.realdat_arch.RealDAT` with an L1 loss on
HR/LR pairs (:class:`~dalpsr.data.deplsr_datasets.DegradedPairDataset`), conditioned by a frozen
SRCLIP encoder (``model.srclip``: an export folder of ``SRCLIPModel``): xi = content embedding
[B, 1, E], xd = fine embeddings [B, 5, E], computed without gradient from the LR itself
(the paper model resizes it to 224 and CLIP-normalises it inside the encoder).
``conditioning: none`` trains the plain DAT of the same backbone configuration instead (the
baseline row: no fusion blocks, no encoder). ``conditioning: oracle`` is the known-degradation
upper bound: the same RealDAT conditioned on the *true* degradation degrees of each pair
(``DegradedPairDataset`` ``degrees: true``) through :func:`oracle_tokens` instead of an encoder; it
measures what any degradation encoder could add at a given scale, and cannot restore images
without recorded parameters (its export is refused by the restorer). Optimiser and schedule come from ``train:`` (the
paper: Adam lr 2e-4, betas (0.9, 0.99), multistep). ``validate``: PSNR on Y (BasicSR's
definition, ``crop_border``) of the val pairs, and of bicubic for reference.

Export (``realdat.json`` + ``realdat.safetensors``, plus ``srclip/`` — a copy of the encoder
export without its text tower, which inference never uses — when conditioned): a self-contained folder that
:class:`dalpsr.restorers.realdat.RealDATRestorer` and :func:`load_realdat` read.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

from dalpsr.models.base_model import BaseModel
from dalpsr.utils.registry import MODEL_REGISTRY

__all__ = ['RealDATModel', 'save_realdat', 'load_realdat', 'psnr_y', 'condition', 'oracle_tokens', 'super_resolve']

CONFIG_NAME = 'realdat.json'
WEIGHTS_NAME = 'realdat.safetensors'
FORMAT = 'dalpsr-realdat-1'
_FUSION_KEYS = ('cond_dim', 'fusion_layers', 'fusion_num_heads', 'fusion_mlp_ratio', 'fusion_attn_ratio',
                'fusion_residual', 'cond_standardize', 'cond_tokens', 'fusion_query_residual')


def psnr_y(sr: torch.Tensor, gt: torch.Tensor, crop_border: int = 0) -> torch.Tensor:
    """PSNR (dB) on the Y channel (ITU-R BT.601, 16..235, as BasicSR ``test_y_channel``) of images
    [B, 3, H, W] in [0, 1], both rounded to 8 bits first -> [B]."""
    def y(x):
        x = torch.round(x.clamp(0, 1) * 255.0) / 255.0
        return (65.481 * x[:, 0] + 128.553 * x[:, 1] + 24.966 * x[:, 2]) / 255.0 + 16.0 / 255.0
    a, b = y(sr.float()), y(gt.float())
    if crop_border:
        c = int(crop_border)
        a, b = a[:, c:-c, c:-c], b[:, c:-c, c:-c]
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1.0 / mse)


def build_sr_net(network: Dict[str, Any], conditioned: bool):
    from dalpsr.archs.dat_arch import DAT
    from dalpsr.archs.realdat_arch import RealDAT
    from dalpsr.utils.registry import check_call_kwargs
    cfg = dict(network or {})
    cfg.pop('type', None)
    if conditioned:
        check_call_kwargs(RealDAT, cfg, 'model.network (RealDAT)')
        return RealDAT(**cfg)
    cfg = {k: v for k, v in cfg.items() if k not in _FUSION_KEYS}
    check_call_kwargs(DAT, cfg, 'model.network (DAT)')
    return DAT(**cfg)


@torch.no_grad()
def condition(encoder, lq: torch.Tensor):
    """(xi [B, 1, E], xd [B, 5, E]) from a frozen SRCLIP encoder, or (None, None) without one."""
    if encoder is None:
        return None, None
    emb = encoder.encode_image(lq.float())
    return emb['content'].unsqueeze(1), emb['fine']


def oracle_tokens(degrees: torch.Tensor, dim: int):
    """Fixed (not learned) conditioning tokens of true degradation degrees ``[B, T]`` in [0, 1]
    -> (xi [B, 1, dim], xd [B, T, dim]).

    xd token t = (sin, cos)(pi * 2^k * v_t) for k < F, then a one-hot of the type t (so the shared
    adapter can tell the types apart), zero-padded to ``dim``; xi = the (sin, cos) features of all
    T degrees side by side (F' frequencies each), zero-padded. Needs ``dim >= 2 + T``.
    """
    d = degrees.float()
    if d.dim() != 2:
        raise ValueError(f'oracle_tokens: degrees must be [B, T], got {tuple(d.shape)}')
    B, T = d.shape
    if dim < 2 + T:
        raise ValueError(f'oracle_tokens: cond_dim {dim} is too small for {T} degree types (needs >= {2 + T})')

    def fourier(v, n):  # v [..., 1] -> [..., 2n]
        f = math.pi * (2.0 ** torch.arange(n, dtype=torch.float32, device=v.device))
        return torch.cat([torch.sin(v * f), torch.cos(v * f)], -1)

    fd = fourier(d.unsqueeze(-1), (dim - T) // 2)                               # [B, T, 2F]
    onehot = torch.eye(T, device=d.device).expand(B, T, T)
    xd = torch.cat([fd, onehot], -1)
    xi = fourier(d.unsqueeze(-1), max(dim // (2 * T), 1)).reshape(B, 1, -1)   # [B, 1, <= dim]
    pad = lambda x: F.pad(x, (0, dim - x.shape[-1]))  # noqa: E731
    return pad(xi), pad(xd)


def super_resolve(net, lq: torch.Tensor, conditioning: str, encoder=None, degrees: Optional[torch.Tensor] = None):
    """SR of ``lq`` [B, 3, h, w] by ``net`` as it was trained: a plain DAT on the LR
    (``conditioning: none``), RealDAT on the SRCLIP embeddings of the LR (``srclip``, ``encoder``) or
    on the true ``degrees`` [B, T] of each pair (``oracle``; a missing ``degrees`` is a KeyError
    naming the dataset option)."""
    if conditioning == 'oracle':
        if degrees is None:
            raise KeyError("conditioning: oracle needs the true degrees of every pair: give the datasets "
                           "'degrees: true' (DegradedPairDataset)")
        return net(lq, *oracle_tokens(degrees.to(lq.device), int(net.config['cond_dim'])))
    xi, xd = condition(encoder, lq)
    return net(lq, xi, xd) if xi is not None else net(lq)


def save_realdat(net, out_dir: str, srclip_dir: Optional[str] = None, extra: Optional[Dict[str, Any]] = None):
    """Write ``out_dir/realdat.json`` + ``realdat.safetensors`` (+ a copy of ``srclip_dir`` as
    ``out_dir/srclip``) atomically per file."""
    from safetensors.torch import save_file
    from dalpsr.utils.misc import atomic_path, atomic_write_json
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(os.path.join(out_dir, WEIGHTS_NAME)) as tmp:
        save_file(state, str(tmp))
    meta = {'format': FORMAT, 'arch': type(net).__name__, 'config': net.config,
            'srclip': 'srclip' if srclip_dir else None}
    meta.update(extra or {})
    if srclip_dir:
        dst = os.path.join(out_dir, 'srclip')
        if os.path.abspath(dst) != os.path.abspath(srclip_dir):
            from dalpsr.models.srclip_model import copy_image_encoder
            copy_image_encoder(srclip_dir, dst)
    atomic_write_json(os.path.join(out_dir, CONFIG_NAME), meta)


def load_realdat(path: str, map_location='cpu'):
    """``(net in eval mode, srclip encoder or None, meta)`` from an export folder (or its files)."""
    from safetensors.torch import load_file
    from dalpsr.archs.dat_arch import DAT
    from dalpsr.archs.realdat_arch import RealDAT
    folder = os.path.dirname(path) or '.' if str(path).endswith(('.json', '.safetensors')) else str(path)
    cfg_path, w_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, WEIGHTS_NAME)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f'RealDAT checkpoint incomplete: {p} not found (a RealDAT export folder holds '
                                    f'{CONFIG_NAME} and {WEIGHTS_NAME}; train one with '
                                    'options/train/train_realdat_cpu.yml)')
    with open(cfg_path, encoding='utf-8') as f:
        meta = json.load(f)
    if meta.get('format') != FORMAT or meta.get('arch') not in ('DAT', 'RealDAT'):
        raise ValueError(f"{cfg_path}: not a RealDAT config (format {meta.get('format')!r})")
    net = (RealDAT if meta['arch'] == 'RealDAT' else DAT)(**meta['config'])
    net.load_state_dict(load_file(w_path, device='cpu'))
    encoder = None
    if meta.get('srclip'):
        from dalpsr.models.srclip_model import load_srclip
        encoder, _ = load_srclip(os.path.join(folder, meta['srclip']), map_location)
    return net.to(map_location).eval(), encoder, meta


@MODEL_REGISTRY.register()
class RealDATModel(BaseModel):
    """Options block ``model`` (documented in options/reference/deplsr.yml)::

        model:
          type: RealDATModel
          network: {type: RealDAT, upscale: 4, embed_dim: 180, depth: [6,6,6,6,6,6], ...}
          conditioning: srclip      # or none: the plain DAT of the same backbone (baseline);
                                    # or oracle: the true degrees (known-degradation upper bound)
          srclip: experiments/srclip_cpu/export    # SRCLIP export folder (conditioning: srclip)
          pixel_loss: {type: L1Loss, loss_weight: 1.0}
          crop_border: 2            # PSNR-Y at validation
          train_crop: 0             # random aligned LR crop (px) of each training batch (0: as given)
          pretrained: null          # a RealDAT export folder to start from

    Batch keys: ``lq`` [B, 3, h, w], ``gt`` [B, 3, h*s, w*s] in [0, 1] (``conditioning: oracle``:
    also ``degrees`` [B, T] in [0, 1], from ``DegradedPairDataset`` ``degrees: true``).
    """

    KEYS = {'type', 'network', 'conditioning', 'srclip', 'pixel_loss', 'crop_border', 'train_crop', 'pretrained'}

    def __init__(self, opt: Dict[str, Any], accelerator=None):
        super().__init__(opt, accelerator)
        from dalpsr.losses import build_loss
        from dalpsr.utils.options import OptionError, check_keys, get_opt
        mopt = get_opt(opt, 'model')
        src = opt.get('_source', 'the options')
        check_keys(mopt, self.KEYS, f'model block of {src}')
        self.conditioning = str(mopt.get('conditioning', 'srclip'))
        if self.conditioning not in ('srclip', 'none', 'oracle'):
            raise OptionError(f"model.conditioning in {src} must be 'srclip', 'none' or 'oracle', "
                              f'got {self.conditioning!r}')
        self.encoder = None
        self.srclip_dir = None
        if self.conditioning == 'srclip':
            if not mopt.get('srclip'):
                raise OptionError(f'model.srclip in {src}: give the SRCLIP export folder (or conditioning: none)')
            from dalpsr.models.srclip_model import load_srclip
            self.srclip_dir = str(mopt['srclip'])
            self.encoder, _ = load_srclip(self.srclip_dir, self.device)
            net_cfg = dict(mopt.get('network') or {})
            if int(net_cfg.get('cond_dim', 512)) != self.encoder.embed_dim:
                raise OptionError(f"model.network.cond_dim in {src} ({net_cfg.get('cond_dim', 512)}) differs from the "
                                  f'SRCLIP embedding size {self.encoder.embed_dim}')
        self.net = build_sr_net(mopt.get('network'), self.conditioning != 'none')
        if mopt.get('pretrained'):
            src_net, _, _ = load_realdat(mopt['pretrained'])
            missing, unexpected = self.net.load_state_dict(src_net.state_dict(), strict=False)
            if unexpected:
                raise OptionError(f'model.pretrained {mopt["pretrained"]}: unexpected keys {unexpected[:3]}')
        self.net.to(self.device)
        self.pixel_loss = build_loss(dict(mopt.get('pixel_loss') or {'type': 'L1Loss'}), where=f'model.pixel_loss in {src}')
        self.crop_border = int(mopt.get('crop_border', 2))
        self.train_crop = int(mopt.get('train_crop', 0) or 0)
        if self.train_crop < 0:
            raise OptionError(f'model.train_crop in {src} must be >= 0 (0: no crop), got {self.train_crop}')
        self.seed = int(opt.get('seed', 0) or 0)

    def trainable_modules(self):
        return {'net': self.net}

    def _sr(self, net, lq: torch.Tensor, batch: Dict[str, Any]) -> torch.Tensor:
        return super_resolve(net, lq, self.conditioning, self.encoder, batch.get('degrees'))

    def _crop(self, lq: torch.Tensor, gt: torch.Tensor, step: int):
        """Random aligned crop of ``train_crop`` LR px per image, drawn from (seed, step) only."""
        c = self.train_crop
        h, w = lq.shape[-2:]
        if c <= 0 or (h <= c and w <= c):
            return lq, gt
        s = gt.shape[-1] // w
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        ys = torch.randint(0, max(h - c, 0) + 1, (lq.shape[0],), generator=g).tolist()
        xs = torch.randint(0, max(w - c, 0) + 1, (lq.shape[0],), generator=g).tolist()
        lq = torch.stack([lq[i, :, y:y + c, x:x + c] for i, (y, x) in enumerate(zip(ys, xs))])
        gt = torch.stack([gt[i, :, y * s:(y + c) * s, x * s:(x + c) * s] for i, (y, x) in enumerate(zip(ys, xs))])
        return lq, gt

    def training_step(self, batch: Dict[str, Any], step: int) -> Dict[str, Any]:
        lq, gt = self._crop(batch['lq'], batch['gt'], step)
        lq, gt = lq.to(self.device), gt.to(self.device)
        sr = self._sr(self.net, lq, batch)
        loss = self.pixel_loss(sr, gt)
        return {'loss': loss}

    @torch.no_grad()
    def validate(self, loader, step: int, writer=None) -> Dict[str, float]:
        net = self.unwrap(self.net)
        ps, pb = [], []
        for batch in loader:
            lq, gt = batch['lq'].to(self.device), batch['gt'].to(self.device)
            sr = self._sr(net, lq, batch).clamp(0, 1)
            bic = F.interpolate(lq, size=gt.shape[-2:], mode='bicubic', align_corners=False).clamp(0, 1)
            ps.append(psnr_y(sr, gt, self.crop_border))
            pb.append(psnr_y(bic, gt, self.crop_border))
        p, b = torch.cat(ps), torch.cat(pb)
        if self.accelerator is not None and getattr(self.accelerator, 'num_processes', 1) > 1:
            p, b = self.accelerator.gather_for_metrics(p), self.accelerator.gather_for_metrics(b)
        return {'psnr_y': float(p.mean()), 'psnr_y_bicubic': float(b.mean())}

    def export(self, out_dir: str) -> None:
        save_realdat(self.unwrap(self.net), out_dir, self.srclip_dir,
                     extra={'trained_with': self.opt.get('_source'), 'name': self.opt.get('name'),
                            'conditioning': self.conditioning})
