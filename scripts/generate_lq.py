#!/usr/bin/env python
"""Write a degraded triplet set (HR crop, LR, one JSONL line with prompt/labels/params) to disk.

    # training / validation triplets (read by TripletFolderDataset)
    python scripts/generate_lq.py --hr datasets/HR --out datasets/train_triplets --num 20000 --workers 8
    python scripts/generate_lq.py --hr sample:val --out datasets/val_triplets --num 16 --seed 1
    # synthetic test set the papers' way (DIV2K-Val: 3k random 512 crops -> GT/ and LR/)
    python scripts/generate_lq.py --testset --hr datasets/DIV2K_valid_HR --out datasets/DIV2K-Val-3k \
        --num 3000 --seed 0 --workers 8
    # a paper's DIV2K-Val by its preset (count, crop, degradation and seed; dalpsr/data/testset_presets.py)
    python scripts/generate_lq.py --preset div2k-val-3k-stablesr --hr datasets/DIV2K_valid_HR \
        --out datasets/DIV2K-Val-3k-stablesr --workers 8

--hr: a folder of images, an image list (BasicSR meta file; paths relative to --hr-root),
'sample:train' / 'sample:val' (photos shipped in installed packages). Sample i uses image
i % (number of images) and depends only on --seed and i (not on --workers). Running the same
command again resumes (finished samples are kept); a non-empty --out that is not such a set is
refused unless --overwrite (the old folder is archived with a timestamp, never deleted).
Several processes, GPUs or machines: start the same command with ``accelerate launch``
(docs/scaling.md); process r of n writes every n-th group of samples, the main process merges,
and the set is the same bytes whatever n (and resumes with any n after a kill).
Targets: gt/ holds the L1 target (degradation.l1_gt_usm, default true: the USM-sharpened crop,
as x4plus); --testset writes the crop as read to GT/ (l1_gt_usm defaults to false there) while
the LR is still made from the sharpened crop (gt_usm, default true).
Degradation / prompt options: -opt FILE (YAML with degradation:, prompt:, small_image:,
caption_file: blocks, see options/reference/data.yml) and/or --set degradation.jpeg_range=[60,95];
or a training YAML with --block datasets.train (its dataset's degradation, prompt, small_image).
Layout and rules: dalpsr/data/triplet_writer.py and docs/degradation.md.
Exit status: 0 done, 2 bad input/options (one-line message), 130 interrupted.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: keys an -opt file may hold (TripletDataset options that generate_lq does not take as flags)
OPT_KEYS = ('degradation', 'prompt', 'small_image', 'caption_file')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument('--out', required=True, help='output folder')
    p.add_argument('--hr', default='sample:train',
                   help="HR images: folder, meta file (with --hr-root), 'sample:train' or 'sample:val'")
    p.add_argument('--hr-root', default=None, help='folder the paths of a meta file --hr are relative to')
    p.add_argument('--num', type=int, default=None, help='number of samples (default: one per HR image)')
    p.add_argument('--seed', type=int, default=None, help='default 0 (or the preset\'s)')
    p.add_argument('--gt-size', type=int, default=None, help='HR crop size; 0 keeps whole images (default 512)')
    p.add_argument('--scale', type=int, default=None, help='default 4')
    p.add_argument('--testset', action='store_true',
                   help='synthetic test set: random crops, no flips, GT/ and LR/ folders with the same names')
    p.add_argument('--preset', default=None,
                   help='a paper\'s synthetic test set (implies --testset): its count, crop size, scale, seed and '
                        'degradation as defaults under the flags/-opt/--set (dalpsr/data/testset_presets.py: '
                        'div2k-val-3k-seesr, div2k-val-3k-stablesr, div2k-val-2k-sspir, div2k-val-100-deplsr)')
    p.add_argument('--no-flip', action='store_true', help='training set without flips/rotations')
    p.add_argument('-opt', '--opt', default=None, help='YAML with degradation/prompt/small_image/caption_file')
    p.add_argument('--block', default=None, metavar='DOTTED.KEY',
                   help='take degradation/prompt/small_image from this dataset block of the -opt file '
                        '(a training YAML), e.g. --block datasets.train')
    p.add_argument('--set', action='append', default=[], metavar='KEY.SUB=VALUE',
                   help='override an -opt key, e.g. --set degradation.jpeg_range=[60,95] (repeatable)')
    p.add_argument('--small-image', choices=['pad', 'skip'], default=None,
                   help='images smaller than the crop: reflect-pad (default) or skip')
    p.add_argument('--caption-file', default=None, help='caption JSONL (key = image stem) stored with each sample')
    p.add_argument('--workers', type=int, default=1, help='processes (output does not depend on it)')
    p.add_argument('--threads', type=int, default=1, help='OpenCV/torch threads per worker process')
    p.add_argument('--overwrite', action='store_true', help='start fresh: a non-empty --out is archived (renamed with a timestamp), never deleted')
    p.add_argument('--no-progress', action='store_true')
    p.add_argument('--quiet', action='store_true', help='no summary at the end')
    return p


def _apply_preset(args):
    """Fill the unset flags from ``--preset`` (or the plain defaults); returns the preset or None."""
    preset = None
    if args.preset:
        from dalpsr.data.testset_presets import testset_preset
        preset = testset_preset(args.preset)
        args.testset = True
        for key in ('num', 'seed', 'gt_size', 'scale'):
            if getattr(args, key) is None:
                setattr(args, key, preset[key])
    for key, default in (('seed', 0), ('gt_size', 512), ('scale', 4)):
        if getattr(args, key) is None:
            setattr(args, key, default)
    return preset


def load_opt(path, overrides, block=None, base=None):
    """The -opt file: top-level degradation/prompt/small_image/caption_file keys, or (``block``,
    e.g. 'datasets.train') the degradation/prompt/small_image of a dataset block of a training
    YAML, so a written set degrades exactly like the training data. ``base``: degradation settings
    (a preset's) that the file and the overrides update."""
    import copy

    from dalpsr.utils.options import OptionError, apply_overrides, check_keys, get_opt, load_yaml
    opt = load_yaml(path) if path else {}
    if block:
        if not path:
            raise OptionError('--block needs -opt FILE')
        ds = get_opt(dict(opt, _source=path), block)
        if not isinstance(ds, dict):
            raise OptionError(f"'{block}' in {path} is not a dataset block")
        opt = {k: ds[k] for k in ('degradation', 'prompt', 'small_image') if k in ds and ds[k] is not None}
    for k in OPT_KEYS:
        if k in ('degradation', 'prompt'):
            opt.setdefault(k, {})
    apply_overrides(opt, overrides, source=path or 'the generate_lq options')
    check_keys(opt, OPT_KEYS, path or 'generate_lq options')
    for k in ('degradation', 'prompt'):
        if opt.get(k) is None:
            opt[k] = {}
        if not isinstance(opt[k], dict):
            raise OptionError(f"'{k}' must be a mapping in {path or 'the options'}")
    if base:
        opt['degradation'] = {**copy.deepcopy(base), **opt['degradation']}
    return opt


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from dalpsr.data.triplet_writer import write_triplets
    from dalpsr.utils.options import OptionError
    from dalpsr.utils.sharding import current_shard
    shard = current_shard()  # rank 0 of 1 unless started by accelerate launch
    try:
        preset = _apply_preset(args)
        opt = load_opt(args.opt, args.set, args.block, base=preset and preset['degradation'])
        if args.testset:  # a test set's GT is the HR crop as read, not a sharpened training target
            opt['degradation'].setdefault('l1_gt_usm', False)
        hr, meta_info = args.hr, None
        if os.path.isfile(args.hr) and not args.hr.lower().endswith(
                ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')):
            hr, meta_info = args.hr_root, args.hr
        elif not args.hr.startswith('sample:') and not os.path.exists(args.hr):
            raise FileNotFoundError(f'--hr {args.hr}: no such folder or file')
        res = write_triplets(
            args.out, hr=hr, meta_info=meta_info, num=args.num, seed=args.seed, gt_size=args.gt_size,
            scale=args.scale, testset=args.testset,
            use_hflip=False if args.no_flip else None, use_rot=False if args.no_flip else None,
            degradation=opt.get('degradation'), prompt=opt.get('prompt') or None,
            small_image=args.small_image or opt.get('small_image', 'pad'),
            caption_file=args.caption_file or opt.get('caption_file'), workers=args.workers,
            threads=args.threads, overwrite=args.overwrite, progress=not args.no_progress, shard=shard)
    except (FileExistsError, FileNotFoundError, ValueError, RuntimeError, OptionError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('interrupted: finished samples are kept; run the same command again to resume', file=sys.stderr)
        return 130
    if args.preset and shard.is_main:  # the preset's name and sources beside generate.json
        from dalpsr.data.testset_presets import testset_preset
        from dalpsr.utils.misc import atomic_write_json
        atomic_write_json(os.path.join(res['out_dir'], 'preset.json'),
                          {'preset': args.preset, **testset_preset(args.preset),
                           'flags': {k: getattr(args, k) for k in ('num', 'seed', 'gt_size', 'scale')},
                           'overrides': {'opt': args.opt, 'block': args.block, 'set': list(args.set)}})
    if not args.quiet and shard.is_main:
        from dalpsr.data.triplet_dataset import summarize_triplets
        print(summarize_triplets(res['out_dir'], prompt=opt.get('prompt') or None))
        if res['skipped_inputs']:
            print(f"{len(res['skipped_inputs'])} input file(s) skipped (reasons in {res['out_dir']}/generate.log)")
    return 0


if __name__ == '__main__':
    sys.exit(main())
