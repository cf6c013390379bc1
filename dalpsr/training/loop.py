"""The one training loop of dalpsr (every model trains through it); guide: docs/training.md.

The named steps live next door: :mod:`~dalpsr.training.setup` (options, Accelerate, the folder
decision), :mod:`~dalpsr.training.state` (data, model, optimizer, LR schedule, EMA),
:mod:`~dalpsr.training.session` (log, tensorboard, signals, resume, export),
:mod:`~dalpsr.training.steps` (one train step, validation, log window) and
:mod:`~dalpsr.training.folder` (the experiment folder, checkpoints).
"""
from __future__ import annotations

from typing import Any, Dict

from dalpsr.training.folder import open_experiment_folder
from dalpsr.training.session import open_session
from dalpsr.training.setup import setup_accelerator
from dalpsr.training.state import build_training_state
from dalpsr.training.steps import stop_requested, train_step, validate


def train(opt: Dict[str, Any]) -> Dict[str, Any]:
    """Train ``opt['model']`` on ``opt['datasets']`` with ``opt['train']``.

    Returns ``{'exp_dir': Path, 'step': int, 'losses': [mean loss of each step of this
    session], 'val': last validation metrics, 'model': the model, 'checkpoint': last path,
    'export': export folder or None, 'accelerator', 'ema', 'stopped_by': the signal that
    stopped the run ('SIGINT', 'SIGTERM', 'SIGUSR1') or None}``.
    """
    run = setup_accelerator(opt)                  # options checked, Accelerate, folder decided
    ts = build_training_state(run)                # data, model, optimizer, scheduler, EMA
    open_experiment_folder(run.exp_dir, run.action, run.accelerator)  # only now touch the disk
    t, total = run.t, run.t['total_iter']
    with open_session(run, ts) as s:              # log file, tensorboard, signals, resume
        if ts.counters.step >= total:
            run.log.info('experiment already trained to step %d (total_iter %d)', ts.counters.step, total)
            return s.finish()
        if ts.counters.step == 0:                 # a new run (a resumed one has it in its checkpoint)
            ts.model.before_training(ts.train_set, run.log)
            if ts.ema is not None:
                ts.ema.reset_to_current()
        if t['val_at_start'] and ts.counters.step == 0:
            s.last_val = validate(run, ts, s.writer, 0)
        s.window.reset()                          # s/step and eta count training steps only, not the above
        batches = s.start_stream()
        while ts.counters.step < s.stop_at:
            res = train_step(run, ts, batches)
            step = ts.counters.step
            s.losses.append(res.loss)
            s.window.add(res)
            s.bar.update(1)
            if step % t['print_freq'] == 0 or step == s.stop_at:
                s.window.report(run, ts, step, s.stop_at, s.bar, s.writer)
            if (t['val_freq'] and step % t['val_freq'] == 0) or step == total:
                s.last_val = validate(run, ts, s.writer, step)
            stop_now = stop_requested(run, s.stop)
            if (t['checkpoint_freq'] and step % t['checkpoint_freq'] == 0) or step == s.stop_at or stop_now:
                s.checkpoint(step)
            if stop_now:
                run.log.warning('stop requested by %s: checkpoint written at step %d; run the same command '
                                'again to resume', s.stop.signal_name or 'a signal', step)
                break
        del batches
        s.end_stream()
        return s.finish()
