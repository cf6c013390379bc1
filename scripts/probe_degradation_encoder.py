#!/usr/bin/env python
"""Does the DeeDSR degradation learner encode degradations? A linear probe on the frozen d.

    python scripts/probe_degradation_encoder.py --learner experiments/deedsr_stage1_cpu/export \
        --fit-hr /path/to/train/photos --eval-hr /path/to/val/photos \
        --opt options/train/train_deedsr_stage1_cpu.yml --out results/deedsr_probe.json \
        --fig figs/deedsr/learner_pca.png

Two synthetic sets are degraded on the fly with the training options' degradation (the
``datasets.train`` block of ``--opt``: StableSR settings, crop size, scale), each sample
labelled with its K = 4 degradation interval per type (blur, noise, JPEG; labels of
``dalpsr.data.prompt_labels``; the noise interval of the recorded parameters, or with
``--noise-label measured`` of the noise measured in the LR): a *fit* set from ``--fit-hr`` (seed ``--seed``) and a held-out
*eval* set from other photos (``--eval-hr``, seed ``--seed + 1``). For the trained learner and for
a randomly initialised learner of the same architecture (seed ``--random-seed``), d is computed
on each whole LR (eval mode), and a multinomial logistic regression per type (standardised
features, L-BFGS; its L2 weight chosen per encoder and type by 5-fold cross-validation on the fit
set from ``--l2``) is fitted on the fit set and scored on the eval set. ``--cache`` keeps the two
degraded sets in an ``.npz`` (a rerun with other encoders or probe settings skips the degrading). Prints and
writes (``--out``, JSON) the accuracy per type of both encoders next to the majority-class
rate, and the paired difference trained - random with a 95 % bootstrap interval over the eval
samples (``trained_minus_random``); ``--fig`` draws the first two principal components of d on the eval set coloured by each
type's degree (top row trained, bottom row random).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TYPES = ('blur', 'noise', 'jpeg')


def build_set(train_block: dict, hr: str, num: int, seed: int, noise_label: str = 'params'):
    """-> (lq list of [3,h,w] tensors, labels int [N, T], degrees float [N, T]).

    ``noise_label``: ``params`` (the noise interval of the recorded noise parameters) or
    ``measured`` (of the noise left in the LR, ``prompt.noise_severity: measured``, docs/irpad.md)."""
    import torch

    from dalpsr.data.deedsr_dataset import DeeDSRDataset
    keep = ('gt_size', 'scale', 'degradation', 'use_hflip', 'use_rot', 'no_degradation_prob', 'small_image')
    kw = {k: v for k, v in train_block.items() if k in keep}
    kw['prompt'] = {'types': list(TYPES), 'num_intervals': 4, 'noise_severity': noise_label}
    ds = DeeDSRDataset(dataroot_gt=hr, seed=seed, **kw)
    lqs, labels, degrees = [], [], []
    for i in range(num):
        item = ds[i]
        lqs.append(item['lq'])
        labels.append(item['labels'])
        params = json.loads(item['params'])
        if params.get('no_degradation'):
            degrees.append([0.0] * len(TYPES))
        else:
            d = ds.spec.degrees(params)
            degrees.append([float(d[t]) for t in TYPES])
    return lqs, torch.stack(labels), torch.tensor(degrees)


def features(net, lqs, batch: int = 64):
    import torch
    out = []
    with torch.no_grad():
        for i in range(0, len(lqs), batch):
            out.append(net(torch.stack(lqs[i:i + batch]).float()))
    return torch.cat(out)


def fit_logistic(x, y, num_classes: int, l2: float = 1e-3, iters: int = 200):
    """Multinomial logistic regression on standardised ``x`` [N, F]; returns a predictor."""
    import torch
    import torch.nn.functional as F
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xs = (x - mu) / sd
    w = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, history_size=20, line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xs @ w + b, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda z: (((z - mu) / sd) @ w + b).argmax(1)


def choose_l2(x, y, grid, folds: int = 5, seed: int = 0) -> float:
    """The L2 weight of ``grid`` with the best mean k-fold accuracy on ``(x, y)``."""
    import torch
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    parts = perm.chunk(folds)
    best, best_acc = grid[0], -1.0
    for l2 in grid:
        acc = 0.0
        for k in range(folds):
            val = parts[k]
            tr = torch.cat([parts[i] for i in range(folds) if i != k])
            pred = fit_logistic(x[tr], y[tr], 4, l2, iters=100)(x[val])
            acc += float((pred == y[val]).float().mean()) / folds
        if acc > best_acc:
            best, best_acc = l2, acc
    return best


def probe(feat_fit, y_fit, feat_eval, y_eval, grid):
    """-> (accuracy per type, chosen L2 per type, correct [N, T] bool of the eval samples)."""
    import torch
    res, chosen, correct = {}, {}, []
    for j, t in enumerate(TYPES):
        l2 = choose_l2(feat_fit, y_fit[:, j], grid) if len(grid) > 1 else grid[0]
        pred = fit_logistic(feat_fit, y_fit[:, j], 4, l2)(feat_eval)
        correct.append(pred == y_eval[:, j])
        res[t] = float(correct[-1].float().mean())
        chosen[t] = l2
    return res, chosen, torch.stack(correct, 1)


def paired_bootstrap(correct_a, correct_b, num: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Accuracy difference a - b per type on the same eval samples, with a percentile interval of
    ``num`` bootstrap resamples of those samples (``correct_*``: bool [N, T]); an interval above 0
    says a is better than b beyond the sampling of the eval set."""
    from dalpsr.metrics.bootstrap import paired_bootstrap_diff
    r = paired_bootstrap_diff(correct_a.float(), correct_b.float(), num, seed, level)
    return {t: {k: round(float(r[k][j]), 4) for k in ('diff', 'lo', 'hi')} for j, t in enumerate(TYPES)}


