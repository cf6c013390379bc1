#!/usr/bin/env python
"""Degradation throughput, 512 -> 128: dalpsr's RealESRGANDegradation vs a basicsr reference.

The reference is assembled from basicsr's own functions in Real-ESRGAN's order:
``RealESRGANDataset.__getitem__`` (kernel1 / kernel2 with ``random_mixed_kernels`` or
``circular_lowpass_kernel``, zero-padded to 21; final sinc kernel or a 21x21 pulse) followed by
``RealESRGANModel.feed_data`` (filter2D -> random resize (F.interpolate) -> Gaussian / Poisson
noise (``random_add_*_noise_pt``) -> DiffJPEG -> second blur w.p. -> resize -> noise -> final
[resize + sinc, DiffJPEG] or [DiffJPEG, resize + sinc], 50/50 -> round to 8 bits), with the
parameters of train_realesrnet_x4plus.yml (REFERENCE.md section 3), per sample (batch 1, as a data
loader item; ``--ref-batch B`` shares resize/mode/order choices within a batch as feed_data does).

Both run on the same pre-decoded 512 crops (no file I/O) with the same torch/OpenCV thread count.
The reference's random choices are recorded (its kernel and noise helpers are wrapped while it
runs) into dalpsr's params format, so the same degree function labels both: the histograms show
whether the two produce the same label distribution.

    python benchmarks/bench_degradation.py                          # 200 samples each, 1 thread
    python benchmarks/bench_degradation.py --num 500 --threads 2 --seed 0
    python benchmarks/bench_degradation.py --ref-batch 8 --device cuda   # reference on a GPU
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

_PI = math.pi


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument('--num', type=int, default=200, help='samples per pipeline (after 3 warm-up samples)')
    p.add_argument('--threads', type=int, default=1, help='torch and OpenCV threads (same for both)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--gt-size', type=int, default=512)
    p.add_argument('--ref-batch', type=int, default=1, help='reference batch size (choices shared per batch)')
    p.add_argument('--device', default='cpu', help='device of the reference (ours is numpy/OpenCV on CPU)')
    p.add_argument('--rounds', type=int, default=5, help='alternate the two pipelines this many times')
    p.add_argument('--skip-ref', action='store_true', help='only time our pipeline')
    return p.parse_args(argv)


def make_crops(n: int, size: int, seed: int):
    """``n`` random ``size`` crops (HxWx3 float32 RGB [0,1]) of the photos shipped in packages."""
    from dalpsr.data.sample_images import sample_image_paths
    from dalpsr.data.triplet_dataset import crop_and_augment
    from dalpsr.utils.img_io import read_image
    imgs = [read_image(p) for p in sample_image_paths('all')]
    rng = np.random.default_rng([seed, 7])
    return [crop_and_augment(imgs[i % len(imgs)], size, rng, use_hflip=False, use_rot=False)[0] for i in range(n)]


# ---------------------------------------------------------------------------------- reference

class Recorder:
    """Wrap basicsr's kernel and noise generators so the values they draw are recorded."""

    def __init__(self, deg_mod):
        self.mod = deg_mod
        self.calls = []
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
            return f(img, level, gray)
        return wrapped

    def pop(self, what):
        kind, val = self.calls.pop(0)
        assert kind == what, (kind, what)
        return val


