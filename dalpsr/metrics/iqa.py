"""The paper metric set on top of pyiqa: per-image metrics, folder evaluation, result files.

Metric names (case-insensitive; aliases in brackets) and what they are:

=========  ================================================  ====  =====================
name       pyiqa metric and default options                  mode  direction
=========  ================================================  ====  =====================
psnr       ``psnr``, Y of YCbCr (test_y_channel, ycbcr)       FR    higher is better
ssim       ``ssim``, Y of YCbCr (test_y_channel, ycbcr)       FR    higher is better
lpips      ``lpips`` (AlexNet, v0.1; input [0, 1])           FR    lower is better
dists      ``dists``                                         FR    lower is better
fid        ``fid`` (clean-fid, InceptionV3), SR vs GT folder folder lower is better
niqe       ``niqe`` (Y of YIQ, pristine model of basicsr)    NR    lower is better
musiq      ``musiq`` (KonIQ-10k checkpoint)                  NR    higher is better
maniqa     ``maniqa-pipal`` [maniqa-pipal]                   NR    higher is better
clipiqa    ``clipiqa`` (not clipiqa+)                        NR    higher is better
brisque    ``brisque``                                       NR    lower is better
clip_i     open_clip image-image cosine [clip-i, clipi]      FR    higher is better
=========  ================================================  ====  =====================

Any other pyiqa metric name is accepted with pyiqa's defaults. Presets: ``default`` (psnr ssim
lpips dists fid niqe musiq maniqa clipiqa), ``dalpsr`` (the DaLPSR table: lpips fid maniqa musiq
clipiqa), ``all`` (every row above).

Python API (interface 5)::

    ms = MetricSet(['psnr', 'lpips', 'musiq'], device='cuda', weights_dir=None, crop_border=4)
    ms.compute(sr, gt)     # sr, gt: (1, 3, H, W) in [0, 1] -> {'psnr': 27.1, 'lpips': 0.21, ...}
    summary = evaluate_folders('results/x', 'datasets/gt', metrics=['psnr', 'fid'], out_dir='out/x')

Metrics whose weights are missing are reported once (one line) and skipped; the others run.
"""
from __future__ import annotations

import csv
import datetime
import difflib
import hashlib
import io
import json
import logging
import math
import os
import random
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from dalpsr.metrics.pairing import DEFAULT_STRIP_SUFFIXES, Pair, list_images, pair_folders
from dalpsr.metrics.weights import (MissingWeightsError, WeightFile, check_files,
                                    niqe_params_file, offline_weights, required_files,
                                    resolve_weights_dir)
from dalpsr.utils.registry import METRIC_REGISTRY

LOGGER_NAME = 'dalpsr.iqa'

#: Names of the files written into ``out_dir`` by :func:`evaluate_folders`.
OUTPUT_FILES = ('per_image.csv', 'summary.json', 'table.md')
PARTIAL_FILE = '.iqa_partial.jsonl'
LOG_FILE = 'iqa.log'

#: Built-in metrics: our name -> registered type, pyiqa name, table label, number format,
#: default options (on top of pyiqa's) and whether ``crop_border`` applies.
METRIC_SPECS: Dict[str, Dict[str, Any]] = OrderedDict([
    ('psnr', dict(type='PyIQAMetric', pyiqa_name='psnr', label='PSNR', fmt='.2f', crop=True,
                  defaults={'test_y_channel': True, 'color_space': 'ycbcr'})),
    ('ssim', dict(type='PyIQAMetric', pyiqa_name='ssim', label='SSIM', fmt='.4f', crop=True,
                  defaults={'test_y_channel': True, 'color_space': 'ycbcr'})),
    ('lpips', dict(type='PyIQAMetric', pyiqa_name='lpips', label='LPIPS', fmt='.4f', defaults={})),
    ('dists', dict(type='PyIQAMetric', pyiqa_name='dists', label='DISTS', fmt='.4f', defaults={})),
    ('fid', dict(type='FIDMetric', pyiqa_name='fid', label='FID', fmt='.2f', lower_better=True,
                 defaults={'dims': 2048, 'backbone': 'inceptionv3', 'mode': 'clean', 'batch_size': 8,
                           'num_workers': 0})),
    ('niqe', dict(type='NIQEMetric', pyiqa_name='niqe', label='NIQE', fmt='.4f', defaults={})),
    ('musiq', dict(type='PyIQAMetric', pyiqa_name='musiq', label='MUSIQ', fmt='.2f', defaults={})),
    ('maniqa', dict(type='PyIQAMetric', pyiqa_name='maniqa-pipal', label='MANIQA', fmt='.4f', defaults={})),
    ('clipiqa', dict(type='PyIQAMetric', pyiqa_name='clipiqa', label='CLIPIQA', fmt='.4f', defaults={})),
    ('brisque', dict(type='PyIQAMetric', pyiqa_name='brisque', label='BRISQUE', fmt='.2f', defaults={})),
    ('clip_i', dict(type='CLIPIMetric', pyiqa_name=None, label='CLIP-I', fmt='.4f', lower_better=False,
                    defaults={'model': 'ViT-B-32', 'pretrained': 'openai', 'model_config': None,
                              'quick_gelu': None})),
])
ALIASES = {'maniqa-pipal': 'maniqa', 'clip-i': 'clip_i', 'clipi': 'clip_i'}
PRESETS = {
    'default': ['psnr', 'ssim', 'lpips', 'dists', 'fid', 'niqe', 'musiq', 'maniqa', 'clipiqa'],
    'dalpsr': ['lpips', 'fid', 'maniqa', 'musiq', 'clipiqa'],
    'all': list(METRIC_SPECS),
}


