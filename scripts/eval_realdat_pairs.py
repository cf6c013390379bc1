#!/usr/bin/env python
"""Score RealDAT / DAT exports on the same degraded pairs, per image, with paired intervals.

    python scripts/eval_realdat_pairs.py --opt options/train/train_realdat_oracle_cpu.yml \
        --set datasets.val.hr=/path/to/other/HR \
        --models dat=experiments/dat_oracleval_cpu_s0/export oracle=experiments/realdat_oracle_cpu_s0/export \
        --out results/deplsr/oracle_eval.json

The pairs are the ``datasets.val`` block of ``--opt`` (a ``DegradedPairDataset``; ``--set`` as in
train.py). Every export is run on every pair as it was trained: a plain DAT on the LR, RealDAT on
its SRCLIP embeddings of the LR, an oracle RealDAT (``conditioning: oracle``) on the pair's true
degradation degrees (the val block needs ``degrees: true``). Printed and written (``--out``, JSON,
atomically): the mean PSNR-Y (BT.601, 8-bit, ``--crop-border``) per export and for bicubic, and
for each export its per-image difference to the first one (``--models``' order) with a paired
bootstrap 95 % interval (the same pairs, resampled): an interval above 0 is a gain beyond the
sampling of the pairs; the spread between training seeds is a separate question (train two).
Exit status 2 on bad input.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_models(items):
    out = {}
    for it in items:
        name, sep, path = it.partition('=')
        if not sep or not name or not path:
            raise ValueError(f'--models takes name=export_folder items, got {it!r}')
        if name in out or name == 'bicubic':
            raise ValueError(f'--models: the name {name!r} is taken')
        out[name] = path
    return out


def score(models, dataset, crop_border: int = 2, batch_size: int = 32):
    """{name: PSNR-Y per pair [N]} for each export (plus 'bicubic')."""
    import torch
    import torch.nn.functional as F
    from dalpsr.models.realdat_model import load_realdat, psnr_y, super_resolve
    loaded = {name: load_realdat(path) for name, path in models.items()}
    res = {name: [] for name in ['bicubic', *models]}
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        lq, gt = torch.stack([it['lq'] for it in items]), torch.stack([it['gt'] for it in items])
        degrees = torch.stack([it['degrees'] for it in items]) if 'degrees' in items[0] else None
        bic = F.interpolate(lq, size=gt.shape[-2:], mode='bicubic', align_corners=False)
        res['bicubic'].append(psnr_y(bic.clamp(0, 1), gt, crop_border))
        for name, (net, enc, meta) in loaded.items():
            with torch.no_grad():
                sr = super_resolve(net, lq, meta.get('conditioning', 'srclip'), enc, degrees)
            res[name].append(psnr_y(sr.clamp(0, 1), gt, crop_border))
    return {k: torch.cat(v) for k, v in res.items()}


def summarise(psnr, reference: str, num: int = 2000, seed: int = 0):
    from dalpsr.metrics.bootstrap import paired_bootstrap_diff
    out = {'num_pairs': int(len(psnr[reference])), 'reference': reference, 'rows': {}}
    for name, p in psnr.items():
        row = {'psnr_y': round(float(p.mean()), 3)}
        if name != reference:
            r = paired_bootstrap_diff(p, psnr[reference], num, seed)
            row[f'minus_{reference}'] = {k: round(float(v), 3) for k, v in r.items()}
        out['rows'][name] = row
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--opt', required=True, help='options file whose datasets.val block gives the pairs')
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help='override an option (as train.py)')
    p.add_argument('--models', nargs='+', required=True, help='name=export_folder ...; the first is the reference')
    p.add_argument('--crop-border', type=int, default=2)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--out', default=None, help='JSON file for the results')
    args = p.parse_args(argv)
    import torch
    from dalpsr.data import build_dataset
    from dalpsr.utils.img_io import ImageReadError
    from dalpsr.utils.misc import atomic_write_json
    from dalpsr.utils.options import get_opt, load_options
    torch.set_num_threads(max(1, args.threads))
    try:
        models = parse_models(args.models)
        for name, path in models.items():
            if not os.path.isdir(path):
                raise FileNotFoundError(f'{name}: not an export folder: {path}')
        opt = load_options(args.opt, args.set, is_train=False)
        val = dict(get_opt(opt, 'datasets.val'))
        val.pop('batch_size', None)
        dataset = build_dataset(val, where=f'datasets.val of {args.opt}')
        psnr = score(models, dataset, args.crop_border)
    except (FileNotFoundError, ValueError, KeyError, ImageReadError) as err:
        print(f'error: {err.args[0] if isinstance(err, KeyError) and err.args else err}', file=sys.stderr)
        return 2
    res = summarise(psnr, next(iter(models)))
    res.update(opt=args.opt, overrides=args.set, models=models, crop_border=args.crop_border)
    ref = res['reference']
    print(f"{res['num_pairs']} pairs; PSNR-Y, and minus {ref} per pair (paired bootstrap 95 %):")
    for name, row in res['rows'].items():
        d = row.get(f'minus_{ref}')
        extra = f"  {d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]" if d else ''
        print(f"  {name:<24} {row['psnr_y']:.3f}{extra}")
    if args.out:
        atomic_write_json(args.out, res)
    return 0


if __name__ == '__main__':
    sys.exit(main())
