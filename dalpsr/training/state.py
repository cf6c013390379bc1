"""Step 2 of a training run: build the training state (data, model, optimizer, LR schedule,
EMA), everything registered with Accelerate for checkpoints. Nothing is written yet."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from dalpsr.training.options import LOADER_KEYS
from dalpsr.training.setup import LoopState, Run
from dalpsr.utils.misc import set_random_seed
from dalpsr.utils.options import OptionError


@dataclass
class TrainingState:
    """The objects the loop steps (see :func:`build_training_state`)."""
    model: Any                        # a BaseModel; holds the prepared (wrapped) modules
    nets: List[torch.nn.Module]       # the prepared trainable modules
    optimizer: Any
    scheduler: Any
    params: List[torch.nn.Parameter]  # every parameter the optimizer updates (clipping)
    counters: LoopState               # step, samples_seen
    ema: Any                          # ModelEMA or None
    train_set: Any
    batch_size: int                   # per process per micro-batch
    num_workers: int
    val_loader: Optional[Any]

    def train_mode(self, on: bool = True) -> None:
        for m in self.nets:
            m.train(on)


def build_dataset_for(opt: Dict[str, Any], phase: str, seed: int) -> Tuple[Any, Dict[str, Any]]:
    """``datasets.<phase>`` built from its registry entry; returns the dataset and the loop's
    loader keys of that block (``batch_size`` / ``num_workers``). A dataset whose constructor
    takes ``seed`` gets the run's seed unless the block sets its own. A bad key or value inside
    the block (also in its sub-blocks) raises :class:`OptionError` naming the block."""
    from dalpsr.data import build_dataset
    from dalpsr.utils.registry import DATASET_REGISTRY
    src = opt.get('_source', 'the options')
    cfg = dict(opt['datasets'][phase])
    loader_cfg = {k: cfg.pop(k) for k in LOADER_KEYS if k in cfg}
    if 'seed' not in cfg:
        try:
            cls = DATASET_REGISTRY.get(cfg.get('type', ''))
            if 'seed' in inspect.signature(cls.__init__).parameters:
                cfg['seed'] = seed
        except (KeyError, TypeError, ValueError):
            pass
    try:
        ds = build_dataset(cfg, where=f'datasets.{phase} in {src}')
    except OptionError:
        raise
    except (ValueError, TypeError) as err:  # a bad key or value inside a sub-block (prompt:, degradation:)
        if isinstance(err, TypeError) and 'unexpected keyword argument' not in str(err):
            raise
        raise OptionError(f'datasets.{phase} in {src}: {err}') from err
    return ds, loader_cfg


def build_training_state(run: Run) -> TrainingState:
    """Datasets, then (from the seed) the model, optimizer, LR scheduler, prepared by Accelerate;
    the loop counters and the EMA registered for checkpointing; per-process RNG ``seed + rank``."""
    from dalpsr.data.loader import build_eval_loader
    from dalpsr.models import build_model
    from dalpsr.utils.ema import ModelEMA
    from dalpsr.utils.optim import build_optimizer, build_scheduler

    opt, t, acc = run.opt, run.t, run.accelerator
    train_set, loader_cfg = build_dataset_for(opt, 'train', run.seed)
    val_loader = None
    if opt['datasets'].get('val'):
        val_set, val_cfg = build_dataset_for(opt, 'val', run.seed)
        val_loader = build_eval_loader(val_set, batch_size=int(val_cfg.get('batch_size', t['val_batch_size'])),
                                       num_workers=int(val_cfg.get('num_workers', t['val_num_workers'])))

    set_random_seed(run.seed)  # the weights depend on the seed only
    model = build_model(opt, acc)
    nets = model.trainable_modules()
    if not nets:
        raise OptionError(f"model {opt['model'].get('type')} has no trainable modules")
    for name, net in nets.items():
        bad = [n for n, p in net.named_parameters() if p.requires_grad and p.dtype != torch.float32]
        if bad:
            raise RuntimeError(f'trainable parameters must be fp32 (mixed precision autocasts); '
                               f'{name}.{bad[0]} is {dict(net.named_parameters())[bad[0]].dtype}')
    optimizer = build_optimizer(model.param_groups(), t['optimizer'])
    scheduler = build_scheduler(optimizer, t['scheduler'], t['total_iter'])
    names = list(nets)
    prepared = acc.prepare(*[nets[n] for n in names], optimizer, scheduler)
    prepared_nets, optimizer, scheduler = list(prepared[:-2]), prepared[-2], prepared[-1]
    model.set_prepared(dict(zip(names, prepared_nets)))
    counters = LoopState()
    acc.register_for_checkpointing(counters)
    ema = ModelEMA.from_opt(t['ema'], {n: acc.unwrap_model(m) for n, m in zip(names, prepared_nets)})
    if ema is not None:
        acc.register_for_checkpointing(ema)
    set_random_seed(run.seed + run.rank)
    return TrainingState(
        model=model, nets=prepared_nets, optimizer=optimizer, scheduler=scheduler,
        params=[p for g in optimizer.param_groups for p in g['params']], counters=counters, ema=ema,
        train_set=train_set, batch_size=int(loader_cfg.get('batch_size', t['batch_size'])),
        num_workers=int(loader_cfg.get('num_workers', t['num_workers'])), val_loader=val_loader)
