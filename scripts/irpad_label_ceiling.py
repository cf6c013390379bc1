#!/usr/bin/env python
"""How much of the noise label is visible in the LR at all (an upper bound for IRPAD).

    python scripts/irpad_label_ceiling.py --data datasets/irpad/heldout_512_s2.npz --hr sample:val --num 400

For the first ``--num`` samples of an LR cache, rebuilds each HR crop (same seed and index, so
the cached LR is reproduced exactly; checked) and degrades it again with its recorded params
without its two noise stages (``RealESRGANDegradation.apply_measured``, the measurement behind
``noise_severity: measured`` labels). The *visible noise* of a sample is the RMS of
``lq - lq_without_noise`` in 8-bit levels: the noise that survived every later filter, resize,
JPEG and clipping in this very image, i.e. what a perfect noise estimator could measure. The
script prints the Spearman correlation between the noise degree (the label's severity, computed
from the params at mid-gray) and the visible noise, and the *ceiling accuracy*: intervals
assigned by ranking the visible noise (thresholds at the label histogram's quantiles), i.e.
what an ideal measurement of the surviving noise scores against the labels.

Blur and JPEG have no such single scalar: the RMS of the JPEG error depends mostly on the
content (and on the noise it removes), and the blur label is the kernel chain's width, which is
exactly recoverable with the HR at hand; what limits it is that the LR alone does not tell a
blurred sharp photo from a sharp soft one (see docs/irpad.md).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ceiling_accuracy(visible, labels, k):
    """Intervals from the rank of ``visible`` with the same histogram as ``labels``; accuracy."""
    import numpy as np
    order = np.argsort(visible, kind='stable')
    counts = np.bincount(labels, minlength=k)
    assigned = np.empty_like(labels)
    assigned[order] = np.repeat(np.arange(k), counts)
    return float((assigned == labels).mean())


def spearman(a, b):
    import numpy as np
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', default='datasets/irpad/heldout_512_s2.npz', help='LR cache (scripts/make_lr_cache.py)')
    p.add_argument('--hr', default='sample:val', help='the HR source the cache was built from')
    p.add_argument('--num', type=int, default=400, help='samples to analyse (the first N of the cache)')
    p.add_argument('--json', default=None, help='also write the numbers to this JSON file')
    args = p.parse_args(argv)
    import numpy as np
    from tqdm import tqdm
    from dalpsr.data.degradations import RealESRGANDegradation
    from dalpsr.data.lr_cache import load_lr_cache, resolve_hr_paths, sample_gt
    from dalpsr.data.prompt_labels import PromptSpec
    try:
        data = load_lr_cache(args.data)
        paths = resolve_hr_paths(args.hr)
    except (FileNotFoundError, ValueError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    meta = data['meta']
    if [os.path.basename(q) for q in paths] != list(meta['hr']):
        print(f"error: --hr {args.hr} gives {[os.path.basename(q) for q in paths]}, the cache was built "
              f"from {meta['hr']}", file=sys.stderr)
        return 2
    spec = PromptSpec.from_opt(meta.get('prompt'))
    if 'noise' not in spec.types:
        print(f'error: the labels of {args.data} have no noise type ({spec.types})', file=sys.stderr)
        return 2
    deg = RealESRGANDegradation(**(meta.get('degradation') or {}))
    n = min(args.num, len(data['lq']))
    images = {}
    visible = np.zeros(n)
    for i in tqdm(range(n), desc='re-degrading', unit='sample'):
        params = json.loads(str(data['params'][i]))
        _, gt, _ = sample_gt(paths, int(meta['gt_size']), int(meta['seed']), i, images)
        _, lq, visible[i] = deg.apply_measured(gt, params)
        ref = np.clip(np.round(lq * 255.0), 0, 255).astype(np.uint8)
        if not np.array_equal(ref, data['lq'][i]):
            print(f'error: sample {i} does not reproduce the cached LR (different code or options)', file=sys.stderr)
            return 2
    out = {'data': args.data, 'num_samples': n, 'types': {}}
    print(f'{n} samples of {args.data}')
    print(f"{'type':6s} {'spearman(degree, visible)':>26s} {'ceiling acc':>12s}")
    t = spec.types.index('noise')
    rho = spearman(np.asarray(data['degrees'][:n, t]), visible)
    acc = ceiling_accuracy(visible, np.asarray(data['labels'][:n, t]), spec.num_intervals)
    out['types']['noise'] = {'spearman': rho, 'ceiling_acc': acc,
                             'visible_rms_quantiles': np.quantile(visible, [0.1, 0.25, 0.5, 0.75, 0.9]).round(3).tolist()}
    print(f"{'noise':6s} {rho:26.3f} {acc:12.3f}")
    if args.json:
        from dalpsr.utils.misc import atomic_write_json
        atomic_write_json(args.json, out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