class IQAError(ValueError):
    """A user-facing problem (bad option, missing folder, refusing to overwrite): one line."""


def _logger() -> logging.Logger:
    from dalpsr.utils.logger import get_root_logger
    return get_root_logger(LOGGER_NAME)


def _one_line(err: BaseException) -> str:
    text = f'{type(err).__name__}: {err}' if not isinstance(err, (MissingWeightsError, IQAError)) else str(err)
    return ' '.join(text.split())


def expand_metric_names(names: Optional[Iterable[str]]) -> List[str]:
    """Canonical, de-duplicated metric names; presets expanded; unknown names -> IQAError."""
    if names is None:
        names = ['default']
    if isinstance(names, str):
        names = [n for n in names.replace(',', ' ').split() if n]
    out: List[str] = []
    for raw in names:
        n = str(raw).strip().lower()
        for m in PRESETS.get(n, [n]):
            m = ALIASES.get(m, m)
            if m not in out:
                out.append(m)
    for m in out:
        if m in METRIC_SPECS or m in METRIC_REGISTRY:
            continue
        known = _pyiqa_names()
        if m not in known:
            close = difflib.get_close_matches(m, list(METRIC_SPECS) + list(PRESETS) + known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ''
            raise IQAError(f"unknown metric '{m}'{hint}; built-in: {', '.join(METRIC_SPECS)}; "
                           f"presets: {', '.join(PRESETS)}; or any pyiqa metric name")
        if 'fid' in m or m == 'inception_score':
            raise IQAError(f"'{m}' is a folder-level pyiqa metric; use 'fid' (options.fid: dims/backbone)")
    return out


def _pyiqa_names() -> List[str]:
    from pyiqa.default_model_configs import DEFAULT_CONFIGS
    return list(DEFAULT_CONFIGS)


def _to_batch(x: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.is_tensor(x):
        raise IQAError(f"{what} must be a torch.Tensor (B, 3, H, W) in [0, 1], got {type(x).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] != 3:
        raise IQAError(f"{what} must have shape (B, 3, H, W), got {tuple(x.shape)}")
    return x.detach().float().clamp(0.0, 1.0)


class _Seeded:
    """Seed torch/numpy/random for one metric call and restore the caller's RNG states."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def __enter__(self):
        self._np = np.random.get_state()
        self._py = random.getstate()
        self._fork = torch.random.fork_rng(devices=[])
        self._fork.__enter__()
        torch.manual_seed(self.seed)
        np.random.seed(self.seed % (2 ** 32))
        random.seed(self.seed)
        return self

    def __exit__(self, *exc):
        self._fork.__exit__(*exc)
        np.random.set_state(self._np)
        random.setstate(self._py)
        return False


# ---- metric objects ---------------------------------------------------------------------------

class IQAMetric:
    """A metric as MetricSet uses it.

    Attributes: ``name`` (our name), ``label`` (table header), ``fmt`` (number format),
    ``mode`` ('FR', 'NR' or 'folder'), ``lower_better``, ``batchable`` (same-size images may be
    scored in one call), ``options`` (every option, recorded in summary.json), ``weight_files``.
    ``score(sr, gt)``: (B, 3, H, W) in [0, 1] (gt None for NR) -> list of B floats.
    Folder metrics implement ``score_folders(sr_files, gt_files) -> float`` instead.
    """
    name = ''
    label = ''
    fmt = '.4f'
    mode = 'NR'
    lower_better = False
    batchable = True
    same_size = True  # full-reference metric that needs sr and gt of the same size

    def __init__(self):
        self.options: Dict[str, Any] = {}
        self.weight_files: List[str] = []

    def score(self, sr: torch.Tensor, gt: Optional[torch.Tensor] = None) -> List[float]:
        raise NotImplementedError


def _pyiqa_defaults(pyiqa_name: str) -> Dict[str, Any]:
    from pyiqa.default_model_configs import DEFAULT_CONFIGS
    return dict(DEFAULT_CONFIGS[pyiqa_name])


def _arch_defaults(arch_type: str) -> Dict[str, Any]:
    """Keyword defaults of a pyiqa arch constructor (recorded so summary.json lists every option)."""
    import inspect
    import pyiqa.archs
    from pyiqa.archs import ARCH_REGISTRY as PYIQA_ARCHS
    try:
        if arch_type not in PYIQA_ARCHS:  # pyiqa 0.1.16 imports arch modules lazily
            pyiqa.archs._lazy_import_arch(arch_type)
        sig = inspect.signature(PYIQA_ARCHS.get(arch_type).__init__)
    except Exception:  # noqa: BLE001 - recording is best effort
        return {}
    return {k: p.default for k, p in sig.parameters.items()
            if k != 'self' and p.default is not inspect.Parameter.empty
            and isinstance(p.default, (bool, int, float, str, type(None), list, tuple))}


@METRIC_REGISTRY.register()
class PyIQAMetric(IQAMetric):
    """A pyiqa metric built offline from the weights folder (see dalpsr.metrics.weights)."""

    def __init__(self, name: str, pyiqa_name: str, options: Optional[Dict[str, Any]] = None,
                 device: str = 'cpu', hub: Optional[Path] = None, label: Optional[str] = None,
                 fmt: str = '.4f'):
        super().__init__()
        self.name, self.pyiqa_name = name, pyiqa_name
        self.label, self.fmt = label or name.upper(), fmt
        cfg = _pyiqa_defaults(pyiqa_name)
        self.mode = cfg.get('metric_mode', 'NR')
        self.lower_better = bool(cfg.get('lower_better', False))
        self.hub = hub or resolve_weights_dir()
        self.device = torch.device(device)
        user = dict(options or {})
        self.options = {**_arch_defaults(cfg['metric_opts']['type']), **cfg['metric_opts'], **user}
        files = required_files(pyiqa_name, self.options, self.hub)
        self.weight_files = [f.path for f in files]
        check_files(name, files, self.hub)
        kwargs = self._create_kwargs(user, files)
        with offline_weights(self.hub):
            import pyiqa
            self.net = pyiqa.create_metric(pyiqa_name, device=self.device, **kwargs)
        self.net.eval()

    def _create_kwargs(self, user: Dict[str, Any], files: List[WeightFile]) -> Dict[str, Any]:
        kwargs = dict(user)
        if self.options.get('type') == 'CLIPIQA':
            # hand pyiqa the checked local file: its own loader would re-download on a hash mismatch
            kwargs['backbone'] = files[0].path
        return kwargs

    def score(self, sr: torch.Tensor, gt: Optional[torch.Tensor] = None) -> List[float]:
        with torch.no_grad():
            if self.mode == 'FR':
                out = self.net(sr.to(self.device), gt.to(self.device))
            else:
                out = self.net(sr.to(self.device))
        return [float(v) for v in torch.as_tensor(out).reshape(-1).cpu()]


@METRIC_REGISTRY.register()
class NIQEMetric(PyIQAMetric):
    """pyiqa's NIQE with its pristine-model file; offline it is derived from basicsr's
    ``niqe_pris_params.npz`` (the same MATLAB pristine model), see docs/metrics.md."""

    def __init__(self, name: str = 'niqe', pyiqa_name: str = 'niqe', options: Optional[Dict[str, Any]] = None,
                 device: str = 'cpu', hub: Optional[Path] = None, label: Optional[str] = 'NIQE',
                 fmt: str = '.4f'):
        options = dict(options or {})
        hub = hub or resolve_weights_dir()
        source = 'options.niqe.pretrained_model_path'
        if not options.get('pretrained_model_path') and options.get('version', 'original') == 'original':
            found = niqe_params_file(hub)
            options['pretrained_model_path'] = found['path']
            source = found['source']
        super().__init__(name, pyiqa_name, options, device, hub, label, fmt)
        self.options['params_source'] = source

    def score(self, sr: torch.Tensor, gt: Optional[torch.Tensor] = None) -> List[float]:
        crop = int(self.options.get('crop_border', 0) or 0)
        h, w = sr.shape[-2] - 2 * crop, sr.shape[-1] - 2 * crop
        if min(h, w) < 96:  # NIQE's patch size: a smaller image has no patch to score
            raise IQAError(f'image {w}x{h} (after crop) is smaller than the 96x96 NIQE patch')
        return super().score(sr, gt)


@METRIC_REGISTRY.register()
class CLIPIMetric(IQAMetric):
    """CLIP-I (image-image CLIP cosine similarity), see dalpsr.metrics.clip_i."""
    mode = 'FR'
    lower_better = False
    same_size = False

    def __init__(self, name: str = 'clip_i', options: Optional[Dict[str, Any]] = None, device: str = 'cpu',
                 hub: Optional[Path] = None, label: str = 'CLIP-I', fmt: str = '.4f', pyiqa_name=None):
        super().__init__()
        from dalpsr.metrics.clip_i import CLIPImageSimilarity
        from dalpsr.utils.options import check_keys
        self.name, self.label, self.fmt = name, label, fmt
        opts = dict(options or {})
        check_keys(opts, ('model', 'pretrained', 'model_config', 'quick_gelu'), f'options.{name}')
        self.net = CLIPImageSimilarity(device=device, hub=hub or resolve_weights_dir(), **opts)
        self.options = dict(self.net.info)
        self.weight_files = [self.net.info['checkpoint']] if self.net.info['checkpoint'] else []

    def score(self, sr: torch.Tensor, gt: Optional[torch.Tensor] = None) -> List[float]:
        return [float(v) for v in self.net(sr, gt).cpu()]


@METRIC_REGISTRY.register()
class FIDMetric(IQAMetric):
    """FID between the SR folder and the GT folder (pyiqa's clean-fid implementation).

    Every readable image of each folder is used (paired or not). Files are handed to pyiqa
    through a temporary folder of links; images that are not plain 8-bit RGB (grayscale, RGBA,
    16-bit) are first converted by dalpsr's read rules and written as 8-bit PNG.
    """
    mode = 'folder'
    lower_better = True
    batchable = False
    CALL_KEYS = ('mode', 'batch_size', 'num_workers')

    def __init__(self, name: str = 'fid', pyiqa_name: str = 'fid', options: Optional[Dict[str, Any]] = None,
                 device: str = 'cpu', hub: Optional[Path] = None, label: str = 'FID', fmt: str = '.2f'):
        super().__init__()
        self.name, self.label, self.fmt = name, label, fmt
        self.hub = hub or resolve_weights_dir()
        self.device = torch.device(device)
        opts = dict(options or {})
        self.call_kwargs = {k: opts.pop(k) for k in list(opts) if k in self.CALL_KEYS}
        cfg = _pyiqa_defaults(pyiqa_name)
        self.options = {**_arch_defaults('FID'), **cfg['metric_opts'], **opts, **self.call_kwargs}
        files = required_files(pyiqa_name, self.options, self.hub)
        self.weight_files = [f.path for f in files]
        check_files(name, files, self.hub)
        with offline_weights(self.hub):
            import pyiqa
            self.net = pyiqa.create_metric(pyiqa_name, device=self.device, **opts)

    def score_folders(self, sr_images: Sequence[Tuple[str, bool]], gt_images: Sequence[Tuple[str, bool]]) -> float:
        """``*_images``: (path, plain) for each readable image; plain = 8-bit 3-channel file."""
        from dalpsr.utils.img_io import read_image, write_image
        if len(sr_images) < 2 or len(gt_images) < 2:
            raise IQAError(f"fid needs at least 2 readable images per folder (SR {len(sr_images)}, "
                           f"GT {len(gt_images)})")
        with tempfile.TemporaryDirectory(prefix='dalpsr_fid_') as tmp:
            dirs = []
            for side, images in (('sr', sr_images), ('gt', gt_images)):
                d = Path(tmp) / side
                d.mkdir()
                for i, (path, plain) in enumerate(images):
                    stem = f'{i:07d}_{Path(path).stem}'
                    if plain:
                        dst = d / f'{stem}{Path(path).suffix.lower()}'
                        try:
                            dst.symlink_to(os.path.abspath(path))
                        except OSError:
                            shutil.copyfile(path, dst)
                    else:
                        write_image(d / f'{stem}.png', read_image(path))
                dirs.append(str(d))
            with torch.no_grad():
                return float(self.net(dirs[0], dirs[1], verbose=False, **self.call_kwargs))


def build_metric(name: str, device: str = 'cpu', hub: Optional[Path] = None,
                 options: Optional[Dict[str, Any]] = None, crop_border: int = 0) -> IQAMetric:
    """Build metric ``name`` (canonical, see :func:`expand_metric_names`)."""
    hub = hub or resolve_weights_dir()
    options = dict(options or {})
    spec = METRIC_SPECS.get(name)
    if spec is None and name in METRIC_REGISTRY:  # a user metric registered from `imports:`
        return METRIC_REGISTRY.get(name)(name=name, options=options, device=device, hub=hub)
    if spec is None:
        spec = dict(type='PyIQAMetric', pyiqa_name=name, label=name.upper(), fmt='.4f', defaults={})
    opts = dict(spec['defaults'])
    if spec.get('crop') and crop_border:
        opts['crop_border'] = int(crop_border)
    opts.update(options)
    cls = METRIC_REGISTRY.get(spec['type'])
    if spec['type'] == 'CLIPIMetric':
        return cls(name=name, options=opts, device=device, hub=hub, label=spec['label'], fmt=spec['fmt'])
    return cls(name=name, pyiqa_name=spec['pyiqa_name'], options=opts, device=device, hub=hub,
               label=spec['label'], fmt=spec['fmt'])


# ---- MetricSet ------------------------------------------------------------------------------

class MetricSet:
    """Several metrics built once, used per image (or per batch of same-size images).

    Args:
        names: metric names / presets (see module doc).
        device: 'cpu', 'cuda', 'cuda:1', ...
        weights_dir: weights folder (default ``$DALPSR_IQA_WEIGHTS`` or ``$TORCH_HOME/hub``).
        crop_border: pixels removed at each edge for psnr and ssim (default 0).
        seed: torch/numpy/random are seeded with it around every metric call (callers' RNG
            states are restored), so results do not depend on the call history.
        options: ``{metric: {option: value}}`` extra pyiqa / CLIP-I / FID options; a metric name
            may also be passed directly as a keyword (``lpips={'net': 'vgg'}``).
        strict: raise on a metric that cannot be built instead of skipping it.

    ``failed`` maps each metric that could not be built to its one-line message.
    """

    def __init__(self, names: Optional[Iterable[str]] = None, device: str = 'cpu',
                 weights_dir: Optional[str] = None, *, crop_border: int = 0, seed: int = 0,
                 options: Optional[Dict[str, Dict[str, Any]]] = None, strict: bool = False,
                 logger: Optional[logging.Logger] = None, **per_metric: Dict[str, Any]):
        self.logger = logger or _logger()
        self.names = expand_metric_names(names)
        self.device = str(device)
        if self.device.startswith('cuda') and not torch.cuda.is_available():
            raise IQAError(f"device '{device}' requested but CUDA is not available (use --device cpu)")
        if not isinstance(crop_border, int) or crop_border < 0:
            raise IQAError(f"crop_border must be an integer >= 0, got {crop_border!r}")
        self.crop_border, self.seed = crop_border, int(seed)
        self.hub = resolve_weights_dir(weights_dir)
        opts: Dict[str, Dict[str, Any]] = {}
        for key, val in list((options or {}).items()) + list(per_metric.items()):
            canon = ALIASES.get(str(key).lower(), str(key).lower())
            if not isinstance(val, dict) or (canon not in METRIC_SPECS and canon not in self.names):
                close = difflib.get_close_matches(str(key), list(METRIC_SPECS), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ''
                raise IQAError(f"unknown MetricSet option '{key}'{hint}: per-metric options are "
                               "{metric: {option: value}}")
            opts.setdefault(canon, {}).update(val)
        self.metric_options = opts
        self.metrics: Dict[str, IQAMetric] = OrderedDict()
        self.failed: Dict[str, str] = OrderedDict()
        for name in self.names:
            try:
                self.metrics[name] = build_metric(name, self.device, self.hub, opts.get(name), crop_border)
            except Exception as err:  # noqa: BLE001 - one metric failing must not stop the others
                if strict:
                    raise
                msg = _one_line(err)
                if not msg.startswith(name):
                    msg = f'{name}: could not be created: {msg}'
                self.failed[name] = msg
                self.logger.warning(msg)
        self._warned: set = set()

    # -- properties used by evaluate_folders
    def per_image(self) -> List[IQAMetric]:
        return [m for m in self.metrics.values() if m.mode in ('FR', 'NR')]

    def folder_level(self) -> List[IQAMetric]:
        return [m for m in self.metrics.values() if m.mode == 'folder']

    def describe(self) -> Dict[str, Any]:
        """Per metric: label, mode, direction, every option, weight files, status."""
        out: Dict[str, Any] = OrderedDict()
        for name in self.names:
            spec = METRIC_SPECS.get(name, {})
            if name in self.metrics:
                m = self.metrics[name]
                out[name] = {'label': m.label, 'pyiqa_name': getattr(m, 'pyiqa_name', spec.get('pyiqa_name')),
                             'mode': m.mode, 'lower_better': m.lower_better, 'options': m.options,
                             'weight_files': m.weight_files, 'status': 'ok', 'error': None}
            else:
                out[name] = {'label': spec.get('label', name.upper()), 'pyiqa_name': spec.get('pyiqa_name', name),
                             'mode': None, 'lower_better': None, 'options': self.metric_options.get(name, {}),
                             'weight_files': [], 'status': 'failed', 'error': self.failed.get(name)}
        return out

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.logger.warning(msg)

    def score_batch(self, sr: torch.Tensor, gt: Optional[torch.Tensor] = None
                    ) -> Tuple[Dict[str, List[Optional[float]]], List[List[str]]]:
        """Score B images at once (all the same size; gt the same size as sr or None).

        Returns ``({name: [B values or None]}, [B lists of error strings])``. A metric whose
        batched call fails is retried image by image, so one bad image only loses its own value.
        """
        sr = _to_batch(sr, 'sr')
        gt = _to_batch(gt, 'gt') if gt is not None else None
        b = sr.shape[0]
        values: Dict[str, List[Optional[float]]] = {}
        errors: List[List[str]] = [[] for _ in range(b)]
        for m in self.per_image():
            if m.mode == 'FR' and gt is None:
                continue
            if m.mode == 'FR' and m.same_size and gt.shape != sr.shape:
                self._warn_once(f'size-{m.name}', f'{m.name}: SR {tuple(sr.shape[-2:])} and GT '
                                f'{tuple(gt.shape[-2:])} differ; full-reference metric skipped')
                continue
            chunks = [(0, b)] if (m.batchable and b > 1) else [(i, i + 1) for i in range(b)]
            vals: List[Optional[float]] = [None] * b
            for lo, hi in chunks:
                try:
                    with _Seeded(self.seed):
                        res = m.score(sr[lo:hi], gt[lo:hi] if gt is not None else None)
                    if len(res) != hi - lo:
                        raise RuntimeError(f'{m.name} returned {len(res)} values for {hi - lo} images')
                    vals[lo:hi] = res
                except Exception as err:  # noqa: BLE001 - isolate the failing image
                    if hi - lo > 1:
                        for i in range(lo, hi):
                            try:
                                with _Seeded(self.seed):
                                    vals[i] = m.score(sr[i:i + 1], gt[i:i + 1] if gt is not None else None)[0]
                            except Exception as err1:  # noqa: BLE001
                                errors[i].append(f'{m.name}: {_one_line(err1)}')
                    else:
                        errors[lo].append(f'{m.name}: {_one_line(err)}')
            for i, v in enumerate(vals):
                if v is not None and not math.isfinite(v):
                    errors[i].append(f'{m.name}: non-finite value {v}')
                    vals[i] = None
            values[m.name] = vals
        return values, errors

    def compute(self, sr: torch.Tensor, gt: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """Per-image metrics of one image: sr (1, 3, H, W) in [0, 1], gt the same or None.

        Full-reference metrics are skipped without gt (or if sizes differ, with one warning);
        folder metrics (fid) are skipped (see :func:`evaluate_folders`); a metric failing on
        this image is logged and left out.
        """
        values, errors = self.score_batch(sr, gt)
        for e in errors[0]:
            self.logger.warning(e)
        return {k: v[0] for k, v in values.items() if v and v[0] is not None}


# ---- folder evaluation -------------------------------------------------------------------------

def _read(path: str) -> Tuple[np.ndarray, bool]:
    """dalpsr.utils.img_io.read_image rules, plus whether the file is plain 8-bit 3-channel."""
    from dalpsr.utils.img_io import decode_file, to_rgb_float
    img = decode_file(path)
    plain = img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    return to_rgb_float(img, path), plain


def _prepare_out(out_dir: Optional[str], overwrite: bool, resume: bool) -> Optional[Path]:
    if out_dir is None:
        return None
    out = Path(out_dir)
    existing = [n for n in OUTPUT_FILES if (out / n).exists()]
    partial = out / PARTIAL_FILE
    if existing and not overwrite:
        raise IQAError(f"{out} already holds results ({', '.join(existing)}); refusing to overwrite them "
                       "(pass --overwrite, or choose another --out)")
    if partial.exists() and not (resume or overwrite):
        raise IQAError(f"{out} holds an interrupted run ({PARTIAL_FILE}); pass --resume to continue it "
                       "or --overwrite to start again")
    if partial.exists() and overwrite and not resume:
        partial.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _fingerprint(payload: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_partial(path: Path, fingerprint: str) -> Dict[str, Dict[str, Any]]:
    from dalpsr.utils.misc import read_jsonl
    if not path.exists():
        return {}
    lines = read_jsonl(path)
    if not lines or lines[0].get('fingerprint') != fingerprint:
        raise IQAError(f"{path} was written with other folders/metrics/options; it cannot be resumed "
                       "(pass --overwrite to start again)")
    return {r['id']: r for r in lines[1:] if 'id' in r}


def _row_id(pair: Pair) -> str:
    return f"{pair.key}|{pair.sr_path or ''}|{pair.gt_path or ''}"


def _versions() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for pkg in ('pyiqa', 'torch', 'torchvision', 'open_clip_torch', 'numpy', 'opencv-python'):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = 'not installed'
    return out


def _fmt(v: Optional[float], fmt: str) -> str:
    return 'n/a' if v is None or not math.isfinite(v) else format(v, fmt)


def markdown_table(name: str, metric_info: Dict[str, Any], results: Dict[str, Any]) -> str:
    """``| Method | LPIPS↓ | ... |`` header, separator and the row of ``name`` (means)."""
    cols, cells = [], []
    for m, info in metric_info.items():
        arrow = '↓' if info.get('lower_better') else '↑'
        if info.get('lower_better') is None:
            spec = METRIC_SPECS.get(m)
            arrow = ''
            if spec and 'lower_better' in spec:
                arrow = '↓' if spec['lower_better'] else '↑'
            elif spec and spec.get('pyiqa_name'):
                try:
                    arrow = '↓' if _pyiqa_defaults(spec['pyiqa_name']).get('lower_better') else '↑'
                except Exception:  # noqa: BLE001
                    arrow = ''
        cols.append(f"{info['label']}{arrow}")
        fmt = METRIC_SPECS.get(m, {}).get('fmt', '.4f')
        cells.append(_fmt((results.get(m) or {}).get('mean'), fmt))
    head = '| Method | ' + ' | '.join(cols) + ' |'
    sep = '|' + '---|' * (len(cols) + 1)
    row = f'| {name} | ' + ' | '.join(cells) + ' |'
    return '\n'.join([head, sep, row]) + '\n'


def evaluate_folders(sr_dir: str, gt_dir: Optional[str] = None, metrics: Optional[Iterable[str]] = None,
                     out_dir: Optional[str] = None, *, name: Optional[str] = None, device: str = 'cpu',
                     weights_dir: Optional[str] = None,
                     strip_suffixes: Optional[Iterable[str]] = DEFAULT_STRIP_SUFFIXES,
                     recursive: bool = False, batch_size: int = 8, overwrite: bool = False,
                     resume: bool = False, progress: bool = True, metric_set: Optional[MetricSet] = None,
                     **metric_opts) -> Dict[str, Any]:
    """Score every SR image of ``sr_dir`` (against ``gt_dir``) and write the result files.

    Outputs in ``out_dir`` (none if ``out_dir`` is None): ``per_image.csv`` (one row per file,
    with ``status`` and ``reason`` columns), ``summary.json`` (mean/std/count per metric, every
    metric option, versions, folders, date), ``table.md`` (paper table row), ``iqa.log``.
    Existing results are never overwritten unless ``overwrite``; an interrupted run (its
    ``.iqa_partial.jsonl``) continues with ``resume``. ``metric_opts`` go to :class:`MetricSet`
    (crop_border, seed, options, ...). Returns the summary dict.
    """
    from dalpsr.utils.misc import append_jsonl, atomic_path, atomic_write_json, atomic_write_text
    if not os.path.isdir(sr_dir):
        raise IQAError(f"SR folder not found: {sr_dir}")
    if gt_dir is not None and not os.path.isdir(gt_dir):
        raise IQAError(f"GT folder not found: {gt_dir}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise IQAError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    out = _prepare_out(out_dir, overwrite, resume)
    logger = _logger()
    handler = None
    if out is not None:
        handler = logging.FileHandler(out / LOG_FILE, mode='a', encoding='utf-8')
        handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s: %(message)s'))
        logger.addHandler(handler)
    try:
        return _evaluate(sr_dir, gt_dir, metrics, out, name, device, weights_dir, strip_suffixes, recursive,
                         batch_size, resume, progress, metric_set, metric_opts, logger,
                         append_jsonl, atomic_path, atomic_write_json, atomic_write_text)
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()


def _evaluate(sr_dir, gt_dir, metrics, out, name, device, weights_dir, strip_suffixes, recursive,
              batch_size, resume, progress, metric_set, metric_opts, logger,
              append_jsonl, atomic_path, atomic_write_json, atomic_write_text) -> Dict[str, Any]:
    from tqdm import tqdm
    if isinstance(strip_suffixes, str):
        strip_suffixes = strip_suffixes.replace(',', ' ').split()
    strip = [str(s) for s in (strip_suffixes or []) if s and str(s).lower() != 'none']
    logger.info(f'IQA: sr={sr_dir} gt={gt_dir} out={out}')
    ms = metric_set or MetricSet(metrics, device=device, weights_dir=weights_dir, logger=logger, **metric_opts)
    if gt_dir is None:
        for m in ms.metrics.values():
            if m.mode in ('FR', 'folder'):
                logger.warning(f'{m.name}: needs --gt; skipped')
    per_image = [m for m in ms.per_image() if not (m.mode == 'FR' and gt_dir is None)]
    folder_metrics = [m for m in ms.folder_level() if gt_dir is not None]
    pairs = pair_folders(sr_dir, gt_dir, strip, recursive)
    if not pairs:
        raise IQAError(f"no images found in {sr_dir}" + ('' if gt_dir is None else f' or {gt_dir}'))
    metric_info = ms.describe()
    run_cfg = {'sr_dir': os.path.abspath(sr_dir), 'gt_dir': os.path.abspath(gt_dir) if gt_dir else None,
               'metrics': {k: v for k, v in metric_info.items()}, 'strip_suffixes': strip,
               'recursive': recursive, 'crop_border': ms.crop_border, 'seed': ms.seed}
    fingerprint = _fingerprint(run_cfg)
    done: Dict[str, Dict[str, Any]] = {}
    partial = None
    if out is not None:
        partial = out / PARTIAL_FILE
        if resume:
            done = _load_partial(partial, fingerprint)
            if done:
                logger.info(f'resuming: {len(done)} rows already scored')
        if not partial.exists():
            append_jsonl(partial, {'fingerprint': fingerprint})

    records: Dict[str, Dict[str, Any]] = {}
    plain_ok: Dict[str, bool] = {}  # readable files (for FID): path -> plain 8-bit RGB
    todo = [p for p in pairs if _row_id(p) not in done]
    for p in pairs:
        if _row_id(p) in done:
            records[_row_id(p)] = done[_row_id(p)]
            plain_ok.update({k: v for k, v in done[_row_id(p)].get('readable', {}).items()})
    bar = tqdm(total=len(todo), desc='IQA', disable=not progress, unit='img')
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        loaded = []
        for p in chunk:
            rec = {'id': _row_id(p), 'key': p.key, 'sr_path': p.sr_path, 'gt_path': p.gt_path,
                   'status': p.status, 'reason': p.reason, 'width': None, 'height': None,
                   'values': {}, 'readable': {}}
            sr_img = gt_img = None
            if p.status in ('ok', 'unpaired_sr', 'ambiguous_gt') or (p.status == 'duplicate' and folder_metrics):
                try:
                    sr_img, plain = _read(p.sr_path)
                    rec['readable'][p.sr_path] = plain
                    rec['height'], rec['width'] = sr_img.shape[:2]
                except Exception as err:  # noqa: BLE001 - ImageReadError and anything odd in a file
                    msg = f'SR unreadable: {_one_line(err)}'
                    if p.status == 'duplicate':
                        rec['reason'] = f"{rec['reason']}; {msg}"
                    else:
                        rec['status'], rec['reason'] = 'unreadable', msg
                if p.status == 'duplicate':  # read only so that FID counts it
                    sr_img = None
            if p.gt_path:
                want_fr = rec['status'] == 'ok'
                if want_fr or folder_metrics:  # unpaired GT files are read only to be counted by FID
                    try:
                        gt_img, plain = _read(p.gt_path)
                        rec['readable'][p.gt_path] = plain
                    except Exception as err:  # noqa: BLE001
                        gt_img = None
                        msg = f'GT unreadable: {_one_line(err)}'
                        if want_fr:
                            rec['status'], msg = 'unreadable', msg + '; full-reference metrics skipped'
                        rec['reason'] = f"{rec['reason']}; {msg}" if rec['reason'] else msg
                if not want_fr:
                    gt_img = None
            if sr_img is not None and gt_img is not None and sr_img.shape != gt_img.shape:
                rec['status'] = 'size_mismatch'
                rec['reason'] = (f'size mismatch: SR {sr_img.shape[1]}x{sr_img.shape[0]} vs GT '
                                 f'{gt_img.shape[1]}x{gt_img.shape[0]} (WxH); full-reference metrics skipped')
                gt_img = None
            if rec['reason']:
                logger.warning(f"{p.key}: {rec['reason']}")
            loaded.append((rec, sr_img, gt_img))
        # group same-size images (keeping order within a group) and score each group at once
        groups: Dict[Any, List[int]] = OrderedDict()
        for i, (rec, sr_img, gt_img) in enumerate(loaded):
            if sr_img is None:
                continue
            groups.setdefault((sr_img.shape, gt_img is not None), []).append(i)
        for (_, has_gt), idx in groups.items():
            sr_t = torch.stack([torch.from_numpy(loaded[i][1].transpose(2, 0, 1).copy()) for i in idx])
            gt_t = torch.stack([torch.from_numpy(loaded[i][2].transpose(2, 0, 1).copy()) for i in idx]) \
                if has_gt else None
            values, errors = ms.score_batch(sr_t, gt_t)
            for j, i in enumerate(idx):
                rec = loaded[i][0]
                rec['values'] = {k: v[j] for k, v in values.items() if v[j] is not None}
                if errors[j]:
                    msg = '; '.join(errors[j])
                    rec['reason'] = f"{rec['reason']}; {msg}" if rec['reason'] else msg
                    logger.warning(f"{rec['key']}: {msg}")
        for rec, _, _ in loaded:
            records[rec['id']] = rec
            if partial is not None:
                append_jsonl(partial, rec)
        bar.update(len(chunk))
    bar.close()

    rows = [records[_row_id(p)] for p in pairs]
    # folder metrics (FID): every readable image of each folder
    folder_values: Dict[str, Optional[float]] = {}
    fid_counts: Dict[str, int] = {}
    if folder_metrics:
        readable: Dict[str, bool] = {}
        for r in rows:
            readable.update(r.get('readable', {}))
        sr_set = [(p, readable[p]) for p in (str(x) for x in list_images(sr_dir, recursive)) if p in readable]
        gt_set = [(p, readable[p]) for p in (str(x) for x in list_images(gt_dir, recursive)) if p in readable]
        fid_counts = {'sr_images': len(sr_set), 'gt_images': len(gt_set)}
        for m in folder_metrics:
            try:
                logger.info(f'{m.name}: {len(sr_set)} SR vs {len(gt_set)} GT images')
                with _Seeded(ms.seed):
                    folder_values[m.name] = m.score_folders(sr_set, gt_set)
            except Exception as err:  # noqa: BLE001
                msg = f'{m.name}: failed: {_one_line(err)}'
                ms.failed[m.name] = msg
                metric_info[m.name]['status'], metric_info[m.name]['error'] = 'failed', msg
                logger.warning(msg)
                folder_values[m.name] = None

    # aggregate
    results: Dict[str, Any] = OrderedDict()
    for mname, info in metric_info.items():
        m = ms.metrics.get(mname)
        if m is None:
            results[mname] = {'mean': None, 'std': None, 'count': 0, 'status': 'failed'}
        elif m.mode == 'folder':
            v = folder_values.get(mname)
            results[mname] = {'mean': v, 'std': None, 'count': 1 if v is not None else 0,
                              'status': 'ok' if v is not None else ('skipped: needs GT' if gt_dir is None
                                                                     else 'failed'), **fid_counts}
        elif m.mode == 'FR' and gt_dir is None:
            results[mname] = {'mean': None, 'std': None, 'count': 0, 'status': 'skipped: needs GT'}
        else:
            vals = np.array([r['values'][mname] for r in rows if mname in r['values']], dtype=np.float64)
            results[mname] = {'mean': float(vals.mean()) if vals.size else None,
                              'std': float(vals.std()) if vals.size else None,
                              'count': int(vals.size), 'status': 'ok' if vals.size else 'no values'}
    status_counts: Dict[str, int] = {}
    for r in rows:
        status_counts[r['status']] = status_counts.get(r['status'], 0) + 1
    table_name = name or Path(os.path.abspath(sr_dir)).name
    summary = OrderedDict([
        ('name', table_name),
        ('date', datetime.datetime.now().astimezone().isoformat(timespec='seconds')),
        ('sr_dir', os.path.abspath(sr_dir)), ('gt_dir', os.path.abspath(gt_dir) if gt_dir else None),
        ('results', results), ('metrics', metric_info),
        ('files', {'rows': len(rows), **status_counts}),
        ('settings', {'device': ms.device, 'weights_dir': str(ms.hub), 'strip_suffixes': strip,
                      'recursive': recursive, 'batch_size': batch_size, 'crop_border': ms.crop_border,
                      'crop_border_applies_to': [k for k, s in METRIC_SPECS.items() if s.get('crop')],
                      'seed': ms.seed, 'std': 'population (ddof=0)'}),
        ('versions', _versions()),
        ('fingerprint', fingerprint),
    ])
    table = markdown_table(table_name, metric_info, results)
    summary['table_md'] = table
    for mname, res in results.items():
        logger.info(f"{mname}: mean={res['mean']} std={res['std']} count={res['count']} ({res['status']})")
    if out is not None:
        metric_cols = [m for m in metric_info]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator='\n')
        w.writerow(['key', 'sr_file', 'gt_file', 'width', 'height'] + metric_cols + ['status', 'reason'])
        for r in rows:
            w.writerow([r['key'], r['sr_path'] or '', r['gt_path'] or '', r['width'] or '', r['height'] or '']
                       + [repr(r['values'][m]) if m in r['values'] else '' for m in metric_cols]
                       + [r['status'], r['reason']])
        atomic_write_text(out / 'per_image.csv', buf.getvalue())
        atomic_write_json(out / 'summary.json', summary)
        note = (f"\n<!-- dalpsr iqa: sr={summary['sr_dir']} gt={summary['gt_dir']} pyiqa {summary['versions']['pyiqa']} "
                f"crop_border={ms.crop_border} ({summary['date']}); options in summary.json -->\n")
        atomic_write_text(out / 'table.md', table + note)
        if (out / PARTIAL_FILE).exists():
            (out / PARTIAL_FILE).unlink()
        logger.info(f'results written to {out}')
    return summary
