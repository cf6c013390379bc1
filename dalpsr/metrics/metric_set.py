"""MetricSet: several metrics built once and applied per image or per batch of same-size images,
each call seeded and isolated so that one failing metric or image loses only its own values."""
from __future__ import annotations

import difflib
import logging
import math
import random
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

from dalpsr.metrics.backends import IQAMetric, build_metric
from dalpsr.metrics.specs import ALIASES, METRIC_SPECS, IQAError, _logger, _one_line, expand_metric_names
from dalpsr.metrics.weights import resolve_weights_dir


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


class MetricSet:
    """Several metrics built once, used per image (or per batch of same-size images).

    Args:
        names: metric names / presets (see :mod:`dalpsr.metrics.iqa`).
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

