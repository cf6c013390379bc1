"""DePLSR's semantic degradation pipeline (SRCLIP training data) as a preset of our pipeline, with
the captions made from the recorded parameters.

One sample (specs/related-methods.md section 3; every value an option)::

    sigma  ~ {0, 0.1, ..., 2.9}; kernel iso or aniso (50/50) with sigma_x = sigma_y = sigma,
             size 2*ceil(3 sigma)+1 (sigma 0: no blur)
    noise  ~ Gaussian sigma U[0, 30] (prob 0.5) else Poisson scale U[0, 3] (colour noise)
    JPEG   ~ quality U{30..95};  final sinc (prob 0.2, omega U[pi/3, pi], size 7..21)
    chain 'two_order' (default, the intended pipeline):
          blur -> noise -> blur -> noise (same parameters, new draw) -> JPEG -> [sinc] -> resize
    chain 'released' (compat: the released code blurs the GT again, losing the first noise):
          blur -> noise -> JPEG -> [sinc] -> resize
    resize: bicubic to ``lq_size`` (224 in the paper) or by 1/``scale``.

Captions (DePLSR's format)::

    full : 'blur with sigma:1.2, gaussian noise with sigma:12.3, jpeg with quality factor:55.0'
           (+ ', ringing and overshoot artifacts' when the sinc was applied)
    fine : five, one per :data:`TYPES`: 'blur with sigma:1.2', 'gaussian noise with sigma:12.3',
           'poisson noise with scale:0.0' (the type not drawn reads 0), 'jpeg with quality
           factor:55.0', 'ringing and overshoot artifacts' / 'no ringing and overshoot artifacts'

The blur, noise and JPEG operations are those of :mod:`dalpsr.data.degradations` (same kernels,
same OpenCV filtering, same noise and JPEG code); only the chain and the sampling differ.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence, Tuple

import cv2
import numpy as np

from dalpsr.data import degradations as _deg
from dalpsr.utils.registry import TRANSFORM_REGISTRY

__all__ = ['DePLSRDegradation', 'TYPES', 'EVAL_CLASSES', 'captions_from_params', 'values_from_params',
           'type_caption', 'class_captions']

#: the five fine-grained degradation types, in the order of SRCLIP's fine embeddings
TYPES = ('blur', 'gaussian', 'poisson', 'jpeg', 'ringing')

#: zero-shot retrieval classes and the tolerance within which a class counts as correct
EVAL_CLASSES: Dict[str, Tuple[Tuple[float, ...], float]] = {
    'blur': ((0.0, 1.0, 2.0, 3.0), 0.5),
    'gaussian': ((0.0, 15.0, 30.0), 10.0),
    'poisson': ((0.0, 1.0, 2.0, 3.0), 0.5),
    'jpeg': ((30.0, 50.0, 70.0, 90.0), 10.0),
    'ringing': ((0.0, 1.0), 0.0),
}


def type_caption(t: str, value: float) -> str:
    """The caption of one degradation type at one value (DePLSR's words)."""
    if t == 'blur':
        return f'blur with sigma:{value:.1f}'
    if t == 'gaussian':
        return f'gaussian noise with sigma:{value:.1f}'
    if t == 'poisson':
        return f'poisson noise with scale:{value:.1f}'
    if t == 'jpeg':
        return f'jpeg with quality factor:{value:.1f}'
    if t == 'ringing':
        return 'ringing and overshoot artifacts' if value >= 0.5 else 'no ringing and overshoot artifacts'
    raise ValueError(f'unknown degradation type {t!r} (known: {", ".join(TYPES)})')


def class_captions(t: str, template: str = '{}') -> List[str]:
    """Captions of the evaluation classes of type ``t``, through ``template`` (e.g. 'A photo with {}')."""
    return [template.format(type_caption(t, v)) for v in EVAL_CLASSES[t][0]]


def values_from_params(params: Dict[str, Any]) -> Dict[str, float]:
    """Numeric value per type from recorded parameters (the type not drawn is 0; ringing 0/1)."""
    n = params['noise']
    return {'blur': float(params['sigma']),
            'gaussian': float(n['sigma']) if n['kind'] == 'gaussian' else 0.0,
            'poisson': float(n['scale']) if n['kind'] == 'poisson' else 0.0,
            'jpeg': float(params['jpeg']),
            'ringing': 1.0 if params.get('sinc') else 0.0}


def captions_from_params(params: Dict[str, Any]) -> Dict[str, Any]:
    """``{'full': str, 'fine': [5 str]}`` (module doc)."""
    v = values_from_params(params)
    n = params['noise']
    parts = [type_caption('blur', v['blur']),
             type_caption('gaussian', v['gaussian']) if n['kind'] == 'gaussian' else type_caption('poisson', v['poisson']),
             type_caption('jpeg', v['jpeg'])]
    if params.get('sinc'):
        parts.append(type_caption('ringing', 1.0))
    return {'full': ', '.join(parts), 'fine': [type_caption(t, v[t]) for t in TYPES]}


@TRANSFORM_REGISTRY.register()
class DePLSRDegradation:
    """DePLSR's degradation (module doc) with every random choice recorded.

    ``__call__(gt HxWx3 float32 RGB [0,1], rng) -> {'gt', 'lq' float32 on the 8-bit grid, 'params',
    'captions'}``; :meth:`sample_params` then :meth:`apply` is the same, split.
    """

    def __init__(self, chain: str = 'two_order', lq_size: int | None = None, scale: int = 4,
                 blur_sigma_values: Sequence[float] = (0.0, 2.9, 0.1), iso_prob: float = 0.5,
                 gaussian_noise_prob: float = 0.5, noise_range: Sequence[float] = (0.0, 30.0),
                 poisson_scale_range: Sequence[float] = (0.0, 3.0), jpeg_range: Sequence[int] = (30, 95),
                 final_sinc_prob: float = 0.2, sinc_omega: Sequence[float] = (math.pi / 3, math.pi),
                 sinc_kernel_range: Sequence[int] = (7, 21)):
        if chain not in ('two_order', 'released'):
            raise ValueError(f"DePLSR degradation: chain must be 'two_order' or 'released', got {chain!r}")
        self.chain = chain
        self.lq_size = None if lq_size in (None, 0) else int(lq_size)
        self.scale = int(scale)
        if self.scale < 1:
            raise ValueError(f'DePLSR degradation: scale must be >= 1, got {scale}')
        lo, hi, step = (float(x) for x in blur_sigma_values)
        if not (0 <= lo <= hi and step > 0):
            raise ValueError(f'blur_sigma_values must be [low, high, step] with 0 <= low <= high, step > 0, got '
                             f'{list(blur_sigma_values)}')
        self.sigmas = tuple(round(lo + i * step, 6) for i in range(int(round((hi - lo) / step)) + 1))
        for name, p in (('iso_prob', iso_prob), ('gaussian_noise_prob', gaussian_noise_prob),
                        ('final_sinc_prob', final_sinc_prob)):
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f'DePLSR degradation: {name} must be in [0, 1], got {p}')
        self.iso_prob, self.gaussian_noise_prob = float(iso_prob), float(gaussian_noise_prob)
        self.final_sinc_prob = float(final_sinc_prob)
        self.noise_range = tuple(float(x) for x in noise_range)
        self.poisson_scale_range = tuple(float(x) for x in poisson_scale_range)
        self.jpeg_range = tuple(int(x) for x in jpeg_range)
        if not 1 <= self.jpeg_range[0] <= self.jpeg_range[1] <= 100:
            raise ValueError(f'DePLSR degradation: jpeg_range must be within [1, 100], got {list(jpeg_range)}')
        self.sinc_omega = tuple(float(x) for x in sinc_omega)
        kr = [int(x) for x in sinc_kernel_range]
        self.sinc_sizes = tuple(range(kr[0], kr[1] + 1, 2))

    # ------------------------------------------------------------------ sampling
    def sample_params(self, rng: np.random.Generator) -> Dict[str, Any]:
        sigma = float(self.sigmas[int(rng.integers(len(self.sigmas)))])
        kernel = None
        if sigma > 0:
            ktype = 'iso' if rng.uniform() < self.iso_prob else 'aniso'
            theta = 0.0 if ktype == 'iso' else float(rng.uniform(-math.pi, math.pi))
            kernel = {'type': ktype, 'size': 2 * math.ceil(3 * sigma) + 1, 'sigma_x': sigma, 'sigma_y': sigma,
                      'theta': theta}
        if rng.uniform() < self.gaussian_noise_prob:
            noise = {'kind': 'gaussian', 'sigma': float(rng.uniform(*self.noise_range)), 'gray': False}
        else:
            noise = {'kind': 'poisson', 'scale': float(rng.uniform(*self.poisson_scale_range)), 'gray': False}
        jpeg = int(rng.integers(self.jpeg_range[0], self.jpeg_range[1] + 1))
        sinc = None
        if rng.uniform() < self.final_sinc_prob:
            sinc = {'type': 'sinc', 'size': int(self.sinc_sizes[int(rng.integers(len(self.sinc_sizes)))]),
                    'omega': float(rng.uniform(*self.sinc_omega))}
        return {'sigma': sigma, 'kernel': kernel, 'noise': noise, 'jpeg': jpeg, 'sinc': sinc, 'chain': self.chain,
                'lq_size': self.lq_size, 'scale': self.scale, 'noise_seed': int(rng.integers(0, 2 ** 62))}

    # ------------------------------------------------------------------ applying
    def apply(self, gt: np.ndarray, params: Dict[str, Any]) -> np.ndarray:
        """Degrade ``gt`` (HxWx3 float32 RGB [0,1]) exactly as ``params`` says -> LQ float32 RGB."""
        rng = np.random.default_rng(int(params['noise_seed']))
        img = np.ascontiguousarray(gt[:, :, ::-1], dtype=np.float32)  # BGR inside (OpenCV JPEG)
        kern = _deg.kernel_from_params(params['kernel']) if params['kernel'] else None

        def blur(x):
            return _deg._filter(x, kern) if kern is not None else x

        out = _deg._add_noise(blur(img), params['noise'], rng)
        if params['chain'] == 'two_order':
            out = _deg._add_noise(blur(out), params['noise'], rng)
        out = _deg._jpeg(np.clip(out, 0, 1), int(params['jpeg']))
        if params['sinc']:
            out = _deg._filter(out, _deg.kernel_from_params(params['sinc']))
        H, W = out.shape[:2]
        if params.get('lq_size'):
            h = w = int(params['lq_size'])
        else:
            h, w = H // int(params['scale']), W // int(params['scale'])
        if (h, w) != (H, W):
            out = cv2.resize(out, (w, h), interpolation=cv2.INTER_CUBIC)
        lq = np.rint(np.clip(out, 0, 1) * 255.0) * np.float32(1 / 255.0)
        return np.ascontiguousarray(lq[:, :, ::-1], dtype=np.float32)

    def __call__(self, gt: np.ndarray, rng: np.random.Generator) -> Dict[str, Any]:
        if not isinstance(gt, np.ndarray) or gt.ndim != 3 or gt.shape[2] != 3:
            raise ValueError(f"gt must be an HxWx3 array, got {getattr(gt, 'shape', type(gt))}")
        params = self.sample_params(rng)
        return {'gt': gt, 'lq': self.apply(gt, params), 'params': params, 'captions': captions_from_params(params)}
