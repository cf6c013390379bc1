"""The training loop, in named steps (guide: docs/training.md; entry point: dalpsr/train.py).

=========================  ==================================================================
module                      what
=========================  ==================================================================
``loop``                    :func:`train`: the loop itself, readable in one screen
``setup``                   step 1: options checked, Accelerate started, the folder decided
``state``                   step 2: data, model, optimizer, LR schedule, EMA (``TrainingState``)
``session``                 step 3: log file, tensorboard, signals, resume, export
``steps``                   one train step, validation, the log window, the stop check
``folder``                  the experiment folder rule, checkpoints, export
``options``                 the keys of a training options file, defaults and checks
=========================  ==================================================================
"""
from dalpsr.training.loop import train

__all__ = ['train']
