#!/usr/bin/env python
"""How much of IRPAD's error is the training photos: a quick probe on hand-crafted LR statistics.

    python scripts/irpad_feature_probe.py --eval datasets/irpad/heldout_512_s6.npz \
        --train datasets/irpad/train_256_s1.npz --train datasets/irpad/inphoto_512_s9.npz

For each ``--train`` LR cache, fits a small classifier (one hidden layer, per degradation type)
on the weight-free degradation statistics of its LRs (``dalpsr.archs.degradation_stats``, the
same 115 numbers IRPAD's statistics tokens start from) and prints its accuracy on the first
``--num-eval`` samples of ``--eval``, per type and per source photo. Seconds per cache on a CPU.

Comparing a cache of the training photos with one of the *held-out photos themselves* (other
crops, another seed; e.g. ``make_lr_cache.py --hr sample:val --seed 9``) separates what the LR
cannot tell at all from what the training photos do not teach: if the second scores much higher,
the error comes from content the training photos do not cover (for blur: how sharp a photo is
before any degradation), not from the degradation being invisible. The in-photo cache is a
diagnostic only; never train a reported model on it.

``--features v2`` uses the extended statistics (v1 + the edge-width and spectrum features for
blur; ``ConvEncoder(dstat_features='v2')``); ``--crop N`` scores each held-out LR larger than N
as IRPAD's predictor does: the mean of the class probabilities over its N-px crops.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def statistics(lq_uint8, batch: int = 200, features: str = 'v1', crop: int = 0):
    """uint8 [N, h, w, 3] -> float32 tensor [N, F] of degradation statistics, or with ``crop`` > 0
    (and LRs larger than it) [N, C, F] for the C crops IRPAD's predictor scores (8-px aligned)."""
    from dalpsr.models.irpad_model import crop_boxes, lr_statistics
    h, w = lq_uint8.shape[1:3]
    boxes = crop_boxes(h, w, crop if crop and (h > crop or w > crop) else 0, 8)
    out = lr_statistics(lq_uint8, features, boxes, batch)
    return out[:, 0] if len(boxes) == 1 else out


def fit_probe(x, y, num_classes: int, epochs: int = 300, seed: int = 0, hidden: int = 256):
    """A one-hidden-layer classifier of standardised features ``x`` [N, F] -> ``y`` [N] (AdamW,
    batch 256). Returns a function features -> predicted class [M]."""
    import torch
    import torch.nn.functional as F
    mu, sd = x.mean(0), x.std(0) + 1e-6
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(), torch.nn.Dropout(0.2),
                              torch.nn.Linear(hidden, num_classes))
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-2)
    xs, y = (x - mu) / sd, torch.as_tensor(y, dtype=torch.int64)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 256):
            b = perm[i:i + 256]
            loss = F.cross_entropy(net(xs[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()

    def predict(z):
        """z [M, F] -> class [M]; z [M, C, F] (crops) -> class of the mean probability over C."""
        with torch.no_grad():
            p = net((z - mu) / sd).softmax(-1)
            return (p.mean(1) if z.dim() == 3 else p).argmax(-1)
    return predict


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--eval', required=True, help='held-out LR cache')
    p.add_argument('--train', action='append', required=True, help='LR cache to fit on (repeatable)')
    p.add_argument('--num-train', type=int, default=4000, help='first N samples of each --train cache')
    p.add_argument('--num-eval', type=int, default=1000, help='first N samples of --eval')
    p.add_argument('--epochs', type=int, default=300)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: torch default)')
    p.add_argument('--features', default='v1', choices=['v1', 'v2', 'v3'], help='statistics set (dalpsr/archs/degradation_stats.py)')
    p.add_argument('--crop', type=int, default=0, help='score held-out LRs as the mean over crops of this size (0: whole)')
    p.add_argument('--json', default=None, help='also write the numbers to this JSON file')
    args = p.parse_args(argv)
    import numpy as np
    import torch
    from dalpsr.data.lr_cache import load_lr_cache
    from dalpsr.data.prompt_labels import PromptSpec
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        ev = load_lr_cache(args.eval)
        trains = [(f, load_lr_cache(f)) for f in args.train]
    except (FileNotFoundError, ValueError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    spec = PromptSpec.from_opt(ev['meta']['prompt'])
    for f, d in trains:
        if PromptSpec.from_opt(d['meta']['prompt']) != spec:
            print(f'error: {f} is labelled with another prompt spec than {args.eval}', file=sys.stderr)
            return 2
    n_ev = min(args.num_eval, len(ev['lq']))
    x_ev, y_ev = statistics(ev['lq'][:n_ev], features=args.features, crop=args.crop), ev['labels'][:n_ev]
    photo = np.array([str(k).rsplit('_', 1)[0] for k in ev['keys'][:n_ev]])
    out = {'eval': args.eval, 'num_eval': int(n_ev), 'types': list(spec.types), 'features': args.features,
           'crop': args.crop, 'epochs': args.epochs, 'train': {}}
    print(f'probe on degradation statistics ({args.features}), evaluated on {n_ev} samples of {args.eval}'
          + (f' (mean over {args.crop}-px crops)' if args.crop else ''))
    for f, d in trains:
        n = min(args.num_train, len(d['lq']))
        x = statistics(d['lq'][:n], features=args.features)
        row = {'num_train': int(n), 'hr': d['meta']['hr'], 'acc': {}, 'per_photo': {}}
        for t_i, t in enumerate(spec.types):
            pred = fit_probe(x, d['labels'][:n, t_i], spec.num_intervals, args.epochs, args.seed)(x_ev).numpy()
            ok = pred == y_ev[:, t_i]
            row['acc'][t] = float(ok.mean())
            row['per_photo'][t] = {s: float(ok[photo == s].mean()) for s in sorted(set(photo))}
        out['train'][f] = row
        print(f'  fit on {n} of {f} ({len(row["hr"])} photos):')
        for t in spec.types:
            per = ', '.join(f'{s} {a:.3f}' for s, a in row['per_photo'][t].items())
            print(f'    {t:6s} acc {row["acc"][t]:.3f}   ({per})')
    if args.json:
        from dalpsr.utils.misc import atomic_write_json
        atomic_write_json(args.json, out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
