#!/usr/bin/env python
"""Image-quality metrics of an SR folder (against a GT folder), as papers report them.

    python scripts/iqa.py --sr results/mymethod/RealSR --gt datasets/RealSR/HR \
        --metrics psnr ssim lpips dists fid niqe musiq maniqa clipiqa --out results/iqa/mymethod_realsr
    python scripts/iqa.py -opt options/test/iqa_example.yml [--set metrics.device=cuda]

Writes per_image.csv, summary.json, table.md and iqa.log into --out (default
results/iqa/<name>); refuses to overwrite existing results without --overwrite; --resume
continues an interrupted run. Metric names, weights and pairing rules: docs/metrics.md.
Exit status: 0 done, 2 bad input/options (one-line message), 3 with --strict when a metric failed.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: keys of the ``metrics:`` block of an options file (documented in options/reference/metrics.yml)
BLOCK_KEYS = ('sr_dir', 'gt_dir', 'out_dir', 'names', 'device', 'weights_dir', 'strip_suffixes', 'recursive',
              'crop_border', 'batch_size', 'seed', 'overwrite', 'resume', 'options')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument('-opt', '--opt', help='options YAML with a metrics: block (command-line flags win)')
    p.add_argument('--set', action='append', default=[], metavar='KEY.SUB=VALUE',
                   help='override a key of the options file, e.g. --set metrics.device=cuda')
    p.add_argument('--sr', help='folder of SR (restored) images')
    p.add_argument('--gt', help='folder of ground-truth images (needed by full-reference metrics and fid)')
    p.add_argument('--metrics', nargs='+', help='metric names or presets (default | dalpsr | all); '
                   'default: psnr ssim lpips dists fid niqe musiq maniqa clipiqa')
    p.add_argument('--out', help='output folder (default results/iqa/<name>)')
    p.add_argument('--name', help='method name in table.md (default: the SR folder name / options name)')
    p.add_argument('--device', help='cpu | cuda | cuda:N (default cpu)')
    p.add_argument('--weights-dir', help='metric weights folder, laid out like $TORCH_HOME/hub '
                   '(default $DALPSR_IQA_WEIGHTS, else torch.hub.get_dir())')
    p.add_argument('--strip-suffix', nargs='*', dest='strip_suffix',
                   help="suffixes removed from file stems before pairing (case-insensitive); "
                        "'none' disables; default _out _sr _x1 _x2 _x3 _x4 _x8 _lr2 _lr3 _lr4 _hr _gt")
    p.add_argument('--recursive', action='store_true', default=None, help='scan sub-folders too')
    p.add_argument('--crop-border', type=int, help='pixels cropped at each edge for psnr/ssim (default 0)')
    p.add_argument('--batch-size', type=int, help='same-size images scored per call (default 8)')
    p.add_argument('--seed', type=int, help='seed around every metric call (default 0)')
    p.add_argument('--metric-opt', action='append', default=[], metavar='METRIC.KEY=VALUE',
                   help='extra option of one metric, e.g. lpips.net=vgg, clip_i.pretrained=/w/clip.pt, '
                        'fid.num_workers=4 (values parsed as YAML)')
    p.add_argument('--overwrite', action='store_true', default=None, help='replace existing results in --out')
    p.add_argument('--resume', action='store_true', default=None, help='continue an interrupted run in --out')
    p.add_argument('--strict', action='store_true', help='exit with status 3 if any metric could not run')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    return p


def resolve(args) -> dict:
    """Merge the options file (if any) and the flags into evaluate_folders' arguments."""
    import yaml
    from dalpsr.utils.options import OptionError, check_keys, load_options
    block, name = {}, None
    if args.opt:
        opt = load_options(args.opt, args.set, is_train=False)
        block = dict(opt.get('metrics') or {})
        if not isinstance(block, dict):
            raise OptionError(f"{args.opt}: 'metrics' must be a mapping")
        check_keys(block, BLOCK_KEYS, f'metrics block of {args.opt}')
        name = opt.get('name')
    elif args.set:
        raise OptionError('--set needs -opt')
    flags = {'sr_dir': args.sr, 'gt_dir': args.gt, 'names': args.metrics, 'out_dir': args.out,
             'device': args.device, 'weights_dir': args.weights_dir, 'strip_suffixes': args.strip_suffix,
             'recursive': args.recursive, 'crop_border': args.crop_border, 'batch_size': args.batch_size,
             'seed': args.seed, 'overwrite': args.overwrite, 'resume': args.resume}
    cfg = {**block, **{k: v for k, v in flags.items() if v is not None}}
    options = {k: dict(v or {}) for k, v in dict(cfg.pop('options', None) or {}).items()}
    for item in args.metric_opt:
        if '=' not in item or '.' not in item.split('=', 1)[0]:
            raise OptionError(f"--metric-opt expects METRIC.KEY=VALUE, got '{item}'")
        key, raw = item.split('=', 1)
        metric, sub = key.split('.', 1)
        options.setdefault(metric.strip().lower(), {})[sub.strip()] = yaml.safe_load(raw) if raw != '' else ''
    if not cfg.get('sr_dir'):
        raise OptionError('no SR folder: pass --sr DIR (or metrics.sr_dir in the options file)')
    name = args.name or name or os.path.basename(os.path.normpath(cfg['sr_dir']))
    if not cfg.get('out_dir'):
        cfg['out_dir'] = os.path.join('results', 'iqa', name)
    strip = cfg.get('strip_suffixes')
    if strip is not None and [s for s in strip if str(s).lower() != 'none'] == []:
        cfg['strip_suffixes'] = []
    kwargs = dict(sr_dir=cfg['sr_dir'], gt_dir=cfg.get('gt_dir'), metrics=cfg.get('names'),
                  out_dir=cfg['out_dir'], name=name, device=cfg.get('device', 'cpu'),
                  weights_dir=cfg.get('weights_dir'), recursive=bool(cfg.get('recursive', False)),
                  batch_size=cfg.get('batch_size', 8), overwrite=bool(cfg.get('overwrite', False)),
                  resume=bool(cfg.get('resume', False)), progress=not args.no_progress,
                  crop_border=cfg.get('crop_border', 0), seed=cfg.get('seed', 0), options=options)
    if cfg.get('strip_suffixes') is not None:
        kwargs['strip_suffixes'] = cfg['strip_suffixes']
    return kwargs


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from dalpsr.metrics.iqa import IQAError, evaluate_folders
    from dalpsr.utils.options import OptionError
    try:
        kwargs = resolve(args)
        summary = evaluate_folders(**kwargs)
    except (IQAError, OptionError, FileNotFoundError, FileExistsError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    print()
    print(summary['table_md'], end='')
    failed = [m for m, info in summary['metrics'].items() if info['status'] != 'ok']
    if failed:
        print(f"not computed: {', '.join(failed)} (see {os.path.join(kwargs['out_dir'], 'iqa.log')})")
    print(f"results: {kwargs['out_dir']}")
    return 3 if (failed and args.strict) else 0


if __name__ == '__main__':
    sys.exit(main())
