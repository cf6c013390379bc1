#!/usr/bin/env python
"""Library pieces against the loop's own (issue 12 item 5): prints, in one run, what decides
whether dalpsr/training uses diffusers' ``EMAModel``, ``get_scheduler``, ``compute_snr`` and
Accelerate's checkpoint ``total_limit`` or keeps its own.

    python benchmarks/bench_train_pieces.py [--params 20] [--updates 200]

1. EMA: ``dalpsr.utils.ema.ModelEMA`` against ``diffusers.training_utils.EMAModel`` set up to
   follow the same constant decay (``use_ema_warmup=True, inv_gamma=1e-30``: its decay is then
   ``min(decay, 1 - ~0)``; by default it uses ``min(decay, (1 + s) / (10 + s))`` instead): max
   abs difference of the shadows after N updates, ms per update (CPU, one thread).
2. LR schedules: our factor per step against ``diffusers.optimization.get_scheduler`` for each
   of our schedule types: the factor at step 0 and the max abs difference over the run.
3. SNR: ``alphas_cumprod / (1 - alphas_cumprod)`` (DaLPSRModel._snr_weights) against
   ``diffusers.training_utils.compute_snr`` on SD's DDPM schedule, every timestep.
4. Checkpoints: a save interrupted after two complete ones, keep/total_limit 2: complete and
   partial checkpoint folders left by Accelerate's ``total_limit`` and by ours.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def bench_ema(n_params_m: float, updates: int) -> None:
    from diffusers.training_utils import EMAModel

    from dalpsr.utils.ema import ModelEMA
    torch.manual_seed(0)
    width = int(math.sqrt(n_params_m * 1e6 / 4))
    net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(4)])
    ours = ModelEMA({'net': net}, decay=0.999)
    theirs = EMAModel(net.parameters(), decay=0.999, use_ema_warmup=True, inv_gamma=1e-30, power=2 / 3,
                      update_after_step=-1, foreach=False)
    theirs_fe = EMAModel(net.parameters(), decay=0.999, use_ema_warmup=True, inv_gamma=1e-30, power=2 / 3,
                         update_after_step=-1, foreach=True)
    t = {'ours': 0.0, 'diffusers': 0.0, 'diffusers foreach': 0.0}
    for step in range(1, updates + 1):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p), alpha=1e-2)
        t0 = time.perf_counter()
        ours.update(step)
        t1 = time.perf_counter()
        theirs.step(net.parameters())
        t2 = time.perf_counter()
        theirs_fe.step(net.parameters())
        t3 = time.perf_counter()
        t['ours'] += t1 - t0
        t['diffusers'] += t2 - t1
        t['diffusers foreach'] += t3 - t2
    assert theirs.cur_decay_value == 0.999
    shadows = [ours.shadow[f'net.{n}'] for n, _ in net.named_parameters()]
    for name, ema in (('diffusers', theirs), ('diffusers foreach', theirs_fe)):
        diff = max(float((a - b).abs().max()) for a, b in zip(shadows, ema.shadow_params))
        ref = max(float(a.abs().max()) for a in shadows)
        print(f'EMA  {name:18s}: max |shadow - ours| {diff:.3e} (shadow max {ref:.3f}) after {updates} updates; '
              f'{1e3 * t[name] / updates:.2f} ms/update vs ours {1e3 * t["ours"] / updates:.2f} ms/update '
              f'({sum(p.numel() for p in net.parameters()) / 1e6:.1f} M params)')
    default = EMAModel(net.parameters(), decay=0.999)
    print('EMA  diffusers default decay at steps 1, 10, 100, 1000: '
          + ', '.join(f'{default.get_decay(s):.4f}' for s in (1, 10, 100, 1000)) + ' (ours: 0.999 from step 1)')


def bench_schedules(total: int = 1000, warm: int = 100) -> None:
    from diffusers.optimization import get_scheduler

    from dalpsr.utils.optim import lr_factor
    cases = [({'type': 'constant', 'warmup_iter': warm}, dict(name='constant_with_warmup')),
             ({'type': 'linear', 'warmup_iter': warm, 'min_lr_ratio': 0.0}, dict(name='linear')),
             ({'type': 'cosine', 'warmup_iter': warm, 'min_lr_ratio': 0.0}, dict(name='cosine', num_cycles=0.5)),
             ({'type': 'cosine', 'warmup_iter': warm, 'min_lr_ratio': 0.02}, dict(name='cosine', num_cycles=0.5)),
             ({'type': 'multistep', 'warmup_iter': 0, 'milestones': [300, 600], 'gamma': 0.5},
              dict(name='piecewise_constant', step_rules='1:300,0.5:600,0.25'))]
    for ours_cfg, kw in cases:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = get_scheduler(optimizer=opt, num_warmup_steps=warm if kw['name'] != 'piecewise_constant' else None,
                              num_training_steps=total, **kw)
        theirs = []
        for _ in range(total):
            theirs.append(opt.param_groups[0]['lr'])
            opt.step()
            sched.step()
        ours = [lr_factor(s, ours_cfg, total) for s in range(total)]
        diff = max(abs(a - b) for a, b in zip(ours, theirs))
        print(f"LR   {str(ours_cfg):78s} vs get_scheduler({kw['name']}): step 0 ours {ours[0]:.4f} "
              f"diffusers {theirs[0]:.4f}; max |diff| {diff:.3e}")


def bench_snr() -> None:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr
    sched = DDPMScheduler(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    t = torch.arange(1000)
    ac = sched.alphas_cumprod[t].float()
    ours = ac / (1 - ac)
    theirs = compute_snr(sched, t)
    rel = ((ours - theirs).abs() / theirs).max()
    w = lambda snr: torch.minimum(snr, torch.full_like(snr, 5.0)) / snr  # noqa: E731  min-SNR-5, epsilon
    print(f'SNR  ours vs compute_snr: max rel diff {float(rel):.3e}; min-SNR-5 weights max abs diff '
          f'{float((w(ours) - w(theirs)).abs().max()):.3e} (1000 timesteps, SD DDPM betas)')


def bench_checkpoints() -> None:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    import dalpsr.training.folder as folder
    from dalpsr.training.setup import reset_accelerate_state

    def interrupted(save, *args):
        try:
            save(*args)
        except RuntimeError:
            pass

    real_save = torch.save

    def killed(*args, **kwargs):  # the process dies after the weights, before the RNG states
        raise RuntimeError('killed')

    with tempfile.TemporaryDirectory() as tmp:
        for who in ('accelerate total_limit', 'ours'):
            reset_accelerate_state()
            root = Path(tmp) / who.replace(' ', '_')
            acc = Accelerator(cpu=True, project_config=ProjectConfiguration(
                project_dir=str(root), automatic_checkpoint_naming=True, total_limit=2))
            net = acc.prepare(torch.nn.Linear(64, 64))
            ckpts = root / 'checkpoints'
            if who == 'ours':
                ckpts.mkdir(parents=True)
                acc.project_configuration.automatic_checkpoint_naming = False
            for step in (1, 2, 3):
                if step == 3:
                    torch.save = killed
                try:
                    if who == 'ours':
                        interrupted(folder.save_checkpoint, acc, ckpts, step, 2, {'step': step})
                    else:
                        interrupted(acc.save_state)
                finally:
                    torch.save = real_save
            names = sorted(p.name for p in ckpts.iterdir())
            complete = [n for n in names if any((ckpts / n).glob('random_states_*'))]
            if who == 'ours':
                nxt = folder.list_checkpoints(ckpts)[-1][1].name
            else:  # load_state() with automatic naming takes the highest checkpoint_<n>
                nxt = max(names, key=lambda n: int(n.rsplit('_', 1)[1]))
            print(f'CKPT {who:22s}: after a save killed mid-way: folders {names}, complete {complete}; '
                  f'the next start resumes from {nxt} ({"complete" if nxt in complete else "PARTIAL"})')
            del net
    reset_accelerate_state()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--params', type=float, default=20.0, help='EMA model size in millions of parameters')
    p.add_argument('--updates', type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    bench_ema(args.params, args.updates)
    bench_schedules()
    bench_snr()
    bench_checkpoints()
    return 0


if __name__ == '__main__':
    sys.exit(main())