def pca_figure(path, feats: dict, degrees, title: str):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import torch
    rows = list(feats)
    fig, axes = plt.subplots(len(rows), len(TYPES), figsize=(4.2 * len(TYPES), 3.8 * len(rows)), squeeze=False)
    for r, name in enumerate(rows):
        x = feats[name]
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        u, s, v = torch.linalg.svd(x, full_matrices=False)
        pc = x @ v[:2].T
        var = (s[:2] ** 2 / (s ** 2).sum()).tolist()
        for c, t in enumerate(TYPES):
            ax = axes[r][c]
            sc = ax.scatter(pc[:, 0], pc[:, 1], c=degrees[:, c], cmap='viridis', s=6, vmin=0, vmax=1)
            ax.set_title(f'{name}: colour = {t} degree', fontsize=9)
            ax.set_xlabel(f'PC1 ({100 * var[0]:.0f} %)', fontsize=8)
            ax.set_ylabel(f'PC2 ({100 * var[1]:.0f} %)', fontsize=8)
            ax.tick_params(labelsize=7)
            fig.colorbar(sc, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp.png'
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--learner', required=True, help='export folder of a stage-1 run (degradation_learner.*)')
    p.add_argument('--opt', required=True, help='the stage-1 training options (degradation, crop, scale)')
    p.add_argument('--fit-hr', required=True, help='HR photos the probe is fitted on')
    p.add_argument('--eval-hr', required=True, help='other HR photos the probe is scored on (held out)')
    p.add_argument('--num-fit', type=int, default=2000)
    p.add_argument('--num-eval', type=int, default=880)
    p.add_argument('--seed', type=int, default=11)
    p.add_argument('--random-seed', type=int, default=0, help='seed of the randomly initialised baseline')
    p.add_argument('--l2', default='1e-4,1e-3,1e-2,1e-1,1', help='comma-separated L2 weights (cross-validated)')
    p.add_argument('--stats-baseline', action='store_true',
                   help='also probe the weight-free LR statistics of dalpsr.archs.degradation_stats (what a '
                        'linear probe can read from these LRs without any learning)')
    p.add_argument('--noise-label', choices=('params', 'measured'), default='params',
                   help='noise interval of the recorded parameters (default) or of the noise measured in the LR '
                        '(what is left after the later filters; a perfect meter agrees with the params label '
                        'only ~60 %% of the time, docs/irpad.md)')
    p.add_argument('--cache', default=None, help='.npz keeping the degraded fit/eval sets (built when missing)')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--out', default=None, help='JSON file for the results')
    p.add_argument('--fig', default=None, help='PNG file for the PCA figure')
    args = p.parse_args(argv)

    import torch
    import yaml

    from dalpsr.archs.deedsr_learner_arch import DegradationResNet, load_degradation_learner
    torch.set_num_threads(args.threads)
    try:
        trained = load_degradation_learner(args.learner)
    except FileNotFoundError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    cfg = dict(trained.config)
    torch.manual_seed(args.random_seed)
    random_net = DegradationResNet(**cfg).eval()
    block = yaml.safe_load(open(args.opt, encoding='utf-8'))['datasets']['train']
    t0 = time.time()
    grid = [float(v) for v in str(args.l2).split(',')]
    key = dict(fit_hr=args.fit_hr, eval_hr=args.eval_hr, num_fit=args.num_fit, num_eval=args.num_eval,
               seed=args.seed, block=block)
    if args.noise_label != 'params':  # caches made before the option keep their key
        key['noise_label'] = args.noise_label
    fit = ev = None
    if args.cache and os.path.isfile(args.cache):
        import numpy as np
        z = np.load(args.cache, allow_pickle=False)
        if json.loads(str(z['key'])) == json.loads(json.dumps(key)):
            fit = ([torch.from_numpy(a) for a in z['fit_lq']], torch.from_numpy(z['fit_y']), torch.from_numpy(z['fit_deg']))
            ev = ([torch.from_numpy(a) for a in z['ev_lq']], torch.from_numpy(z['ev_y']), torch.from_numpy(z['ev_deg']))
        else:
            print(f'{args.cache} was made with other settings; rebuilding it')
    if fit is None:
        from dalpsr.utils.img_io import ImageReadError
        try:
            fit = build_set(block, args.fit_hr, args.num_fit, args.seed, args.noise_label)
            ev = build_set(block, args.eval_hr, args.num_eval, args.seed + 1, args.noise_label)
        except (FileNotFoundError, ValueError, ImageReadError) as err:
            print(f'error: {err}', file=sys.stderr)
            return 2
        if args.cache:
            import numpy as np
            os.makedirs(os.path.dirname(os.path.abspath(args.cache)), exist_ok=True)
            tmp = f'{args.cache}.tmp.npz'
            np.savez(tmp, key=json.dumps(key), fit_lq=torch.stack(fit[0]).numpy(), fit_y=fit[1].numpy(),
                     fit_deg=fit[2].numpy(), ev_lq=torch.stack(ev[0]).numpy(), ev_y=ev[1].numpy(), ev_deg=ev[2].numpy())
            os.replace(tmp, args.cache)
    t_data = time.time() - t0
    majority = {t: float((ev[1][:, j] == torch.bincount(fit[1][:, j], minlength=4).argmax()).float().mean())
                for j, t in enumerate(TYPES)}
    res = {'learner': str(args.learner), 'arch': cfg, 'num_fit': args.num_fit, 'num_eval': args.num_eval,
           'fit_hr': args.fit_hr, 'eval_hr': args.eval_hr, 'seed': args.seed, 'noise_label': args.noise_label, 'l2_grid': grid, 'l2_chosen': {},
           'eval_label_counts': {t: torch.bincount(ev[1][:, j], minlength=4).tolist() for j, t in enumerate(TYPES)},
           'majority': majority}
    feats = {}
    nets = [('trained', trained), ('random', random_net)]
    if args.stats_baseline:
        from dalpsr.archs.degradation_stats import degradation_statistics
        nets.append(('stats', degradation_statistics))
    correct = {}
    for name, net in nets:
        ff, fe = features(net, fit[0]), features(net, ev[0])
        if name != 'stats':
            feats[name] = fe
        res[name], res['l2_chosen'][name], correct[name] = probe(ff, fit[1], fe, ev[1], grid)
    res['trained_minus_random'] = paired_bootstrap(correct['trained'], correct['random'])
    res['seconds'] = {'data': round(t_data, 1), 'total': round(time.time() - t0, 1)}
    print(f"linear probe on d ({cfg['widths'][-1]}-d), fitted on {args.num_fit} LRs of {args.fit_hr}, "
          f"scored on {args.num_eval} LRs of {args.eval_hr} (K = 4 intervals)")
    print(f"{'type':8s} {'trained':>8s} {'random':>8s} {'trained-random (95 % CI)':>26s} {'majority':>9s}"
          + (f" {'stats':>8s}" if 'stats' in res else ''))
    for t in TYPES:
        extra = f" {res['stats'][t]:8.3f}" if 'stats' in res else ''
        d = res['trained_minus_random'][t]
        ci = f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
        print(f"{t:8s} {res['trained'][t]:8.3f} {res['random'][t]:8.3f} {ci:>26s} {majority[t]:9.3f}{extra}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = f'{args.out}.tmp'
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(res, f, indent=2)
        os.replace(tmp, args.out)
    if args.fig:
        pca_figure(args.fig, feats, ev[2], f'DeeDSR degradation learner d, PCA on {args.num_eval} held-out LRs '
                                          f'({os.path.basename(os.path.normpath(args.eval_hr))})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
