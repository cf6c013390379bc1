#!/usr/bin/env python
"""Evaluate a trained IRPAD on a held-out synthetic set (DePLSR's evaluate.py role).

    python scripts/eval_irpad.py --model experiments/irpad_cpu/export
    python scripts/eval_irpad.py --model DIR --data datasets/irpad/heldout_512_s2.npz --out results/irpad_eval

The held-out set is an LR cache (dalpsr.data.lr_cache): by default 2,000 random 512 crops of the
'val' sample photos (disjoint from the 'train' photos used by train_irpad_cpu.yml), degraded
with seed 2 (training used seed 1) -> 128x128 LR. It is built on first use (--hr, --num,
--gt-size, --seed choose it).

Prints, per degradation type: accuracy, balanced accuracy (mean recall over intervals),
accuracy within one interval, and writes to --out: metrics.json (those numbers, confusion
matrices, label histograms, per-source-image accuracy, accuracy of each type split by the true
interval of each other type, model and data descriptions), confusion_<type>.png and
predictions.npz (pred [N, T], labels [N, T], keys: for analyses against the recorded params). An existing non-empty --out is refused unless --overwrite (it is then
archived with a timestamp, never deleted).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def plot_confusion(conf, name, labels, path, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    from dalpsr.utils.misc import atomic_path
    rows = conf.sum(1, keepdims=True)
    frac = np.divide(conf, np.maximum(rows, 1))
    fig, ax = plt.subplots(figsize=(4.2, 3.8), dpi=120)
    im = ax.imshow(frac, vmin=0, vmax=1, cmap='Blues')
    for i in range(conf.shape[0]):
        for j in range(conf.shape[1]):
            ax.text(j, i, f'{frac[i, j]:.2f}\n({conf[i, j]})', ha='center', va='center', fontsize=7,
                    color='white' if frac[i, j] > 0.5 else 'black')
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel('predicted interval')
    ax.set_ylabel('true interval')
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png')
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', required=True, help='IRPAD export folder (irpad.json + irpad.safetensors)')
    p.add_argument('--data', default='datasets/irpad/heldout_512_s2.npz', help='held-out LR cache (.npz)')
    p.add_argument('--hr', default='sample:val', help='HR images used when --data must be built')
    p.add_argument('--num', type=int, default=2000, help='samples when --data must be built')
    p.add_argument('--gt-size', type=int, default=512, help='HR crop size when --data must be built')
    p.add_argument('--seed', type=int, default=2, help='seed when --data must be built (train uses 1)')
    p.add_argument('--workers', type=int, default=1, help='processes when --data must be built')
    p.add_argument('--out', default=None, help='output folder (default results/irpad_eval/<model name>)')
    p.add_argument('--overwrite', action='store_true', help='archive an existing --out and write a new one')
    p.add_argument('--batch-size', type=int, default=50)
    p.add_argument('--device', default='cpu')
    p.add_argument('--crop', type=int, default=None,
                   help="predict on crops of this size and average (0: whole LR; default: the export's train_crop)")
    p.add_argument('--tta', action='store_true', help='also average over the 8 flips/rot90 of each LR')
    p.add_argument('--stats-only', action='store_true',
                   help='score with the statistics term alone (models with stats_score; a diagnostic)')
    p.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: torch default)')
    args = p.parse_args(argv)

    import numpy as np
    import torch
    from tqdm import tqdm
    from dalpsr.data.lr_cache import build_lr_cache, load_lr_cache
    from dalpsr.data.prompt_labels import PromptSpec
    from dalpsr.models.irpad_model import IRPADPredictor, confusion_matrices, confusion_metrics
    from dalpsr.utils.misc import atomic_path, atomic_write_json, mkdir_and_rename
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        predictor = IRPADPredictor.from_pretrained(args.model, device=args.device, crop=args.crop, tta=args.tta,
                                                    stats_only=args.stats_only)
        if not os.path.isfile(args.data):
            print(f'building the held-out set {args.data} ({args.num} x {args.gt_size} crops of {args.hr}, '
                  f'seed {args.seed})')
            build_lr_cache(args.data, hr=args.hr, num_samples=args.num, gt_size=args.gt_size, seed=args.seed,
                           workers=args.workers, prompt=predictor.spec.to_opt())
        data = load_lr_cache(args.data)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    spec = predictor.spec
    dspec = PromptSpec.from_opt(data['meta']['prompt'])
    if (dspec.types, dspec.num_intervals, dspec.noise_severity) != (spec.types, spec.num_intervals, spec.noise_severity):
        print(f"error: {args.data} is labelled with types {list(dspec.types)} x {dspec.num_intervals} intervals "
              f"(noise severity: {dspec.noise_severity}), the model predicts {list(spec.types)} x "
              f"{spec.num_intervals} (noise severity: {spec.noise_severity})", file=sys.stderr)
        return 2
    name = os.path.basename(os.path.normpath(args.model))
    if name == 'export':
        name = os.path.basename(os.path.dirname(os.path.normpath(args.model)))
    out = args.out or os.path.join('results', 'irpad_eval', name)
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        print(f'error: {out} exists and is not empty; pass --overwrite to archive it, or choose --out',
              file=sys.stderr)
        return 2
    mkdir_and_rename(out, rename=True)

    lq_all, labels = data['lq'], torch.from_numpy(data['labels'])
    preds = []
    t0 = time.time()
    for i in tqdm(range(0, len(lq_all), args.batch_size), desc='IRPAD eval'):
        lq = torch.from_numpy(lq_all[i:i + args.batch_size]).permute(0, 3, 1, 2).float().div_(255.0)
        preds.append(predictor.predict_labels(lq))
    pred = torch.cat(preds)
    dt = time.time() - t0
    types = list(spec.types)
    conf = confusion_matrices(pred, labels, spec.num_intervals)
    metrics = confusion_metrics(conf, types)

    # per source image (the HR photo a crop came from)
    src = np.array([str(k).rsplit('_', 1)[0] for k in data['keys']])
    per_image = {}
    for s in sorted(set(src)):
        m = src == s
        per_image[s] = {'n': int(m.sum()),
                        **{f'acc/{t}': float((pred[m, i] == labels[m, i]).float().mean()) for i, t in enumerate(types)}}
    hist = {t: np.bincount(data['labels'][:, i], minlength=spec.num_intervals).tolist() for i, t in enumerate(types)}
    # accuracy of each type split by the true interval of each other type (what masks what:
    # e.g. noise accuracy falls where the JPEG that follows the noise is strong)
    lab = labels.numpy()
    ok = (pred.numpy() == lab)
    cross = {t: {u: [float(ok[lab[:, j] == k, i].mean()) if (lab[:, j] == k).any() else None
                     for k in range(spec.num_intervals)]
                 for j, u in enumerate(types) if u != t} for i, t in enumerate(types)}
    result = {
        'metrics': metrics,
        'confusion': {t: conf[i].tolist() for i, t in enumerate(types)},
        'label_histogram': hist,
        'majority_baseline_acc': {t: max(h) / max(sum(h), 1) for t, h in hist.items()},
        'accuracy_by_other_interval': cross,
        'per_image': per_image,
        'num_samples': int(len(labels)),
        'lr_size': list(lq_all.shape[1:3]),
        'model': os.path.abspath(args.model), 'model_meta': {k: v for k, v in predictor.meta.items() if k != 'arch'},
        'arch': predictor.meta.get('arch', {}).get('image_encoder'),
        'data': os.path.abspath(args.data), 'data_meta': data['meta'],
        'predictor': {'crop': predictor.crop, 'tta': predictor.tta, 'stats_only': predictor.stats_only},
        'seconds': dt, 'images_per_s': len(labels) / max(dt, 1e-9), 'device': args.device,
        'command': ' '.join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
    }
    atomic_write_json(os.path.join(out, 'metrics.json'), result)
    with atomic_path(os.path.join(out, 'predictions.npz')) as tmp:
        with open(tmp, 'wb') as f:
            np.savez(f, pred=pred.numpy().astype(np.int64), labels=lab, keys=np.asarray(data['keys']))
    for i, t in enumerate(types):
        labels_txt = [f'{lo:g}~{hi:g}' for lo, hi in (spec.bounds(j) for j in range(spec.num_intervals))]
        plot_confusion(conf[i], t, labels_txt, os.path.join(out, f'confusion_{t}.png'),
                       f'IRPAD {t}: acc {metrics[f"acc/{t}"]:.3f}, balanced {metrics[f"bacc/{t}"]:.3f}')

    print(f'IRPAD {args.model} on {args.data}: {len(labels)} LR images {lq_all.shape[1]}x{lq_all.shape[2]} '
          f'({dt:.1f} s, {len(labels) / max(dt, 1e-9):.1f} img/s)')
    print(f'{"type":8s} {"acc":>7s} {"bal.acc":>8s} {"within1":>8s}  interval histogram')
    for t in types:
        print(f'{t:8s} {metrics[f"acc/{t}"]:7.4f} {metrics[f"bacc/{t}"]:8.4f} {metrics[f"within1/{t}"]:8.4f}  {hist[t]}')
    print(f'{"mean":8s} {metrics["acc/mean"]:7.4f} {metrics["bacc/mean"]:8.4f} {metrics["within1/mean"]:8.4f}')
    print('accuracy of <type> by the true interval (0..K-1) of <other type>:')
    for t in types:
        for u, accs in cross[t].items():
            print(f'  {t:6s} | {u:6s}: ' + ' '.join('  -  ' if a is None else f'{a:.3f}' for a in accs))
    print(f'wrote {out}/metrics.json and confusion_*.png')
    return 0


if __name__ == '__main__':
    sys.exit(main())
