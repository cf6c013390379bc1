"""Calibration of the degree map of :mod:`dalpsr.data.prompt_labels`: the quantile knots of
each physical severity under the default degradation options.

The results are the constants :data:`dalpsr.data.prompt_labels.CALIBRATION`;
``tests/test_prompt_labels.py`` checks that a fresh small run agrees with them. This module sits
above both the severity model and the LR cache (the measured noise needs degraded images), so
neither has to import the other's user.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from dalpsr.data.degradations import RealESRGANDegradation
from dalpsr.data.lr_cache import build_lr_cache, load_lr_cache
from dalpsr.data.prompt_labels import DEGREE_TYPES, severity

__all__ = ['calibrate', 'calibrate_measured_noise']


def calibrate(n: int = 50000, seed: int = 12345, num_knots: int = 21,
              degradation: Optional[Dict[str, Any]] = None) -> Dict[str, List[float]]:
    """Quantile knots of each severity over ``n`` sampled parameter sets (no images needed)."""
    deg = RealESRGANDegradation(**(degradation or {}))
    rng = np.random.default_rng(seed)
    sev = [severity(deg.sample_params(rng)) for _ in range(n)]
    return {t: _knots([s[t] for s in sev], num_knots) for t in DEGREE_TYPES}


def _knots(values: Sequence[float], num_knots: int) -> List[float]:
    knots = np.quantile(np.asarray(values, dtype=np.float64), np.linspace(0.0, 1.0, num_knots))
    knots = np.maximum.accumulate(knots + np.arange(num_knots) * 1e-9)  # strictly increasing
    return [float(f'{x:.6g}') for x in knots]


def calibrate_measured_noise(n: int = 20000, seed: int = 12345, hr: Any = 'sample:train', gt_size: int = 256,
                             num_knots: int = 21, workers: int = 2,
                             degradation: Optional[Dict[str, Any]] = None) -> List[float]:
    """Quantile knots of the measured noise RMS over ``n`` degraded crops of the ``hr`` photos
    (the ``'noise_measured'`` entry of :data:`~dalpsr.data.prompt_labels.CALIBRATION`; ~2 min for 20,000 on 2 cores)."""
    with tempfile.TemporaryDirectory() as tmp:
        f = build_lr_cache(os.path.join(tmp, 'calibration.npz'), hr=hr, num_samples=n, gt_size=gt_size, seed=seed,
                           degradation={**(degradation or {}), 'measure_noise': True}, workers=workers)
        rms = [json.loads(str(p))['measured']['noise_rms'] for p in load_lr_cache(f)['params']]
    return _knots(rms, num_knots)
