"""A tiny registered model + dataset, imported through the ``imports:`` option, to test the
training loop (dalpsr/train.py) without the real models.

ToyRegression: ``y = x @ A + b + noise`` with ``x ~ N(0, 1)``, all drawn from
``sample_rng(seed, index)`` (deterministic per index). ToyModel: a 2-layer MLP with dropout and
an optional input-noise term drawn from the global torch RNG, so exact resume needs the RNG
states of the checkpoint. ``record_dir``: each process appends the dataset indices it trained
on to ``<record_dir>/rank<r>.txt`` (used by the multi-process test).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch import nn

from dalpsr.models.base_model import BaseModel
from dalpsr.utils.misc import sample_rng
from dalpsr.utils.options import check_keys
from dalpsr.utils.registry import DATASET_REGISTRY, MODEL_REGISTRY

_A = np.random.default_rng(1234).standard_normal((8, 2)).astype(np.float32)


@DATASET_REGISTRY.register()
class ToyRegression(torch.utils.data.Dataset):
    """Items ``{'x': float32 [8], 'y': float32 [2], 'index': int, 'key': str}``."""

    def __init__(self, length: int = 64, seed: int = 0, noise: float = 0.05):
        self.length = int(length)
        self.seed = int(seed)
        self.noise = float(noise)

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        item = int(i) % self.length
        rng = sample_rng(self.seed, item)          # content depends on the item only
        x = rng.standard_normal(8).astype(np.float32)
        y = x @ _A + 0.5
        aug = sample_rng(self.seed, int(i), 1)     # per-epoch "augmentation" depends on i
        y = y + self.noise * aug.standard_normal(2).astype(np.float32)
        return {'x': torch.from_numpy(x), 'y': torch.from_numpy(y.astype(np.float32)), 'index': int(i),
                'key': f'toy{item:04d}'}


class _MLP(nn.Module):
    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 2))
        self.frozen = nn.Linear(2, 2)   # a frozen part: must never change
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.net(x) + 0.0 * self.frozen(torch.zeros_like(x[:, :2]))


@MODEL_REGISTRY.register()
class ToyModel(BaseModel):
    """``opt['model']``: ``{type: ToyModel, hidden: 16, dropout: 0.1, input_noise: 0.01,
    record_dir: null, signal_at_step: null, step_sleep: 0}``."""

    KEYS = {'type', 'hidden', 'dropout', 'input_noise', 'record_dir', 'signal_at_step', 'step_sleep'}

    def __init__(self, opt, accelerator=None):
        super().__init__(opt, accelerator)
        mopt = opt['model']
        check_keys(mopt, self.KEYS, f"model block of {opt.get('_source', 'the options')}")
        self.net = _MLP(int(mopt.get('hidden', 16)), float(mopt.get('dropout', 0.1))).to(self.device)
        self.input_noise = float(mopt.get('input_noise', 0.01))
        self.record_dir = mopt.get('record_dir')
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.signal_at_step = mopt.get('signal_at_step')  # test hook: send SIGTERM to itself at this step
        self.step_sleep = float(mopt.get('step_sleep', 0.0))  # test hook: slow steps (to kill a run mid-way)

    def trainable_modules(self):
        return {'net': self.net}

    def training_step(self, batch, step):
        if self.signal_at_step is not None and step == int(self.signal_at_step):
            import signal
            os.kill(os.getpid(), signal.SIGTERM)
        if self.step_sleep:
            import time
            time.sleep(self.step_sleep)
        x = batch['x'] + self.input_noise * torch.randn_like(batch['x'])
        pred = self.net(x)
        loss = torch.mean((pred.float() - batch['y']) ** 2)
        if self.record_dir:
            os.makedirs(self.record_dir, exist_ok=True)
            with open(os.path.join(self.record_dir, f'rank{self.rank}.txt'), 'a') as f:
                f.write(' '.join(str(int(i)) for i in batch['index']) + '\n')
        return {'loss': loss, 'pred_mean': float(pred.detach().float().mean())}

    @torch.no_grad()
    def validate(self, loader, step, writer=None):
        tot, n = 0.0, 0
        for batch in loader:
            pred = self.net(batch['x'].to(self.device)).float()
            tot += float(((pred - batch['y'].to(self.device)) ** 2).sum())
            n += pred.numel()
        if self.record_dir:  # every process saves its replica (multi-process test)
            os.makedirs(self.record_dir, exist_ok=True)
            torch.save(self.unwrap(self.net).state_dict(),
                       os.path.join(self.record_dir, f'params_rank{self.rank}_step{step}.pth'))
        return {'mse': tot / max(n, 1)}

    def export(self, out_dir):
        net = self.unwrap(self.net)
        torch.save(net.state_dict(), os.path.join(out_dir, 'toy.pth'))
        with open(os.path.join(out_dir, 'toy.json'), 'w') as f:
            json.dump({'type': 'ToyModel', 'params': sum(p.numel() for p in net.parameters())}, f)


def toy_options(root, name='toy', **train):
    """Options dict for a short ToyModel run under ``root`` (tests); ``train`` overrides keys."""
    t = {'total_iter': 12, 'batch_size': 4, 'num_workers': 0, 'grad_accum': 1,
         'optimizer': {'type': 'AdamW', 'lr': 1.0e-2, 'weight_decay': 0.01},
         'scheduler': {'type': 'cosine', 'warmup_iter': 3}, 'max_grad_norm': 1.0,
         'checkpoint_freq': 100, 'val_freq': 0, 'print_freq': 5, 'tensorboard': False,
         'progress_bar': False}
    t.update(train)
    return {'name': name, 'seed': 7, 'imports': ['tests.toy_plugin'],
            'path': {'experiments_root': str(root)},
            'model': {'type': 'ToyModel', 'hidden': 16, 'dropout': 0.2, 'input_noise': 0.05},
            'datasets': {'train': {'type': 'ToyRegression', 'length': 20},
                         'val': {'type': 'ToyRegression', 'length': 8, 'seed': 99}},
            'train': t, '_source': '<toy options>'}
