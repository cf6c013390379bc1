#!/usr/bin/env python
"""Inference over test sets (paper IV-B): LR folders of any size -> SR images + metrics.

Run::

    python dalpsr/test.py -opt options/test/test_dalpsr_sd21.yml [--set sampler.num_steps=20] [--force]

In Python (tests): ``from dalpsr.test import test; test(opt)`` with ``opt`` from
``dalpsr.utils.options.load_options(path, is_train=False)`` (or a plain dict).

The method is chosen in the options (``method: {type: DaLPSRDiffusion}``, the default; any
restorer of ``RESTORER_REGISTRY``, e.g. ``Bicubic``). Everything else is the same for every
method and lives in :mod:`dalpsr.inference` (options, input rules, prompt caches, result
folders and records, the per-image runner). Options: options/reference/test.yml documents
every key; guide: docs/inference.md.
"""
from __future__ import annotations

import os
import sys

if __name__ == '__main__' and not __package__:  # run as a plain script: import the package, not siblings
    _here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or '.') == _here:
        sys.path.pop(0)
    _root = os.path.dirname(_here)
    if _root not in sys.path:
        sys.path.insert(0, _root)

import argparse  # noqa: E402
from typing import List, Optional  # noqa: E402

from dalpsr.inference.inputs import InputRejected, gt_index, list_set_images, load_lr  # noqa: E402,F401
from dalpsr.inference.inputs import gt_key as _gt_key  # noqa: E402,F401
from dalpsr.inference.options import DATASET_KEYS, TEST_DEFAULTS, image_seed, resolve_test_opt  # noqa: E402,F401
from dalpsr.inference.options import device as _device  # noqa: E402,F401
from dalpsr.inference.runner import test  # noqa: E402,F401
from dalpsr.utils.options import OptionError, load_options  # noqa: E402


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Inference over test sets with the method of the options (docs/inference.md)')
    p.add_argument('-opt', '--opt', required=True, help='options YAML (options/reference/test.yml documents every key)')
    p.add_argument('--set', action='append', default=[], metavar='KEY.SUB=VALUE',
                   help='override an option (repeatable), e.g. --set sampler.num_steps=20')
    p.add_argument('--force', action='store_true',
                   help='archive an existing results/<name> made with other options (renamed with a timestamp)')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Command line: one-line errors for bad options, missing files or a refused folder."""
    args = build_arg_parser().parse_args(argv)
    try:
        opt = load_options(args.opt, args.set, is_train=False)
        test(opt, force=args.force)
    except (OptionError, FileExistsError, FileNotFoundError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
