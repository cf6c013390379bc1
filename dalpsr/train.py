#!/usr/bin/env python
"""The one training loop of dalpsr (every model trains through it): the command line.

Run::

    python dalpsr/train.py -opt options/train/train_irpad_cpu.yml [--set train.total_iter=200]
        [--resume auto|no|PATH/checkpoint-N] [--force]
    accelerate launch --multi_gpu --num_processes 2 dalpsr/train.py -opt ...   # several processes

In Python (tests): ``from dalpsr.train import train; train(opt)`` with ``opt`` from
``dalpsr.train.parse_args`` / ``dalpsr.utils.options.load_options`` (or a dict with ``name``,
``model``, ``datasets``, ``train``). The loop itself, in named steps: dalpsr/training/
(``loop.py`` is the loop; options schema: options/reference/train.yml; guide: docs/training.md).

What it does:

* experiments/<name>/ holds ``options.yml``, ``train.log``, ``tb/`` (tensorboard),
  ``checkpoints/checkpoint-<step>/`` (``accelerator.save_state``: trainable modules, optimizer,
  LR scheduler, grad scaler, RNG states of every process, EMA, loop state) and ``export/``
  (``model.export`` at the end). An existing folder is resumed from its latest checkpoint when
  its ``model``/``datasets``/``seed`` options match (``--resume auto``, default; refused with
  the changed keys otherwise), refused (``--resume no``), or archived with a timestamp
  (``--force``); never overwritten silently (the rule of dalpsr/utils/experiment.py).
* Accelerate: mixed precision (``fp16``/``bf16`` autocast; trainable weights stay fp32),
  gradient accumulation (``grad_accum`` micro-batches per optimizer step), gradient clipping,
  DDP over processes. One "iteration"/step is one optimizer step.
* Data: an endless deterministic sampler (dalpsr/data/loader.py): the samples a run sees do
  not depend on workers, processes or resume point, so an interrupted and resumed run ends
  with the same weights as an uninterrupted one.
* Signals (``train.handle_signals``, default on): SIGTERM, SIGUSR1 or SIGINT (Ctrl-C) let the
  step in flight finish, write a checkpoint and end the run (exit status 130 for SIGINT, 0
  otherwise); the same command resumes. A second Ctrl-C stops at once without a checkpoint.
* Options: an unknown key anywhere stops the run with one line naming it; ``--set`` may set a
  documented key whose block the file lacks (``--set path.experiments_root=/data/exp``).
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
from typing import Any, Dict, List, Optional  # noqa: E402

from dalpsr.training.loop import train  # noqa: E402
from dalpsr.training.options import TOP_KEYS  # noqa: E402
from dalpsr.utils.options import OptionError, load_options  # noqa: E402
from dalpsr.utils.plugins import import_plugins  # noqa: E402,F401  (dalpsr/test.py imports it from here)

__all__ = ['build_arg_parser', 'parse_args', 'main', 'train']


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='dalpsr training loop (one loop for every model)')
    p.add_argument('-opt', '--opt', required=True, help='path to the options YAML file')
    p.add_argument('--set', action='append', default=[], metavar='KEY.SUB=VALUE',
                   help='override an option (repeatable), e.g. --set train.total_iter=100')
    p.add_argument('--resume', default='auto', metavar='auto|no|CHECKPOINT_DIR',
                   help="auto (default): continue experiments/<name> from its latest checkpoint; "
                        "no: refuse if the experiment folder exists; or a checkpoint-<step> folder to start from")
    p.add_argument('--force', action='store_true',
                   help='archive an existing experiment folder (renamed with a timestamp) and start afresh')
    return p


def parse_args(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Options from the command line: the file, ``--set`` overrides, the checked top level."""
    args = build_arg_parser().parse_args(argv)
    opt = load_options(args.opt, args.set, is_train=True, top_keys=TOP_KEYS)
    opt['_args'] = {'resume': args.resume, 'force': args.force, 'overrides': list(args.set)}
    return opt


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry: parse, train; one-line errors (exit 2) for bad options or folders."""
    try:
        opt = parse_args(argv)
        res = train(opt)
    except (OptionError, FileExistsError, FileNotFoundError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    return 130 if res.get('stopped_by') == 'SIGINT' else 0


if __name__ == '__main__':
    sys.exit(main())
