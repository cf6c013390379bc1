"""The contract between a model and the training loop (``dalpsr/training/loop.py``).

Models are thin: they own their networks and compute losses. Everything else (Accelerate,
mixed precision, gradient accumulation, optimizer and LR scheduler, EMA, checkpoints with
exact resume, logging, validation scheduling) lives in the one visible loop of
``dalpsr/training/`` (command line: ``dalpsr/train.py``), which every model shares.

The loop calls, in order::

    model = MODEL_REGISTRY.get(opt['model']['type'])(opt, accelerator)
    groups = model.param_groups()                # trainable parameters -> optimizer
    nets = model.trainable_modules()             # {name: nn.Module} passed to accelerator.prepare
    ... prepared = accelerator.prepare(*nets.values(), optimizer, scheduler)
    model.set_prepared(dict(zip(nets, prepared)))  # the model keeps using the wrapped modules
    model.before_training(train_set, log)        # only at step 0 (new run), e.g. a pre-fit of one part
    for batch in loader:                         # batch: dict of tensors / lists (dataset output)
        with accelerator.accumulate(*prepared):
            out = model.training_step(batch, step)   # {'loss': scalar tensor, other floats to log}
            accelerator.backward(out['loss']); clip; optimizer.step(); scheduler.step(); zero_grad
        every val_freq: metrics = model.validate(val_loader, step, writer)  # on all ranks
    model.export(out_dir)                        # final weights in their own format

Checkpoints use ``accelerator.save_state`` (models, optimizer, scheduler, RNG states); a
model with extra state registers it with ``accelerator.register_for_checkpointing``.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import torch
from torch import nn

from dalpsr.utils.experiment import merge_defaults
from dalpsr.utils.options import check_keys


def resolve_model_block(opt: Dict[str, Any], defaults: Dict[str, Any],
                        nested: Sequence[str] = ()) -> Tuple[Dict[str, Any], str]:
    """The ``model:`` block of ``opt`` (without ``type``) checked against ``defaults`` and filled
    with them: a top-level key replaces its default, each key of ``nested`` is a sub-block merged
    key by key. Returns ``(cfg, src)`` (``src``: the options file, for messages). An unknown key,
    at the top or in a nested block, raises ``OptionError`` naming it and the file."""
    src = opt.get('_source', 'the options')
    mopt = {k: v for k, v in opt['model'].items() if k != 'type'}
    check_keys(mopt, defaults, f'model block of {src}')
    cfg = copy.deepcopy(defaults)
    cfg.update({k: copy.deepcopy(v) for k, v in mopt.items() if k not in nested})
    for key in nested:
        cfg[key] = merge_defaults(defaults[key], mopt.get(key), f'model.{key} in {src}')
    return cfg, src


class BaseModel:
    """Subclass, register with ``@MODEL_REGISTRY.register()`` and implement the hooks."""

    def __init__(self, opt: Dict[str, Any], accelerator=None):
        self.opt = opt
        self.accelerator = accelerator
        self.device = accelerator.device if accelerator is not None else torch.device('cpu')

    # ---- what is trained -------------------------------------------------------------
    def trainable_modules(self) -> Dict[str, nn.Module]:
        """Modules with trainable parameters, to be wrapped by ``accelerator.prepare``."""
        raise NotImplementedError

    def param_groups(self) -> List[Dict[str, Any]] | Iterable[torch.nn.Parameter]:
        """Parameters for the optimizer (default: every ``requires_grad`` parameter)."""
        params = []
        for module in self.trainable_modules().values():
            params += [p for p in module.parameters() if p.requires_grad]
        return params

    def set_prepared(self, modules: Dict[str, nn.Module]) -> None:
        """Receive the Accelerate-wrapped modules (same keys as ``trainable_modules``)."""
        for name, module in modules.items():
            setattr(self, name, module)

    # ---- steps ---------------------------------------------------------------------
    def before_training(self, train_set, log=None) -> Any:
        """Called once before the first step of a new run (never on resume: the checkpoint holds
        its effect), after the optimizer exists; e.g. IRPAD's ``stats_pretrain``. Default: nothing."""
        return None

    def training_step(self, batch: Dict[str, Any], step: int) -> Dict[str, Any]:
        """Return ``{'loss': tensor, ...floats to log}``. No backward, no optimizer step."""
        raise NotImplementedError

    @torch.no_grad()
    def validate(self, loader, step: int, writer=None) -> Dict[str, float]:
        """Evaluate on ``loader``; return scalar metrics (logged and written to tensorboard)."""
        return {}

    # ---- export --------------------------------------------------------------------
    def export(self, out_dir: str) -> None:
        """Write the trained weights in their final, loadable format (e.g. save_pretrained)."""

    def unwrap(self, module: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(module) if self.accelerator is not None else module
