#!/usr/bin/env python
"""Prepare the papers' test sets from what you downloaded: LR/ and HR/ folders with the same file names.

    # RealSR / DRealSR the StableSR way (128 px LR centre crops, 512 px HR; SeeSR, DaLPSR, SSP-IR, DeeDSR)
    python scripts/prepare_testsets.py --protocol realsr-stablesr --lr "datasets/RealSR(V3)" \
        --hr "datasets/RealSR(V3)" --out datasets/RealSR-stablesr
    python scripts/prepare_testsets.py --protocol drealsr-stablesr --lr datasets/DRealSR/x4/Test_x4/test_LR \
        --hr datasets/DRealSR/x4/Test_x4/test_HR --out datasets/DRealSR-stablesr
    # whole RealSR (V3) images (DePLSR), one camera
    python scripts/prepare_testsets.py --protocol realsr-v3-full --lr "datasets/RealSR(V3)/Canon/Test/4" \
        --hr "datasets/RealSR(V3)/Canon/Test/4" --out datasets/RealSR-v3-Canon
    # a paper's synthetic DIV2K-Val (generate_lq.py's preset: crops, count, degradation, seed)
    python scripts/prepare_testsets.py --protocol div2k-val-3k-seesr --hr datasets/DIV2K_valid_HR \
        --out datasets/DIV2K-Val-3k-seesr

Pairs are found recursively by key (file stem without the protocol's suffix: RealSR `_LR4` / `_HR`,
DRealSR `_x4` / `_x1`; --lr-suffix / --hr-suffix change them). prepare.json records the protocol,
the sources and every crop box; the same command resumes, other settings are refused (--force
archives the folder). Protocols: dalpsr/compare/testsets.py and dalpsr/data/testset_presets.py.
Exit status: 0 done, 2 bad input (one-line message).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--protocol', required=True, help='realsr-stablesr | drealsr-stablesr | realsr-v3-full | '
                   'div2k-val-3k-seesr | div2k-val-3k-stablesr | div2k-val-2k-sspir | div2k-val-100-deplsr')
    p.add_argument('--lr', help='folder with the LR images (searched recursively; crop protocols)')
    p.add_argument('--hr', required=True, help='folder with the HR images (searched recursively)')
    p.add_argument('--out', required=True, help='output folder (LR/, HR/ or GT/, prepare.json)')
    p.add_argument('--scale', type=int, default=4)
    p.add_argument('--lr-size', type=int, default=None, help='LR crop size (default: the protocol\'s, 128)')
    p.add_argument('--lr-suffix', default=None, help='suffix of LR stems (default: the protocol\'s)')
    p.add_argument('--hr-suffix', default=None, help='suffix of HR stems (default: the protocol\'s)')
    p.add_argument('--num', type=int, default=None, help='synthetic sets: fewer samples than the preset (a test run)')
    p.add_argument('--workers', type=int, default=1, help='synthetic sets: processes of generate_lq')
    p.add_argument('--force', action='store_true', help='archive an existing --out made with other settings')
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from dalpsr.compare.testsets import CROP_PROTOCOLS, prepare_testset
    from dalpsr.data.testset_presets import TESTSET_PRESETS
    if args.protocol in TESTSET_PRESETS:  # the synthetic sets are generate_lq.py presets: run that script
        import importlib.util
        spec = importlib.util.spec_from_file_location('_generate_lq', os.path.join(os.path.dirname(
            os.path.abspath(__file__)), 'generate_lq.py'))
        glq = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(glq)
        argv = ['--preset', args.protocol, '--hr', args.hr, '--out', args.out, '--workers', str(args.workers)]
        argv += (['--num', str(args.num)] if args.num else []) + (['--overwrite'] if args.force else [])
        return glq.main(argv + ['--no-progress'])
    try:
        if args.protocol in CROP_PROTOCOLS:
            if not args.lr:
                raise ValueError(f'--protocol {args.protocol} needs --lr')
            rec = prepare_testset(args.protocol, args.lr, args.hr, args.out, scale=args.scale, lr_size=args.lr_size,
                                  lr_suffix=args.lr_suffix, hr_suffix=args.hr_suffix, force=args.force)
        else:
            raise ValueError(f"unknown protocol '{args.protocol}' (known: "
                             f"{', '.join(list(CROP_PROTOCOLS) + list(TESTSET_PRESETS))})")
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    c = rec['counts']
    print(f"{args.out}: {c['written']} pairs ({rec['protocol_text']}); skipped {c['skipped']}, unpaired {c['unpaired']}")
    for s in rec['skipped'][:10]:
        print(f"  skipped {s['key']}: {s['reason']}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
