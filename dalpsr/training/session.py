"""Step 3 of a training run: the session around the loop, once the folder exists.

It owns what must be opened and always closed (the log file, tensorboard, the signal handlers,
the progress bar, the training stream), resumes the training state from a checkpoint, and
finishes with the export.
"""
from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from dalpsr.training.folder import export_model, save_checkpoint, write_options_file
from dalpsr.training.setup import Run, StopFlag
from dalpsr.training.state import TrainingState
from dalpsr.training.steps import LogWindow
from dalpsr.utils.misc import get_time_str


@dataclass
class Session:
    run: Run
    ts: TrainingState
    stop: StopFlag
    writer: Any = None                      # tensorboard SummaryWriter (main process) or None
    losses: List[float] = field(default_factory=list)   # mean loss of each step of this session
    last_val: Dict[str, float] = field(default_factory=dict)
    last_ckpt: Optional[Path] = None
    bar: Any = None
    window: LogWindow = field(default_factory=LogWindow)
    _stream: ExitStack = field(default_factory=ExitStack)
    _loader: Any = None                     # (DataLoader, its iterator) while streaming

    @property
    def stop_at(self) -> int:
        """The last step of this session (``total_iter``, or ``stop_after_iter`` when smaller)."""
        t = self.run.t
        return t['total_iter'] if t['stop_after_iter'] is None else min(t['total_iter'], t['stop_after_iter'])

    def start_stream(self) -> Iterator[Any]:
        """The endless, deterministic training stream from the current position (resume), the
        modules in train mode, the progress bar."""
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        from dalpsr.data.loader import build_train_loader
        run, ts, t = self.run, self.ts, self.run.t
        per_micro = ts.batch_size * run.world
        if ts.counters.samples_seen % per_micro:
            raise RuntimeError(f'cannot resume: {ts.counters.samples_seen} samples seen is not a multiple of '
                               f'batch_size x processes = {per_micro}')
        pin = t['pin_memory'] if t['pin_memory'] is not None else run.accelerator.device.type == 'cuda'
        loader = build_train_loader(
            ts.train_set, ts.batch_size, seed=run.seed, num_workers=ts.num_workers, num_replicas=run.world,
            rank=run.rank, start_micro_step=ts.counters.samples_seen // per_micro, pin_memory=pin,
            prefetch_factor=t['prefetch_factor'], persistent_workers=bool(t['persistent_workers']))
        batches = iter(loader)
        ts.train_mode(True)
        show = bool(run.main and t['progress_bar'])
        self.bar = tqdm(total=t['total_iter'], initial=ts.counters.step, disable=not show, dynamic_ncols=True,
                        desc=str(run.opt['name']))
        self._stream.callback(self.bar.close)
        if show:
            self._stream.enter_context(logging_redirect_tqdm(loggers=[run.log]))
        self._loader = (loader, batches)
        return batches

    def end_stream(self) -> None:
        self._stream.close()
        self._loader = None  # the loader's workers end with it

    def checkpoint(self, step: int) -> Path:
        run, ts = self.run, self.ts
        self.last_ckpt = save_checkpoint(run.accelerator, run.ckpt_root, step, run.t['keep_checkpoints'], {
            'step': step, 'samples_seen': ts.counters.samples_seen, 'total_iter': run.t['total_iter'],
            'world_size': run.world, 'batch_size': ts.batch_size, 'grad_accum': run.t['grad_accum'],
            'seed': run.seed, 'time': get_time_str(), 'val': self.last_val})
        run.log.info('checkpoint saved: %s', self.last_ckpt)
        return self.last_ckpt

    def finish(self) -> Dict[str, Any]:
        """Export at ``total_iter`` (unless this session trained nothing and an export exists);
        the result of :func:`dalpsr.training.loop.train`."""
        run, ts = self.run, self.ts
        finished = ts.counters.step >= run.t['total_iter']
        export_dir = None
        if finished and run.t['export'] and (self.losses or not (run.exp_dir / 'export').is_dir()):
            export_dir = export_model(ts.model, run.exp_dir, ts.ema, run.accelerator)
            run.log.info('exported to %s', export_dir)
        elif not finished:
            run.log.info('stopped at step %d of %d; resume with --resume auto', ts.counters.step, run.t['total_iter'])
        return {'exp_dir': run.exp_dir, 'step': ts.counters.step, 'losses': self.losses, 'val': self.last_val,
                'model': ts.model, 'checkpoint': self.last_ckpt, 'export': export_dir,
                'accelerator': run.accelerator, 'ema': ts.ema,
                'stopped_by': self.stop.signal_name if self.stop.requested else None}


@contextmanager
def open_session(run: Run, ts: TrainingState) -> Iterator[Session]:
    """Log file, signal handlers, ``options.yml``, resume from ``run.resume_from``, tensorboard;
    all closed on exit, also on errors."""
    log, acc = run.log, run.accelerator
    fh = None
    if run.main:
        fh = logging.FileHandler(run.exp_dir / 'train.log', mode='a')
        fh.setFormatter(logging.Formatter('%(asctime)s %(levelname)s: %(message)s'))
        log.addHandler(fh)
    s = Session(run, ts, StopFlag(bool(run.t['handle_signals']), log), last_ckpt=run.resume_from)
    try:
        if run.main:
            write_options_file(run.exp_dir, run.opt, log)
        log.info('experiment %s (%s), %s process(es), device %s, mixed precision %s', run.exp_dir,
                 {'fresh': 'new', 'archive': 'new; the old folder was archived'}.get(run.action, 'resuming'),
                 run.world, acc.device, run.t['mixed_precision'])
        log.info('train set: %d items (%s); batch %d x %d process(es) x %d accumulation = %d samples/step',
                 len(ts.train_set), type(ts.train_set).__name__, ts.batch_size, run.world, run.t['grad_accum'],
                 ts.batch_size * run.world * run.t['grad_accum'])
        if run.resume_from is not None:
            acc.load_state(str(run.resume_from))
            log.info('resumed from %s at step %d', run.resume_from, ts.counters.step)
            if acc.step % run.t['grad_accum']:
                acc.step = 0
        if run.main and run.t['tensorboard']:
            try:
                from torch.utils.tensorboard import SummaryWriter
                s.writer = SummaryWriter(log_dir=str(run.exp_dir / 'tb'),
                                         purge_step=ts.counters.step + 1 if ts.counters.step else None)
            except ImportError as err:
                log.warning('tensorboard disabled: %s', err)
        yield s
    finally:
        s.end_stream()
        s.stop.restore()
        if s.writer is not None:
            s.writer.close()
        if fh is not None:
            log.removeHandler(fh)
            fh.close()
