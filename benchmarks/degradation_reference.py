"""Real-ESRGAN's second-order degradation assembled from basicsr's own functions (the reference).

Shared by ``benchmarks/bench_degradation.py`` (speed, label histograms),
``benchmarks/bench_degradation_ks.py`` (distributions of LR statistics) and
``tests/test_degradation_reference.py`` (the whole chain, same recorded parameters).

:class:`BasicsrReference` is ``RealESRGANDataset.__getitem__`` (kernel1 / kernel2 with
``random_mixed_kernels`` or ``circular_lowpass_kernel``, zero-padded to 21; final sinc kernel or a
21x21 pulse) followed by ``RealESRGANModel.feed_data`` (USMSharp of the GT when ``gt_usm`` ->
filter2D -> random resize (``F.interpolate(scale_factor=s)``) -> Gaussian / Poisson noise
(``random_add_*_noise_pt``) -> DiffJPEG -> second blur w.p. -> resize -> noise -> final
[resize + sinc, DiffJPEG] or [DiffJPEG, resize + sinc], 50/50 -> round to 8 bits), with the
parameters of train_realesrnet_x4plus.yml (REFERENCE.md section 3). Randomness: Python's
``random``, ``np.random`` and torch's global generator, as in Real-ESRGAN.

:class:`Recorder` wraps basicsr's kernel and noise generators while the reference runs, so every
random choice is recorded in dalpsr's params format (``RealESRGANDegradation.sample_params``;
JPEG qualities stay floats, as DiffJPEG takes them) together with the noise tensors it added.
"""
from __future__ import annotations

import math
import random

import numpy as np

_PI = math.pi
RESIZE_MODES = ['area', 'bilinear', 'bicubic']


class Recorder:
    """Wrap basicsr's kernel and noise generators so the values they draw are recorded.

    ``calls``: ('kernel', dict) / ('noise', [dict per sample]) in call order (consumed by
    :meth:`pop`); ``noise_tensors``: the [B, 3, h, w] noise each noise stage added (before clipping)."""

    def __init__(self, deg_mod):
        self.mod = deg_mod
        self.calls = []
        self.noise_tensors = []
        self._orig = {}

    def __enter__(self):
        m = self.mod
        for name, ktype in (('bivariate_Gaussian', ''), ('bivariate_generalized_Gaussian', 'generalized_'),
                            ('bivariate_plateau', 'plateau_')):
            self._orig[name] = getattr(m, name)
            setattr(m, name, self._wrap_kernel(self._orig[name], ktype))
        for name, kind in (('generate_gaussian_noise_pt', 'gaussian'), ('generate_poisson_noise_pt', 'poisson')):
            self._orig[name] = getattr(m, name)
            setattr(m, name, self._wrap_noise(self._orig[name], kind))
        return self

    def __exit__(self, *exc):
        for name, f in self._orig.items():
            setattr(self.mod, name, f)
        self._orig = {}

    def _wrap_kernel(self, f, prefix):
        def wrapped(kernel_size, sig_x, sig_y, theta, *args, isotropic=True, **kw):
            beta = args[0] if args else kw.get('beta')
            rec = {'type': prefix + ('iso' if isotropic else 'aniso'), 'size': int(kernel_size),
                   'sigma_x': float(sig_x), 'sigma_y': float(sig_y), 'theta': float(theta)}
            if beta is not None:
                rec['beta'] = float(beta)
            self.calls.append(('kernel', rec))
            return f(kernel_size, sig_x, sig_y, theta, *args, isotropic=isotropic, **kw)
        return wrapped

    def _wrap_noise(self, f, kind):
        def wrapped(img, level, gray):
            lv, g = level.detach().cpu().tolist(), gray.detach().cpu().tolist()
            self.calls.append(('noise', [{'kind': kind, ('sigma' if kind == 'gaussian' else 'scale'): float(a),
                                          'gray': bool(b > 0)} for a, b in zip(lv, g)]))
            noise = f(img, level, gray)
            self.noise_tensors.append(noise.detach().cpu())
            return noise
        return wrapped

    def pop(self, what):
        kind, val = self.calls.pop(0)
        assert kind == what, (kind, what)
        return val


