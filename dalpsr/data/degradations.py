"""The Real-ESRGAN second-order degradation, fast (numpy + OpenCV) and fully recorded.

:class:`RealESRGANDegradation` turns an HR patch into its LR counterpart with the pipeline of
Real-ESRGAN (``RealESRNetModel.feed_data`` order) and the parameters of
``train_realesrnet_x4plus.yml`` as defaults (every value is an overridable keyword)::

    [USM sharpen GT]  (``gt_usm``, default on as in x4plus: the LR is made from the sharpened GT)
    order 1:  blur k1 (prob blur_prob) -> resize up/down/keep (x r1) -> noise -> JPEG
    order 2:  blur k2 (prob second_blur_prob) -> resize to (H/scale*r2, W/scale*r2) -> noise
    final  :  either [resize to H/scale + sinc (prob final_sinc_prob)] -> JPEG
              or     JPEG -> [resize to H/scale + sinc]            (50/50, final_order_prob)
    LR = round(clip(out) * 255) / 255

Training targets follow Real-ESRGAN's ``RealESRGANModel``: ``l1_gt_usm`` / ``percep_gt_usm`` /
``gan_gt_usm`` choose, per loss, the sharpened GT or the GT as read (x4plus: true / true / false);
``__call__`` returns them as ``gt`` (the L1 / main-loss target), ``gt_percep`` and ``gt_gan``.

The work is split in two so that degradation *degrees* can be computed from parameters alone:

* :meth:`RealESRGANDegradation.sample_params` draws every random choice from a numpy
  ``Generator`` into a JSON-serialisable dict (kernel type/size/sigmas/angle/betas/omega,
  resize direction/scale/mode, noise kind/level/gray, JPEG qualities, final order, and the
  seed of the noise realisation).
* :meth:`RealESRGANDegradation.apply` is a deterministic function of ``(gt, params)``.
* With ``measure_noise=True`` the transform also renders the same chain without the two noise
  stages and records ``params['measured'] = {'noise_rms': ...}``: the RMS (8-bit levels) of
  ``lq - lq_without_noise``, the noise that survived every later filter, resize, JPEG and the
  clipping in this very image (a measurement, ignored by :meth:`apply`; used by the
  ``noise_severity: measured`` labels of :mod:`dalpsr.data.prompt_labels`).

Differences from the reference implementation (documented in docs/degradation.md):
images are processed one at a time with ``cv2.filter2D`` (reflect-101 border, identical to
basicsr's ``filter2D``), kernels are used at their sampled size instead of zero-padded to 21
(same result), resizing *is* ``torch.nn.functional.interpolate`` (the reference's own op, called
on one CPU image; the first-order resize passes ``scale_factor`` as feed_data does), the GT is
sharpened per crop (Real-ESRGAN sharpens the 400 px patch before its crop), and JPEG is
OpenCV's libjpeg with an integer quality (basicsr's DiffJPEG takes a float quality; its numpy
helper crashes on floats).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import cv2
import numpy as np

from dalpsr.utils.registry import TRANSFORM_REGISTRY

KERNEL_TYPES = ('iso', 'aniso', 'generalized_iso', 'generalized_aniso', 'plateau_iso', 'plateau_aniso')
RESIZE_MODES = ('area', 'bilinear', 'bicubic')
#: Luma weights (ITU-R 601, as torchvision ``rgb_to_grayscale``) for gray noise.
_GRAY_W = np.array([0.299, 0.587, 0.114], dtype=np.float32)

# --------------------------------------------------------------------------------------------
# kernels (same formulas as basicsr.data.degradations; tests compare them numerically)
# --------------------------------------------------------------------------------------------


def _grid(size: int) -> Tuple[np.ndarray, np.ndarray]:
    ax = np.arange(-(size // 2), size // 2 + 1, dtype=np.float64)
    xx, yy = np.meshgrid(ax, ax)
    return xx, yy


def _quad_form(size: int, sig_x: float, sig_y: float, theta: float) -> np.ndarray:
    """x^T Sigma^-1 x on the kernel grid, Sigma = R diag(sx^2, sy^2) R^T."""
    xx, yy = _grid(size)
    c, s = math.cos(theta), math.sin(theta)
    # coordinates in the rotated frame: u = R^T x
    u = c * xx + s * yy
    v = -s * xx + c * yy
    return u * u / (sig_x * sig_x) + v * v / (sig_y * sig_y)


def gaussian_family_kernel(ktype: str, size: int, sigma_x: float, sigma_y: float, theta: float,
                           beta: float = 1.0) -> np.ndarray:
    """A normalised (size x size) float64 blur kernel of one of :data:`KERNEL_TYPES`.

    ``*_iso`` types use ``sigma_x`` only (``sigma_y`` and ``theta`` ignored). ``theta`` in
    radians; ``beta`` is the shape of generalized Gaussian (exp(-0.5 q^beta)) and plateau
    (1 / (1 + q^beta)) kernels, q = x^T Sigma^-1 x.
    """
    if ktype not in KERNEL_TYPES:
        raise ValueError(f"unknown kernel type '{ktype}' (known: {', '.join(KERNEL_TYPES)})")
    if ktype.endswith('iso') and not ktype.endswith('aniso'):
        sigma_y, theta = sigma_x, 0.0
    q = _quad_form(size, sigma_x, sigma_y, theta)
    if ktype in ('iso', 'aniso'):
        k = np.exp(-0.5 * q)
    elif ktype.startswith('generalized'):
        k = np.exp(-0.5 * np.power(q, beta))
    else:
        k = 1.0 / (np.power(q, beta) + 1.0)
    return k / k.sum()


def sinc_kernel(omega: float, size: int) -> np.ndarray:
    """Circular low-pass (2-D sinc / jinc) kernel with cutoff ``omega`` rad/pixel, normalised."""
    from scipy import special
    xx, yy = _grid(size)
    r = np.sqrt(xx * xx + yy * yy)
    with np.errstate(divide='ignore', invalid='ignore'):
        k = omega * special.j1(omega * r) / (2 * np.pi * r)
    c = size // 2
    k[c, c] = omega ** 2 / (4 * np.pi)
    return k / k.sum()


def kernel_from_params(kp: Dict[str, Any]) -> np.ndarray:
    """Build the kernel described by a recorded kernel dict (see ``sample_params``)."""
    if kp['type'] == 'sinc':
        return sinc_kernel(kp['omega'], kp['size'])
    return gaussian_family_kernel(kp['type'], kp['size'], kp['sigma_x'], kp['sigma_y'], kp['theta'],
                                  kp.get('beta', 1.0))


# --------------------------------------------------------------------------------------------
# image operations (HxWxC float32, BGR channel order inside the pipeline)
# --------------------------------------------------------------------------------------------


def _filter(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return cv2.filter2D(img, -1, kernel.astype(np.float32), borderType=cv2.BORDER_REFLECT_101)


def _resize(img: np.ndarray, h: int, w: int, mode: str, scale_factor: Optional[float] = None) -> np.ndarray:
    """``torch.nn.functional.interpolate`` (what Real-ESRGAN's ``feed_data`` calls) on one HxWxC
    image: ``area`` is adaptive average pooling (integer windows, not OpenCV's fractional-area
    weights), ``bilinear`` / ``bicubic`` use half-pixel centres without antialias (bicubic
    A = -0.75). With ``scale_factor`` (the first-order resize, ``F.interpolate(scale_factor=s)``)
    source coordinates are ``(x + 0.5) / s - 0.5`` as torch computes them, not the in/out size
    ratio; the output size is then ``floor(H * s)`` (``h``, ``w``). Same size, no factor: returned as is."""
    h, w = max(1, int(h)), max(1, int(w))
    if img.shape[0] == h and img.shape[1] == w and scale_factor in (None, 1.0):
        return img  # (a factor like 1.003 keeps the size but still moves bicubic samples, as in torch)
    import torch
    import torch.nn.functional as F
    t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]
    with torch.no_grad():
        if scale_factor is not None and math.floor(img.shape[0] * scale_factor) == h \
                and math.floor(img.shape[1] * scale_factor) == w:
            out = F.interpolate(t, scale_factor=float(scale_factor), mode=mode)
        else:  # a size-based resize, or a factor that would give an empty image (clamped to 1 pixel)
            out = F.interpolate(t, size=(h, w), mode=mode)
    return np.ascontiguousarray(out[0].numpy().transpose(1, 2, 0))


def _add_noise(img: np.ndarray, noise: Dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    if noise['kind'] == 'gaussian':
        s = np.float32(noise['sigma'] / 255.0)
        if noise['gray']:
            n = rng.standard_normal((h, w), dtype=np.float32) * s
            out = img + n[:, :, None]
        else:
            out = img + rng.standard_normal((h, w, 3), dtype=np.float32) * s
    else:  # poisson, as basicsr: counts on the 8-bit-rounded image, vals = 2**ceil(log2(#levels))
        src = img @ _GRAY_W[::-1] if noise['gray'] else img  # BGR order inside the pipeline
        q = np.clip(np.rint(src * 255.0), 0, 255).astype(np.uint8)
        levels = int(np.count_nonzero(np.bincount(q.ravel(), minlength=256)))
        vals = float(2 ** math.ceil(math.log2(max(levels, 1)))) if levels > 1 else 1.0
        qf = q.astype(np.float32) * np.float32(1 / 255.0)
        n = (rng.poisson(qf * vals).astype(np.float32) / np.float32(vals) - qf) * np.float32(noise['scale'])
        out = img + (n[:, :, None] if noise['gray'] else n)
    return np.clip(out, 0.0, 1.0, out=out)


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    u8 = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode('.jpg', u8, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:  # pragma: no cover
        raise RuntimeError('JPEG encoding failed')
    return cv2.imdecode(buf, cv2.IMREAD_COLOR).astype(np.float32) * np.float32(1 / 255.0)


def usm_sharp(img: np.ndarray, weight: float = 0.5, radius: int = 50, threshold: float = 10) -> np.ndarray:
    """Unsharp masking as basicsr's ``USMSharp`` (Gaussian of odd size ``radius``, sigma from
    OpenCV's rule, soft mask where |residual| * 255 > threshold). HxWxC float32 in [0, 1]."""
    if radius % 2 == 0:
        radius += 1
    k1 = cv2.getGaussianKernel(radius, 0)
    blur = cv2.sepFilter2D(img, -1, k1, k1, borderType=cv2.BORDER_REFLECT_101)
    residual = img - blur
    mask = (np.abs(residual) * 255 > threshold).astype(np.float32)
    soft = cv2.sepFilter2D(mask, -1, k1, k1, borderType=cv2.BORDER_REFLECT_101)
    if soft.ndim == 2:
        soft = soft[:, :, None]
    sharp = np.clip(img + weight * residual, 0, 1)
    return (soft * sharp + (1 - soft) * img).astype(np.float32)


# --------------------------------------------------------------------------------------------
# the transform
# --------------------------------------------------------------------------------------------

_PI = math.pi


@TRANSFORM_REGISTRY.register()
class RealESRGANDegradation:
    """Real-ESRGAN second-order degradation with every random choice recorded.

    Defaults are ``train_realesrnet_x4plus.yml`` (REFERENCE.md section 3); keys ending in ``2``
    are the second order. Ranges are ``[low, high]`` (uniform). Sigmas of blur kernels are in
    pixels of the image the kernel is applied to, noise sigmas in 8-bit units, sinc cut-offs
    (omega) in radians per pixel, JPEG qualities are integers drawn uniformly from the range.

    ``__call__(gt, rng)``: gt HxWx3 float32 RGB in [0, 1] (H, W >= 2*scale; cropped at the
    bottom/right to a multiple of ``scale``) -> ``dict(gt, gt_percep, gt_gan (HxWx3: the targets
    of the L1 / perceptual / GAN losses, each the USM-sharpened GT or the GT as read per
    ``l1_gt_usm`` / ``percep_gt_usm`` / ``gan_gt_usm``; shared arrays), lq=(H/scale)x(W/scale)x3
    float32 in [0, 1] on the 8-bit grid, params=dict)``. Deterministic given ``rng``.

    ``gt_usm``: the LR is made from the USM-sharpened GT (Real-ESRGAN: always in
    ``RealESRGANModel``, ``gt_usm: True`` in train_realesrnet_x4plus.yml). USM is basicsr's
    ``USMSharp`` (``usm_weight``, ``usm_radius``, ``usm_threshold``).

    ``measure_noise``: also record ``params['measured']['noise_rms']`` (module doc; the chain
    after the first resize is rendered twice, ~+30 % time).
    """

    def __init__(self, scale: int = 4, gt_usm: bool = True, l1_gt_usm: bool = True, percep_gt_usm: bool = True,
                 gan_gt_usm: bool = False, usm_weight: float = 0.5, usm_radius: int = 50,
                 usm_threshold: float = 10.0, kernel_range: Sequence[int] = (7, 21),
                 # first order
                 blur_prob: float = 1.0, kernel_list: Sequence[str] = KERNEL_TYPES,
                 kernel_prob: Sequence[float] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
                 sinc_prob: float = 0.1, blur_sigma: Sequence[float] = (0.2, 3.0),
                 betag_range: Sequence[float] = (0.5, 4.0), betap_range: Sequence[float] = (1.0, 2.0),
                 resize_prob: Sequence[float] = (0.2, 0.7, 0.1), resize_range: Sequence[float] = (0.15, 1.5),
                 gaussian_noise_prob: float = 0.5, noise_range: Sequence[float] = (1.0, 30.0),
                 poisson_scale_range: Sequence[float] = (0.05, 3.0), gray_noise_prob: float = 0.4,
                 jpeg_range: Sequence[int] = (30, 95),
                 # second order
                 second_blur_prob: float = 0.8, kernel_list2: Sequence[str] = KERNEL_TYPES,
                 kernel_prob2: Sequence[float] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
                 sinc_prob2: float = 0.1, blur_sigma2: Sequence[float] = (0.2, 1.5),
                 betag_range2: Sequence[float] = (0.5, 4.0), betap_range2: Sequence[float] = (1.0, 2.0),
                 resize_prob2: Sequence[float] = (0.3, 0.4, 0.3), resize_range2: Sequence[float] = (0.3, 1.2),
                 gaussian_noise_prob2: float = 0.5, noise_range2: Sequence[float] = (1.0, 25.0),
                 poisson_scale_range2: Sequence[float] = (0.05, 2.5), gray_noise_prob2: float = 0.4,
                 jpeg_range2: Sequence[int] = (30, 95),
                 # final stage
                 final_sinc_prob: float = 0.8, final_sinc_omega: Sequence[float] = (_PI / 3, _PI),
                 sinc_omega_small: Sequence[float] = (_PI / 3, _PI), sinc_omega_large: Sequence[float] = (_PI / 5, _PI),
                 final_order_prob: float = 0.5, resize_modes: Sequence[str] = RESIZE_MODES,
                 measure_noise: bool = False):
        def rng2(name, v, lo=-math.inf, hi=math.inf):
            v = [float(x) for x in v]
            if len(v) != 2 or not (lo <= v[0] <= v[1] <= hi):
                raise ValueError(f"degradation option '{name}' must be [low, high] with {lo} <= low <= high <= {hi}, got {v}")
            return tuple(v)

        def prob(name, p):
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"degradation option '{name}' must be a probability in [0, 1], got {p}")
            return float(p)

        def probs(name, p, n):
            p = [float(x) for x in p]
            if len(p) != n or min(p) < 0 or sum(p) <= 0:
                raise ValueError(f"degradation option '{name}' must be {n} non-negative weights, got {p}")
            return tuple(x / sum(p) for x in p)

        def klist(name, ks):
            ks = tuple(ks)
            bad = [k for k in ks if k not in KERNEL_TYPES]
            if bad:
                raise ValueError(f"degradation option '{name}': unknown kernel type(s) {bad} (known: {', '.join(KERNEL_TYPES)})")
            return ks

        if int(scale) < 1:
            raise ValueError(f"degradation option 'scale' must be a positive integer, got {scale}")
        self.scale = int(scale)
        for name, v in (('gt_usm', gt_usm), ('l1_gt_usm', l1_gt_usm), ('percep_gt_usm', percep_gt_usm),
                        ('gan_gt_usm', gan_gt_usm)):
            if not isinstance(v, (bool, np.bool_)):
                raise ValueError(f"degradation option '{name}' must be true or false, got {v!r}")
        self.gt_usm = bool(gt_usm)
        #: which GT each loss trains against: True = the USM-sharpened GT, False = the GT as read
        self.target_usm = {'l1': bool(l1_gt_usm), 'percep': bool(percep_gt_usm), 'gan': bool(gan_gt_usm)}
        if int(usm_radius) < 1 or float(usm_weight) < 0:
            raise ValueError(f"degradation options 'usm_radius' (>= 1) / 'usm_weight' (>= 0) out of range: "
                             f"{usm_radius}, {usm_weight}")
        self.usm_weight, self.usm_radius, self.usm_threshold = float(usm_weight), int(usm_radius), float(usm_threshold)
        kr = [int(x) for x in kernel_range]
        if len(kr) != 2 or kr[0] < 1 or kr[0] > kr[1] or kr[0] % 2 == 0 or kr[1] % 2 == 0:
            raise ValueError(f"degradation option 'kernel_range' must be [min_odd, max_odd], got {list(kernel_range)}")
        self.kernel_sizes = tuple(range(kr[0], kr[1] + 1, 2))
        self.resize_modes = tuple(resize_modes)
        if not self.resize_modes or any(m not in RESIZE_MODES for m in self.resize_modes):
            raise ValueError(f"degradation option 'resize_modes' must be a non-empty subset of {list(RESIZE_MODES)}")
        self.orders = []
        for i, sfx in ((1, ''), (2, '2')):
            L = locals()
            kl = klist('kernel_list' + sfx, L['kernel_list' + sfx])
            self.orders.append(dict(
                blur_prob=prob('blur_prob' if i == 1 else 'second_blur_prob', L['blur_prob' if i == 1 else 'second_blur_prob']),
                kernel_list=kl, kernel_prob=probs('kernel_prob' + sfx, L['kernel_prob' + sfx], len(kl)),
                sinc_prob=prob('sinc_prob' + sfx, L['sinc_prob' + sfx]),
                blur_sigma=rng2('blur_sigma' + sfx, L['blur_sigma' + sfx], 1e-3),
                betag_range=rng2('betag_range' + sfx, L['betag_range' + sfx], 1e-3),
                betap_range=rng2('betap_range' + sfx, L['betap_range' + sfx], 1e-3),
                resize_prob=probs('resize_prob' + sfx, L['resize_prob' + sfx], 3),
                resize_range=rng2('resize_range' + sfx, L['resize_range' + sfx], 1e-3),
                gaussian_noise_prob=prob('gaussian_noise_prob' + sfx, L['gaussian_noise_prob' + sfx]),
                noise_range=rng2('noise_range' + sfx, L['noise_range' + sfx], 0),
                poisson_scale_range=rng2('poisson_scale_range' + sfx, L['poisson_scale_range' + sfx], 0),
                gray_noise_prob=prob('gray_noise_prob' + sfx, L['gray_noise_prob' + sfx]),
                jpeg_range=tuple(int(round(x)) for x in rng2('jpeg_range' + sfx, L['jpeg_range' + sfx], 1, 100)),
            ))
        self.final_sinc_prob = prob('final_sinc_prob', final_sinc_prob)
        self.final_sinc_omega = rng2('final_sinc_omega', final_sinc_omega, 1e-3, _PI)
        self.sinc_omega_small = rng2('sinc_omega_small', sinc_omega_small, 1e-3, _PI)
        self.sinc_omega_large = rng2('sinc_omega_large', sinc_omega_large, 1e-3, _PI)
        self.final_order_prob = prob('final_order_prob', final_order_prob)
        self.measure_noise = bool(measure_noise)

    # ---------------------------------------------------------------- sampling
    @staticmethod
    def _uniform(rng, r):
        return float(rng.uniform(r[0], r[1])) if r[1] > r[0] else float(r[0])

    def _sample_kernel(self, rng, o) -> Dict[str, Any]:
        size = int(rng.choice(self.kernel_sizes))
        if rng.uniform() < o['sinc_prob']:
            r = self.sinc_omega_small if size < 13 else self.sinc_omega_large
            return {'type': 'sinc', 'size': size, 'omega': self._uniform(rng, r)}
        ktype = o['kernel_list'][int(rng.choice(len(o['kernel_list']), p=o['kernel_prob']))]
        sx = self._uniform(rng, o['blur_sigma'])
        if ktype.endswith('aniso'):
            sy = self._uniform(rng, o['blur_sigma'])
            theta = float(rng.uniform(-_PI, _PI))
        else:
            sy, theta = sx, 0.0
        kp = {'type': ktype, 'size': size, 'sigma_x': sx, 'sigma_y': sy, 'theta': theta}
        if ktype.startswith(('generalized', 'plateau')):
            br = o['betag_range'] if ktype.startswith('generalized') else o['betap_range']
            # as basicsr: half the time below 1, half above (when the range straddles 1)
            if rng.uniform() < 0.5:
                kp['beta'] = self._uniform(rng, (br[0], min(1.0, br[1])))
            else:
                kp['beta'] = self._uniform(rng, (max(1.0, br[0]), br[1]))
        return kp

    def _sample_noise(self, rng, o) -> Dict[str, Any]:
        if rng.uniform() < o['gaussian_noise_prob']:
            n = {'kind': 'gaussian', 'sigma': self._uniform(rng, o['noise_range'])}
        else:
            n = {'kind': 'poisson', 'scale': self._uniform(rng, o['poisson_scale_range'])}
        n['gray'] = bool(rng.uniform() < o['gray_noise_prob'])
        return n

    def _sample_resize(self, rng, o) -> Dict[str, Any]:
        updown = ('up', 'down', 'keep')[int(rng.choice(3, p=o['resize_prob']))]
        if updown == 'up':
            s = self._uniform(rng, (1.0, o['resize_range'][1]))
        elif updown == 'down':
            s = self._uniform(rng, (o['resize_range'][0], 1.0))
        else:
            s = 1.0
        return {'updown': updown, 'scale': s, 'mode': self.resize_modes[int(rng.integers(len(self.resize_modes)))]}

    def sample_params(self, rng: np.random.Generator) -> Dict[str, Any]:
        """Draw every random choice of one sample (JSON-serialisable dict, no image needed)."""
        p: Dict[str, Any] = {'scale': self.scale, 'gt_usm': self.gt_usm}
        for i, o in enumerate(self.orders, 1):
            blur = bool(rng.uniform() < o['blur_prob'])
            st = {'blur': self._sample_kernel(rng, o) if blur else None,
                  'resize': self._sample_resize(rng, o),
                  'noise': self._sample_noise(rng, o),
                  'jpeg': int(rng.integers(o['jpeg_range'][0], o['jpeg_range'][1] + 1)) if i == 1 else None}
            if i == 2:
                del st['jpeg']
            p[f'order{i}'] = st
        sinc = None
        if rng.uniform() < self.final_sinc_prob:
            sinc = {'type': 'sinc', 'size': int(rng.choice(self.kernel_sizes)),
                    'omega': self._uniform(rng, self.final_sinc_omega)}
        o2 = self.orders[1]
        p['final'] = {
            'order': 'resize_sinc_jpeg' if rng.uniform() < self.final_order_prob else 'jpeg_resize_sinc',
            'resize_mode': self.resize_modes[int(rng.integers(len(self.resize_modes)))],
            'sinc': sinc,
            'jpeg': int(rng.integers(o2['jpeg_range'][0], o2['jpeg_range'][1] + 1)),
        }
        p['noise_seed'] = int(rng.integers(0, 2 ** 62))
        return p

    # ---------------------------------------------------------------- applying
    def sharpen(self, gt: np.ndarray) -> np.ndarray:
        """The USM-sharpened GT (``usm_weight`` / ``usm_radius`` / ``usm_threshold``), HxWx3 float32."""
        return usm_sharp(np.ascontiguousarray(gt, dtype=np.float32), self.usm_weight, self.usm_radius,
                         self.usm_threshold)

    def targets(self, gt: np.ndarray, gt_sharp: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
        """``{'l1', 'percep', 'gan'}``: the GT each loss trains against (Real-ESRGAN's
        ``l1_gt_usm`` / ``percep_gt_usm`` / ``gan_gt_usm``); the arrays are shared, not copied."""
        if gt_sharp is None and any(self.target_usm.values()):
            gt_sharp = self.sharpen(gt)
        return {k: (gt_sharp if usm else gt) for k, usm in self.target_usm.items()}

    def apply(self, gt: np.ndarray, params: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray]:
        """Degrade ``gt`` (HxWx3 float32 RGB [0,1], H and W multiples of ``params['scale']``)
        exactly as ``params`` says (the LR is made from the USM-sharpened GT when
        ``params['gt_usm']``). Returns ``(l1_target, lq)``: the GT of the L1 / main loss
        (sharpened iff ``l1_gt_usm``) and the (H/scale)x(W/scale)x3 float32 RGB LR on the 8-bit grid."""
        sharp, lqs = self._render(gt, params, with_clean=False)
        return self.targets(gt, sharp)['l1'], lqs[0]

    def apply_measured(self, gt: np.ndarray, params: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray, float]:
        """As :meth:`apply`, plus the RMS (8-bit levels) of ``lq`` minus the same chain rendered
        without its two noise stages: ``(l1_target, lq, noise_rms)``."""
        sharp, (lq, clean) = self._render(gt, params, with_clean=True)
        return self.targets(gt, sharp)['l1'], lq, float(np.sqrt(np.mean(np.square(lq - clean, dtype=np.float64))) * 255.0)

    def _render(self, gt: np.ndarray, params: Dict[str, Any], with_clean: bool):
        """(sharpened gt or None, [lq] or [lq, lq_without_noise]); the two LRs share everything up
        to the first noise."""
        scale = int(params['scale'])
        H, W = gt.shape[:2]
        if H % scale or W % scale:
            raise ValueError(f"gt size {H}x{W} is not a multiple of scale {scale}")
        rng = np.random.default_rng(int(params['noise_seed']))
        sharp = None
        if params.get('gt_usm'):  # Real-ESRGAN degrades the sharpened GT (feed_data: filter2D(self.gt_usm, ...))
            sharp = self.sharpen(gt)
            img = np.ascontiguousarray(sharp[:, :, ::-1])  # BGR inside (OpenCV JPEG)
        else:
            img = np.ascontiguousarray(gt[:, :, ::-1], dtype=np.float32)
        o1, o2, fin = params['order1'], params['order2'], params['final']
        h, w = H // scale, W // scale
        # ---- order 1 up to its noise (shared by the noisy and the clean stream)
        out = _filter(img, kernel_from_params(o1['blur'])) if o1['blur'] else img
        s1 = o1['resize']['scale']
        out = _resize(out, math.floor(H * s1), math.floor(W * s1), o1['resize']['mode'], scale_factor=s1)

        def rest(out, noisy):
            # the clean stream keeps the clipping that comes with each noise stage
            out = _add_noise(out, o1['noise'], rng) if noisy else np.clip(out, 0.0, 1.0)
            out = _jpeg(out, o1['jpeg'])
            # ---- order 2
            if o2['blur']:
                out = _filter(out, kernel_from_params(o2['blur']))
            s2 = o2['resize']['scale']
            out = _resize(out, int(H / scale * s2), int(W / scale * s2), o2['resize']['mode'])
            out = _add_noise(out, o2['noise'], rng) if noisy else np.clip(out, 0.0, 1.0)

            # ---- final
            def resize_sinc(x):
                x = _resize(x, h, w, fin['resize_mode'])
                return _filter(x, kernel_from_params(fin['sinc'])) if fin['sinc'] else x

            if fin['order'] == 'resize_sinc_jpeg':
                out = _jpeg(np.clip(resize_sinc(out), 0, 1), fin['jpeg'])
            else:
                out = resize_sinc(_jpeg(out, fin['jpeg']))
            lq = np.rint(np.clip(out, 0, 1) * 255.0) * np.float32(1 / 255.0)
            return np.ascontiguousarray(lq[:, :, ::-1], dtype=np.float32)

        lqs = [rest(out, True)]
        if with_clean:
            lqs.append(rest(out, False))
        return sharp, lqs

    def __call__(self, gt: np.ndarray, rng: np.random.Generator) -> Dict[str, Any]:
        if not isinstance(gt, np.ndarray) or gt.ndim != 3 or gt.shape[2] != 3:
            raise ValueError(f"gt must be an HxWx3 array, got {getattr(gt, 'shape', type(gt))}")
        H, W = (gt.shape[0] // self.scale) * self.scale, (gt.shape[1] // self.scale) * self.scale
        if H < 2 * self.scale or W < 2 * self.scale:
            raise ValueError(f"gt of size {gt.shape[0]}x{gt.shape[1]} is too small for scale {self.scale} "
                             f"(needs at least {2 * self.scale}x{2 * self.scale})")
        gt = np.ascontiguousarray(gt[:H, :W], dtype=np.float32)
        params = self.sample_params(rng)
        sharp, lqs = self._render(gt, params, with_clean=self.measure_noise)
        if self.measure_noise:
            params['measured'] = {'noise_rms': float(np.sqrt(np.mean(np.square(lqs[0] - lqs[1], dtype=np.float64))) * 255.0)}
        t = self.targets(gt, sharp)
        return {'gt': t['l1'], 'gt_percep': t['percep'], 'gt_gan': t['gan'], 'lq': lqs[0], 'params': params}
