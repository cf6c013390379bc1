"""The steps the loop repeats: one optimizer step, validation, the log window, the stop check."""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Dict, Iterator, Optional

import torch

from dalpsr.training.setup import Run, StopFlag, isolated_rng, to_device
from dalpsr.training.state import TrainingState


@dataclass
class StepResult:
    """One optimizer step: the mean loss over its micro-batches, the other floats the model
    returned (means), the gradient norm before clipping (None without clipping), data time."""
    loss: float
    logs: Dict[str, float] = field(default_factory=dict)
    grad_norm: Optional[float] = None
    data_time: float = 0.0


def train_step(run: Run, ts: TrainingState, batches: Iterator[Any]) -> StepResult:
    """``grad_accum`` micro-batches (forward under autocast, backward, gradients all-reduced on
    the last), clipping, the optimizer step, the LR scheduler step, the EMA update."""
    acc, ga = run.accelerator, run.t['grad_accum']
    res = StepResult(loss=0.0)
    grad_norm = None
    for micro in range(ga):
        t0 = time.time()
        batch = to_device(next(batches), acc.device)
        res.data_time += time.time() - t0
        with acc.accumulate(*ts.nets):
            with acc.autocast():
                out = ts.model.training_step(batch, ts.counters.step)
            loss = out['loss']
            if not torch.isfinite(loss.detach()).all():
                raise FloatingPointError(f'non-finite loss {loss.item()} at step {ts.counters.step + 1} '
                                         f'(micro-batch {micro}); lower the LR or use bf16/fp32')
            acc.backward(loss)
            if acc.sync_gradients:
                if run.t['max_grad_norm']:
                    grad_norm = acc.clip_grad_norm_(ts.params, float(run.t['max_grad_norm']))
                ts.optimizer.step()
                ts.optimizer.zero_grad(set_to_none=True)
        res.loss += float(loss.detach()) / ga
        for k, v in out.items():
            if k != 'loss':
                res.logs[k] = res.logs.get(k, 0.0) + float(v) / ga
        ts.counters.samples_seen += ts.batch_size * run.world
    if not acc.sync_gradients:
        raise RuntimeError('internal: gradient accumulation out of step with the loop')
    ts.scheduler.step()
    ts.counters.step += 1
    if ts.ema is not None:
        ts.ema.update(ts.counters.step)
    res.grad_norm = None if grad_norm is None else float(grad_norm)
    return res


def validate(run: Run, ts: TrainingState, writer, step: int) -> Dict[str, float]:
    """``model.validate`` on every process (EMA weights swapped in, training RNG untouched);
    metrics logged and written to tensorboard."""
    if ts.val_loader is None:
        return {}
    ts.train_mode(False)
    t0 = time.time()
    with isolated_rng(run.accelerator.device), (ts.ema.swap() if ts.ema is not None else nullcontext()), \
            run.accelerator.autocast():
        metrics = ts.model.validate(ts.val_loader, step, writer) or {}
    ts.train_mode(True)
    metrics = {k: float(v) for k, v in metrics.items()}
    if metrics:
        run.log.info('[val step %d] %s (%.1f s)', step, ', '.join(f'{k} {v:.4g}' for k, v in metrics.items()),
                     time.time() - t0)
    if writer is not None:
        for k, v in metrics.items():
            writer.add_scalar(f'val/{k}', v, step)
    return metrics


def stop_requested(run: Run, stop: StopFlag) -> bool:
    """True when a signal asked to stop, on any process (all processes agree)."""
    stop_now = stop.requested
    if run.world > 1 and run.t['handle_signals']:
        flag = torch.tensor([1.0 if stop_now else 0.0], device=run.accelerator.device)
        stop_now = bool(run.accelerator.reduce(flag, reduction='sum').item() > 0)
    return stop_now


class LogWindow:
    """Means of the loss and the other logged floats over the steps since the last log line,
    averaged over processes, to the log, the progress bar and tensorboard."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: Dict[str, float] = {}
        self.n = 0
        self.t_start = time.time()
        self.t_data = 0.0

    def add(self, res: StepResult) -> None:
        for k, v in res.logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.sums['loss'] = self.sums.get('loss', 0.0) + res.loss
        if res.grad_norm is not None:
            self.sums['grad_norm'] = self.sums.get('grad_norm', 0.0) + res.grad_norm
        self.t_data += res.data_time
        self.n += 1

    def report(self, run: Run, ts: TrainingState, step: int, stop_at: int, bar=None, writer=None) -> Dict[str, float]:
        acc, keys = run.accelerator, sorted(self.sums)
        vals = torch.tensor([self.sums[k] / self.n for k in keys], device=acc.device,
                            dtype=torch.float64 if acc.device.type == 'cpu' else torch.float32)
        if run.world > 1:
            vals = acc.reduce(vals, reduction='mean')
        means = dict(zip(keys, vals.tolist()))
        dt = (time.time() - self.t_start) / self.n
        lr = ts.scheduler.get_last_lr()[0]
        samples = ts.batch_size * run.world * run.t['grad_accum']
        run.log.info('[step %d/%d] lr %.3e %s | %.3f s/step (data %.3f), %.1f samples/s, eta %s', step,
                     run.t['total_iter'], lr, ' '.join(f'{k} {means[k]:.4g}' for k in keys), dt, self.t_data / self.n,
                     samples / max(dt, 1e-9), timedelta(seconds=int(dt * (stop_at - step))))
        if bar is not None:
            bar.set_postfix(loss=f"{means['loss']:.4g}", lr=f'{lr:.2e}')
        if writer is not None:
            for k, v in means.items():
                writer.add_scalar(f'train/{k}', v, step)
            writer.add_scalar('train/lr', lr, step)
            writer.add_scalar('train/sec_per_step', dt, step)
        self.reset()
        return means
