#!/usr/bin/env python
"""Compare methods on the same test sets: metrics, s/img and peak memory, beside the published numbers.

    python scripts/compare.py -opt options/compare/ci_tiny.yml [--set metrics.device=cuda] [--force]

Each method is a test options file of dalpsr/test.py (with overrides); each cell method x set runs
through test.py's core, is scored with the metric code of scripts/iqa.py and recorded; a finished
cell is not rerun, a failing one is reported and the others go on. Writes table.md / table.csv /
table.json and figure.png into <path.results_root>/<name>/. Guide: docs/compare.md; every key:
options/reference/compare.yml. Exit status: 0 every cell ok, 1 some cell failed (see the table),
2 bad options / inputs or a refused folder (one-line message).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-opt', '--opt', required=True, help='compare options YAML (options/compare/)')
    p.add_argument('--set', action='append', default=[], metavar='KEY.SUB=VALUE',
                   help='override a key of the compare options (repeatable), e.g. --set metrics.device=cuda')
    p.add_argument('--force', action='store_true',
                   help='archive an existing comparison folder made with other options (renamed with a timestamp)')
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from dalpsr.compare.harness import compare
    from dalpsr.compare.options import load_compare_options
    from dalpsr.utils.options import OptionError
    try:
        opt = load_compare_options(args.opt, args.set)
        res = compare(opt, force=args.force)
    except (OptionError, FileNotFoundError, FileExistsError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    print((res['dir'] / 'table.md').read_text(encoding='utf-8'))
    print(f"cells run {len(res['ran'])}, done before {len(res['done_before'])}, failed {len(res['failed'])}; "
          f"results: {res['dir']}" + (f"; figure: {res['figure']}" if res['figure'] else ''))
    return 1 if res['failed'] else 0


if __name__ == '__main__':
    sys.exit(main())
