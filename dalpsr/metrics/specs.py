"""Metric names, presets and defaults of the IQA metric set (see :mod:`dalpsr.metrics.iqa` for the
table of what each name computes) and the one-line error type of the metrics package."""
from __future__ import annotations

import difflib
import logging
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional

from dalpsr.metrics.weights import MissingWeightsError
from dalpsr.utils.registry import METRIC_REGISTRY

LOGGER_NAME = 'dalpsr.iqa'

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


def _pyiqa_defaults(pyiqa_name: str) -> Dict[str, Any]:
    from pyiqa.default_model_configs import DEFAULT_CONFIGS
    return dict(DEFAULT_CONFIGS[pyiqa_name])