class BasicsrReference:
    """Real-ESRGAN's dataset-side kernel sampling + feed_data, from basicsr's functions."""

    kernel_list = ['iso', 'aniso', 'generalized_iso', 'generalized_aniso', 'plateau_iso', 'plateau_aniso']
    kernel_prob = [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]

    def __init__(self, device='cpu', scale=4):
        import torch
        from dalpsr.utils.basicsr_compat import basicsr_degradations, basicsr_diffjpeg, basicsr_img_process
        self.torch = torch
        self.deg = basicsr_degradations()
        f2d = basicsr_img_process().filter2D
        # .contiguous(): on CPU, F.interpolate / DiffJPEG can return tensors that filter2D's
        # batched .view() rejects (batch > 1); a no-op for contiguous input
        self.filter2D = lambda x, k: f2d(x.contiguous(), k)
        self.jpeger = basicsr_diffjpeg().DiffJPEG(differentiable=False).to(device)
        self.device = torch.device(device)
        self.scale = scale
        self.kernel_range = [2 * v + 1 for v in range(3, 11)]  # 7..21
        self.pulse = torch.zeros(21, 21)
        self.pulse[10, 10] = 1
        self.o1 = dict(sinc_prob=0.1, blur_sigma=[0.2, 3], betag=[0.5, 4], betap=[1, 2])
        self.o2 = dict(sinc_prob=0.1, blur_sigma=[0.2, 1.5], betag=[0.5, 4], betap=[1, 2])

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

    # RealESRGANModel.feed_data (gt_usm off, as dalpsr's default)
    def feed_data(self, gt, kernels, rec: Recorder):
        torch, F = self.torch, self.torch.nn.functional
        k1, k2, ks = (k.to(self.device) for k in kernels)
        b = gt.shape[0]
        ori_h, ori_w = gt.size()[2:4]
        p = [{'scale': self.scale, 'gt_usm': False, 'order1': {}, 'order2': {}, 'final': {}} for _ in range(b)]
        # first degradation
        out = self.filter2D(gt, k1)
        updown, s = self._updown([0.2, 0.7, 0.1], [0.15, 1.5])
        mode = random.choice(['area', 'bilinear', 'bicubic'])
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
        mode = random.choice(['area', 'bilinear', 'bicubic'])
        out = F.interpolate(out, size=(int(ori_h / self.scale * s), int(ori_w / self.scale * s)), mode=mode)
        out, noise2 = self._noise(out, [1, 25], [0.05, 2.5], rec)
        for i in range(b):
            p[i]['order2'].update(resize={'updown': updown, 'scale': s, 'mode': mode}, noise=noise2[i])
        # final: [resize + sinc, JPEG] or [JPEG, resize + sinc]
        size = (ori_h // self.scale, ori_w // self.scale)
        if np.random.uniform() < 0.5:
            order = 'resize_sinc_jpeg'
            mode = random.choice(['area', 'bilinear', 'bicubic'])
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
            mode = random.choice(['area', 'bilinear', 'bicubic'])
            out = F.interpolate(out, size=size, mode=mode)
            out = self.filter2D(out, ks)
        lq = torch.clamp((out * 255.0).round(), 0, 255) / 255.
        for i in range(b):
            p[i]['final'].update(order=order, resize_mode=mode, jpeg=q2[i])
            p[i]['blur2'] = blur2
        return lq, p

    def run_batch(self, crops, rec: Recorder):
        torch = self.torch
        ks, kps = zip(*[self.sample_kernels(rec) for _ in crops])
        gt = torch.stack([torch.from_numpy(c.transpose(2, 0, 1)) for c in crops]).to(self.device)
        kernels = [torch.stack(x) for x in zip(*ks)]
        lq, params = self.feed_data(gt, kernels, rec)
        for pr, (kp1, kp2, kps_) in zip(params, kps):
            pr['order1']['blur'] = kp1
            pr['order2']['blur'] = kp2 if pr.pop('blur2') else None
            pr['final']['sinc'] = kps_
        return lq, params


# ---------------------------------------------------------------------------------- main

def histogram(params_list, spec):
    from dalpsr.data.prompt_labels import degrees
    labels = np.array([spec.labels_from_degrees(degrees(p)) for p in params_list])
    return {t: np.bincount(labels[:, i], minlength=spec.num_intervals) for i, t in enumerate(spec.types)}


def _sync(device):
    import torch
    if str(device).startswith('cuda'):
        torch.cuda.synchronize()


def main(argv=None):
    args = parse_args(argv)
    import cv2
    import torch
    from dalpsr.data.degradations import RealESRGANDegradation
    from dalpsr.data.prompt_labels import PromptSpec
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    load = os.getloadavg() if hasattr(os, 'getloadavg') else (float('nan'),) * 3
    print(f'load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} CPUs); '
          f'threads={args.threads}, {args.gt_size} -> {args.gt_size // 4}, {args.num} samples each (reference: '
          f'whole batches) in {args.rounds} interleaved rounds, seed {args.seed}')
    n_crops = min(args.num, 32)
    crops = make_crops(n_crops, args.gt_size, args.seed)
    spec = PromptSpec()
    warm = 3
    deg = RealESRGANDegradation()
    rng = np.random.default_rng(args.seed)
    ref = rec = None
    if not args.skip_ref:
        t0 = time.perf_counter()
        ref = BasicsrReference(args.device)
        print(f'(basicsr import + setup {time.perf_counter() - t0:.1f} s, not timed)')
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        rec = Recorder(ref.deg).__enter__()
    bsz = max(1, args.ref_batch)
    for i in range(warm):
        deg(crops[i % n_crops], rng)
        if ref is not None:
            ref.run_batch([crops[i % n_crops]] * bsz, rec)
    # interleaved rounds: a change of machine load affects both pipelines alike
    ours_params, ref_params = [], []
    t_ours = t_ref = 0.0
    per_round = [args.num // args.rounds + (r < args.num % args.rounds) for r in range(args.rounds)]
    k_ours = k_ref = 0
    for n_r in per_round:
        t = time.perf_counter()
        for _ in range(n_r):
            ours_params.append(deg(crops[k_ours % n_crops], rng)['params'])
            k_ours += 1
        t_ours += time.perf_counter() - t
        if ref is None:
            continue
        _sync(args.device)
        t = time.perf_counter()
        target = k_ref + n_r
        while k_ref < target:
            _, prm = ref.run_batch([crops[(k_ref + j) % n_crops] for j in range(bsz)], rec)
            ref_params.extend(prm)
            k_ref += bsz
        _sync(args.device)
        t_ref += time.perf_counter() - t
    if rec is not None:
        rec.__exit__(None, None, None)
    sps_ours = k_ours / t_ours
    print(f'ours (numpy/OpenCV, CPU)  : {sps_ours:8.2f} samples/s  ({1000 * t_ours / k_ours:.1f} ms/sample)')
    results = {'ours_sps': sps_ours}
    if ref is not None:
        sps_ref = k_ref / t_ref
        results.update(ref_sps=sps_ref, ratio=sps_ours / sps_ref)
        print(f'basicsr reference ({args.device}, batch {bsz}): {sps_ref:8.2f} samples/s  '
              f'({1000 * t_ref / k_ref:.1f} ms/sample)')
        print(f'ratio ours / reference    : {sps_ours / sps_ref:8.2f}x')
    print(f'label histograms (K={spec.num_intervals}, counts per interval of the degree)')
    hists = {'ours': histogram(ours_params, spec)}
    if ref is not None:
        hists['reference'] = histogram(ref_params, spec)
    for name, h in hists.items():
        for typ, c in h.items():
            share = ' '.join(f'{100 * x / c.sum():4.0f}%' for x in c)
            print(f'  {name:9s} {typ:6s} {str(c.tolist()):24s} {share}')
    load = os.getloadavg() if hasattr(os, 'getloadavg') else (float('nan'),) * 3
    print(f'load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}')
    return results


if __name__ == '__main__':
    main()
