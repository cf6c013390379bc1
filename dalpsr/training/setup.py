"""Step 1 of a training run: check the options, start Accelerate, decide about the folder.

Also the small pieces the loop carries around: :class:`LoopState` (the counters saved with
every checkpoint), :class:`StopFlag` (signals), :func:`isolated_rng` (validation does not move
the training RNG) and :func:`to_device`.
"""
from __future__ import annotations

import logging
import random
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from dalpsr.training.folder import plan_experiment
from dalpsr.training.options import check_train_options, experiments_root, get_seed, resolve_train_opt
from dalpsr.utils.plugins import import_plugins


@dataclass
class Run:
    """What every step of a run reads: the options, the resolved ``train`` block ``t``, the
    Accelerator and the folder decision (see :func:`setup_accelerator`)."""
    opt: Dict[str, Any]
    t: Dict[str, Any]
    seed: int
    exp_dir: Path
    accelerator: Any
    action: str                      # plan_experiment: fresh | archive | resume | archive_then_resume
    resume_from: Optional[Path]
    log: logging.Logger

    @property
    def ckpt_root(self) -> Path:
        return self.exp_dir / 'checkpoints'

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index


def setup_accelerator(opt: Dict[str, Any]) -> Run:
    """Check the options tree, import plugins, start Accelerate (mixed precision, gradient
    accumulation, DDP) and decide about the experiment folder. Nothing is written yet."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    import dalpsr.archs  # noqa: F401  (fill the registries before plugins add to them)
    import dalpsr.data  # noqa: F401
    import dalpsr.losses  # noqa: F401
    import dalpsr.models  # noqa: F401
    from dalpsr.utils.logger import get_root_logger

    check_train_options(opt)
    import_plugins(opt)
    t = resolve_train_opt(opt)
    seed = get_seed(opt)
    args = opt.get('_args') or {}
    exp_dir = experiments_root(opt) / str(opt['name'])

    reset_accelerate_state()
    accelerator = Accelerator(
        cpu=bool(t['cpu']) or not torch.cuda.is_available(), mixed_precision=t['mixed_precision'],
        gradient_accumulation_steps=t['grad_accum'], step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=bool(t['ddp_find_unused_parameters'])),
                         InitProcessGroupKwargs(timeout=timedelta(minutes=30))])
    if t['allow_tf32'] and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # decided identically on every process before anything is built
    action, resume_from = plan_experiment(exp_dir, args.get('resume', 'auto'), bool(args.get('force', False)), opt)
    log = get_root_logger(main_process=accelerator.is_main_process)
    return Run(opt, t, seed, exp_dir, accelerator, action, resume_from, log)


def reset_accelerate_state() -> None:
    """Allow several in-process runs (tests) with different settings; keeps a launched
    distributed environment untouched."""
    try:
        from accelerate.state import AcceleratorState, GradientState
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    except Exception:  # noqa: BLE001 - older/newer accelerate without these helpers
        pass


class LoopState:
    """Counters of the loop, saved with every checkpoint (``register_for_checkpointing``)."""

    def __init__(self):
        self.step = 0            # completed optimizer steps
        self.samples_seen = 0    # global training-stream position (all processes together)

    def state_dict(self) -> Dict[str, int]:
        return {'step': self.step, 'samples_seen': self.samples_seen}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.step = int(state['step'])
        self.samples_seen = int(state['samples_seen'])


class StopFlag:
    """Set by SIGTERM, SIGINT (Ctrl-C) or SIGUSR1: the loop finishes the step in flight, writes a
    checkpoint and returns; running the same command again resumes. A second SIGINT raises
    :class:`KeyboardInterrupt` at once (no checkpoint). The previous handlers come back with
    :meth:`restore`. Off with ``handle_signals: false`` or outside the main thread; a SIGINT
    that the process was started to ignore (a background job of a script) stays ignored."""

    SIGNALS = ('SIGTERM', 'SIGINT', 'SIGUSR1')

    def __init__(self, enabled: bool, log: Optional[logging.Logger] = None):
        self.requested = False
        self.signal_name: Optional[str] = None
        self.log = log
        self._old: Dict[int, Any] = {}
        if not enabled:
            return
        try:
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None and not (name == 'SIGINT' and signal.getsignal(sig) is signal.SIG_IGN):
                    self._old[sig] = signal.signal(sig, self._handler)  # an ignored SIGINT stays ignored
        except ValueError:  # not in the main thread
            self.restore()

    def _handler(self, signum, frame):  # noqa: ARG002
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt(f'second {name}: stopped without a checkpoint')
        self.requested, self.signal_name = True, self.signal_name or name
        if self.log is not None:
            self.log.warning('%s received: finishing the step, writing a checkpoint, then stopping%s', name,
                             ' (Ctrl-C again stops at once, without a checkpoint)' if signum == signal.SIGINT else '')

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


@contextmanager
def isolated_rng(device: torch.device):
    """Run a block (validation) without changing any global RNG the training uses."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device.index or 0] if device.type == 'cuda' else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a batch (dict / list / tuple of tensors) moved to ``device``; the rest as is."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and torch.is_tensor(batch[0]):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