class BasicsrReference:
    """Real-ESRGAN's dataset-side kernel sampling + ``feed_data``, from basicsr's functions.

    ``gt_usm``: degrade the USMSharp-ened GT (RealESRGANModel always does; x4plus ``gt_usm: True``).
    ``run_batch(crops, rec)`` -> ``(lq [B,3,h,w] tensor, [params dict per crop])``."""

    kernel_list = ['iso', 'aniso', 'generalized_iso', 'generalized_aniso', 'plateau_iso', 'plateau_aniso']
    kernel_prob = [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]

    def __init__(self, device='cpu', scale=4, gt_usm=True):
        import torch
        from dalpsr.utils.basicsr_compat import basicsr_degradations, basicsr_diffjpeg, basicsr_img_process
        self.torch = torch
        self.deg = basicsr_degradations()
        proc = basicsr_img_process()
        f2d = proc.filter2D
        # .contiguous(): on CPU, F.interpolate / DiffJPEG can return tensors that filter2D's
        # batched .view() rejects (batch > 1); a no-op for contiguous input
        self.filter2D = lambda x, k: f2d(x.contiguous(), k)
        self.jpeger = basicsr_diffjpeg().DiffJPEG(differentiable=False).to(device)
        self.usm_sharpener = proc.USMSharp().to(device)
        self.device = torch.device(device)
        self.scale = scale
        self.gt_usm = bool(gt_usm)
        self.kernel_range = [2 * v + 1 for v in range(3, 11)]  # 7..21
        self.pulse = torch.zeros(21, 21)
        self.pulse[10, 10] = 1
        self.o1 = dict(sinc_prob=0.1, blur_sigma=[0.2, 3], betag=[0.5, 4], betap=[1, 2])
        self.o2 = dict(sinc_prob=0.1, blur_sigma=[0.2, 1.5], betag=[0.5, 4], betap=[1, 2])

    @staticmethod
    def seed(seed: int) -> None:
        """Seed the three generators the reference draws from."""
        import torch
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    # RealESRGANDataset.__getitem__, kernel part
    def _kernel(self, o, rec: Recorder):
        size = random.choice(self.kernel_range)
        if np.random.uniform() < o['sinc_prob']:
            omega = np.random.uniform(_PI / 3, _PI) if size < 13 else np.random.uniform(_PI / 5, _PI)
            k = self.deg.circular_lowpass_kernel(omega, size, pad_to=False)
            kp = {'type': 'sinc', 'size': size, 'omega': float(omega)}
        else:
            k = self.deg.random_mixed_kernels(self.kernel_list, self.kernel_prob, size, o['blur_sigma'],
                                              o['blur_sigma'], [-_PI, _PI], o['betag'], o['betap'], noise_range=None)
            kp = rec.pop('kernel')
        pad = (21 - size) // 2
        return self.torch.FloatTensor(np.pad(k, ((pad, pad), (pad, pad)))), kp

    def sample_kernels(self, rec: Recorder):
        k1, kp1 = self._kernel(self.o1, rec)
        k2, kp2 = self._kernel(self.o2, rec)
        if np.random.uniform() < 0.8:
            size = random.choice(self.kernel_range)
            omega = np.random.uniform(_PI / 3, _PI)
            ks = self.torch.FloatTensor(self.deg.circular_lowpass_kernel(omega, size, pad_to=21))
            kps = {'type': 'sinc', 'size': size, 'omega': float(omega)}
        else:
            ks, kps = self.pulse, None
        return (k1, k2, ks), (kp1, kp2, kps)

    @staticmethod
    def _updown(resize_prob, resize_range):
        updown = random.choices(['up', 'down', 'keep'], resize_prob)[0]
        if updown == 'up':
            s = np.random.uniform(1, resize_range[1])
        elif updown == 'down':
            s = np.random.uniform(resize_range[0], 1)
        else:
            s = 1
        return updown, float(s)

    def _noise(self, out, gauss_range, poisson_range, rec: Recorder):
        if np.random.uniform() < 0.5:
            out = self.deg.random_add_gaussian_noise_pt(out, sigma_range=gauss_range, clip=True, rounds=False,
                                                        gray_prob=0.4)
        else:
            out = self.deg.random_add_poisson_noise_pt(out, scale_range=poisson_range, gray_prob=0.4, clip=True,
                                                       rounds=False)
        return out, rec.pop('noise')

    # RealESRGANModel.feed_data
    def feed_data(self, gt, kernels, rec: Recorder):
        torch, F = self.torch, self.torch.nn.functional
        k1, k2, ks = (k.to(self.device) for k in kernels)
        b = gt.shape[0]
        ori_h, ori_w = gt.size()[2:4]
        p = [{'scale': self.scale, 'gt_usm': self.gt_usm, 'order1': {}, 'order2': {}, 'final': {}} for _ in range(b)]
        if self.gt_usm:
            gt = self.usm_sharpener(gt)
        # first degradation
        out = self.filter2D(gt, k1)
        updown, s = self._updown([0.2, 0.7, 0.1], [0.15, 1.5])
        mode = random.choice(RESIZE_MODES)
        out = F.interpolate(out, scale_factor=s, mode=mode)
        out, noise1 = self._noise(out, [1, 30], [0.05, 3], rec)
        jpeg_p = out.new_zeros(out.size(0)).uniform_(30, 95)
        q1 = jpeg_p.tolist()
        out = torch.clamp(out, 0, 1)
        out = self.jpeger(out, quality=jpeg_p)
        for i in range(b):
            p[i]['order1'].update(resize={'updown': updown, 'scale': s, 'mode': mode}, noise=noise1[i], jpeg=q1[i])
        # second degradation
        blur2 = np.random.uniform() < 0.8
        if blur2:
            out = self.filter2D(out, k2)
        updown, s = self._updown([0.3, 0.4, 0.3], [0.3, 1.2])
        mode = random.choice(RESIZE_MODES)
        out = F.interpolate(out, size=(int(ori_h / self.scale * s), int(ori_w / self.scale * s)), mode=mode)
        out, noise2 = self._noise(out, [1, 25], [0.05, 2.5], rec)
        for i in range(b):
            p[i]['order2'].update(resize={'updown': updown, 'scale': s, 'mode': mode}, noise=noise2[i])
        # final: [resize + sinc, JPEG] or [JPEG, resize + sinc]
        size = (ori_h // self.scale, ori_w // self.scale)
        if np.random.uniform() < 0.5:
            order = 'resize_sinc_jpeg'
            mode = random.choice(RESIZE_MODES)
            out = F.interpolate(out, size=size, mode=mode)
            out = self.filter2D(out, ks)
            jpeg_p = out.new_zeros(out.size(0)).uniform_(30, 95)
            q2 = jpeg_p.tolist()
            out = torch.clamp(out, 0, 1)
            out = self.jpeger(out, quality=jpeg_p)
        else:
            order = 'jpeg_resize_sinc'
            jpeg_p = out.new_zeros(out.size(0)).uniform_(30, 95)
            q2 = jpeg_p.tolist()
            out = torch.clamp(out, 0, 1)
            out = self.jpeger(out, quality=jpeg_p)
            mode = random.choice(RESIZE_MODES)
            out = F.interpolate(out, size=size, mode=mode)
            out = self.filter2D(out, ks)
        lq = torch.clamp((out * 255.0).round(), 0, 255) / 255.
        for i in range(b):
            p[i]['final'].update(order=order, resize_mode=mode, jpeg=q2[i])
            p[i]['blur2'] = blur2
        return lq, p

    def run_batch(self, crops, rec: Recorder):
        """``crops``: list of HxWx3 float32 RGB [0,1] arrays of one size -> (lq tensor, params list)."""
        torch = self.torch
        ks, kps = zip(*[self.sample_kernels(rec) for _ in crops])
        gt = torch.stack([torch.from_numpy(np.ascontiguousarray(c.transpose(2, 0, 1))) for c in crops]).to(self.device)
        kernels = [torch.stack(x) for x in zip(*ks)]
        with torch.no_grad():  # RealESRGANModel.feed_data is @torch.no_grad()
            lq, params = self.feed_data(gt, kernels, rec)
        for pr, (kp1, kp2, kps_) in zip(params, kps):
            pr['order1']['blur'] = kp1
            pr['order2']['blur'] = kp2 if pr.pop('blur2') else None
            pr['final']['sinc'] = kps_
        return lq, params


def make_crops(n: int, size: int, seed: int):
    """``n`` random ``size`` crops (HxWx3 float32 RGB [0,1]) of the photos shipped in packages."""
    from dalpsr.data.sample_images import sample_image_paths
    from dalpsr.data.triplet_dataset import crop_and_augment
    from dalpsr.utils.img_io import read_image
    imgs = [read_image(p) for p in sample_image_paths('all')]
    rng = np.random.default_rng([seed, 7])
    return [crop_and_augment(imgs[i % len(imgs)], size, rng, use_hflip=False, use_rot=False)[0] for i in range(n)]
