#!/usr/bin/env python
"""The one training loop of dalpsr (every model trains through it).

Run::

    python dalpsr/train.py -opt options/train/train_irpad_cpu.yml [--set train.total_iter=200]
        [--resume auto|no|PATH/checkpoint-N] [--force]
    accelerate launch --multi_gpu --num_processes 2 dalpsr/train.py -opt ...   # several processes

In Python (tests): ``from dalpsr.train import train; train(opt)`` with ``opt`` from
``dalpsr.utils.options.load_options`` (or a dict with ``name``, ``model``, ``datasets``, ``train``).

What it does (options schema: options/reference/train.yml, guide: docs/training.md):

* experiments/<name>/ holds ``options.yml``, ``train.log``, ``tb/`` (tensorboard),
  ``checkpoints/checkpoint-<step>/`` (``accelerator.save_state``: trainable modules, optimizer,
  LR scheduler, grad scaler, RNG states of every process, EMA, loop state) and ``export/``
  (``model.export`` at the end). An existing folder is resumed from its latest checkpoint
  (``--resume auto``, default), refused (``--resume no``), or archived with a timestamp
  (``--force``); never overwritten silently.
* Accelerate: mixed precision (``fp16``/``bf16`` autocast; trainable weights stay fp32),
  gradient accumulation (``grad_accum`` micro-batches per optimizer step), gradient clipping,
  DDP over processes. One "iteration"/step is one optimizer step.
* Data: an endless deterministic sampler (dalpsr/data/loader.py): the samples a run sees do
  not depend on workers, processes or resume point, so an interrupted and resumed run ends
  with the same weights as an uninterrupted one.
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
import copy  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import inspect  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
from contextlib import ExitStack, contextmanager, nullcontext  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Dict, List, Optional, Tuple  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from dalpsr.utils.experiment import act_on_folder, changed_keys, describe_keys, folder_in_use, plan_folder  # noqa: E402,E501
from dalpsr.utils.misc import atomic_write_json, atomic_write_text, get_time_str, set_random_seed  # noqa: E402
from dalpsr.utils.options import OptionError, check_keys, dump_options, load_options  # noqa: E402

#: Defaults of the ``train:`` block (each key is documented in options/reference/train.yml).
TRAIN_DEFAULTS: Dict[str, Any] = {
    'total_iter': 1000,
    'batch_size': 4,
    'num_workers': 2,
    'grad_accum': 1,
    'mixed_precision': 'no',
    'optimizer': {'type': 'AdamW', 'lr': 2.0e-5, 'weight_decay': 0.0, 'betas': [0.9, 0.999]},
    'scheduler': {'type': 'constant', 'warmup_iter': 0},
    'max_grad_norm': 1.0,
    'ema': None,
    'checkpoint_freq': 500,
    'keep_checkpoints': 3,
    'val_freq': 500,
    'val_at_start': False,
    'val_batch_size': 1,
    'val_num_workers': 0,
    'print_freq': 10,
    'tensorboard': True,
    'progress_bar': True,
    'stop_after_iter': None,
    'pin_memory': None,
    'prefetch_factor': None,
    'persistent_workers': True,
    'ddp_find_unused_parameters': False,
    'allow_tf32': True,
    'cpu': False,
    'handle_signals': True,
    'export': True,
}
#: Keys of a ``datasets.<phase>`` block read by the loop (not passed to the dataset).
LOADER_KEYS = ('batch_size', 'num_workers')
MIXED_PRECISION = ('no', 'fp16', 'bf16')
CKPT_RE = re.compile(r'^checkpoint-(\d+)$')

logger = logging.getLogger('dalpsr')


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------
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
    args = build_arg_parser().parse_args(argv)
    opt = load_options(args.opt, args.set, is_train=True)
    opt['_args'] = {'resume': args.resume, 'force': args.force, 'overrides': list(args.set)}
    return opt


def resolve_train_opt(opt: Dict[str, Any]) -> Dict[str, Any]:
    """The ``train:`` block with defaults filled in and every key/value checked."""
    src = opt.get('_source', 'the options')
    block = opt.get('train') or {}
    if not isinstance(block, dict):
        raise OptionError(f"'train' must be a mapping in {src}")
    check_keys(block, TRAIN_DEFAULTS, f'train block of {src}')
    t = copy.deepcopy(TRAIN_DEFAULTS)
    t.update(copy.deepcopy(block))
    for key in ('total_iter', 'batch_size', 'grad_accum', 'print_freq', 'keep_checkpoints'):
        if not isinstance(t[key], int) or t[key] < 1:
            raise OptionError(f"train.{key} must be an integer >= 1 in {src}, got {t[key]!r}")
    for key in ('num_workers', 'val_num_workers', 'checkpoint_freq', 'val_freq'):
        if t[key] is None:
            t[key] = 0
        if not isinstance(t[key], int) or t[key] < 0:
            raise OptionError(f"train.{key} must be an integer >= 0 in {src} (0 = off), got {t[key]!r}")
    if t['mixed_precision'] in (None, False):
        t['mixed_precision'] = 'no'
    if t['mixed_precision'] not in MIXED_PRECISION:
        raise OptionError(f"train.mixed_precision must be one of {MIXED_PRECISION} in {src}, "
                          f"got {t['mixed_precision']!r}")
    if t['max_grad_norm'] is not None and float(t['max_grad_norm']) <= 0:
        t['max_grad_norm'] = None
    if t['stop_after_iter'] is not None and (not isinstance(t['stop_after_iter'], int) or t['stop_after_iter'] < 1):
        raise OptionError(f"train.stop_after_iter must be null or an integer >= 1 in {src}")
    for key in ('optimizer', 'scheduler'):
        if not isinstance(t[key], dict):
            raise OptionError(f"train.{key} must be a mapping with a 'type' key in {src}")
        merged = dict(TRAIN_DEFAULTS[key]) if t[key].get('type', TRAIN_DEFAULTS[key]['type']) == \
            TRAIN_DEFAULTS[key]['type'] else {}
        merged.update(t[key])
        t[key] = merged
    return t


def get_seed(opt: Dict[str, Any]) -> int:
    seed = opt.get('seed', opt.get('manual_seed', 0))
    if not isinstance(seed, int):
        raise OptionError(f"'seed' must be an integer in {opt.get('_source', 'the options')}, got {seed!r}")
    return seed


def import_plugins(opt: Dict[str, Any]) -> None:
    """Import ``imports:`` entries (module names or ``.py`` paths) so they can register things."""
    mods = opt.get('imports') or []
    if isinstance(mods, str):
        mods = [mods]
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    for m in mods:
        try:
            if str(m).endswith('.py'):
                path = os.path.abspath(m)
                name = 'dalpsr_plugin_' + re.sub(r'\W', '_', Path(path).stem)
                if name in sys.modules:
                    continue
                spec = importlib.util.spec_from_file_location(name, path)
                if spec is None or not os.path.isfile(path):
                    raise ImportError(f'no file {path}')
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(m)
        except ImportError as err:
            raise OptionError(f"imports in {opt.get('_source', 'the options')}: cannot import '{m}': {err}") from None


def experiments_root(opt: Dict[str, Any]) -> Path:
    root = (opt.get('path') or {}).get('experiments_root') or 'experiments'
    return Path(os.path.expanduser(str(root)))


# ---------------------------------------------------------------------------------------------
# experiment folder and checkpoints
# ---------------------------------------------------------------------------------------------
def list_checkpoints(ckpt_root: Path) -> List[Tuple[int, Path]]:
    """Complete checkpoints under ``ckpt_root`` as sorted ``[(step, path)]`` (temporary
    folders of an interrupted save are not listed)."""
    out = []
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            m = CKPT_RE.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return sorted(out)


def plan_experiment(exp_dir: Path, resume: str = 'auto', force: bool = False,
                    opt: Optional[Dict[str, Any]] = None) -> Tuple[str, Optional[Path]]:
    """Decide what to do with ``exp_dir`` without touching it (same answer on every process).

    Returns ``('fresh', None)``, ``('archive', None)`` (rename the old folder, then fresh),
    ``('resume', checkpoint_dir)`` or ``('archive_then_resume', checkpoint_dir)``. The rule
    (dalpsr/utils/experiment.py, shared with test.py): ``--resume auto`` continues the latest
    checkpoint when the ``model`` / ``datasets`` / ``seed`` options of ``opt`` match the
    folder's ``options.yml`` and refuses otherwise, naming the changed keys
    (:class:`~dalpsr.utils.experiment.FolderConflict`); ``--force`` archives;
    ``--resume no`` refuses any existing folder (:class:`FileExistsError`).
    """
    exists = folder_in_use(exp_dir)
    if resume not in ('auto', 'no'):
        ckpt = Path(resume)
        if not (ckpt.is_dir() and CKPT_RE.match(ckpt.name)):
            raise FileNotFoundError(f'--resume {resume}: not a checkpoint-<step> folder')
        if exists and not force and ckpt.resolve().parent.parent != exp_dir.resolve():
            raise FileExistsError(f'{exp_dir} exists; --resume from another experiment needs a new name '
                                  'or --force (archives the existing folder)')
        if force and exists and ckpt.resolve().parent.parent == exp_dir.resolve():
            raise OptionError('--force would archive the folder that holds the checkpoint to resume from')
        return ('archive_then_resume' if (force and exists) else 'resume'), ckpt
    if exists and resume == 'no' and not force:
        raise FileExistsError(f'{exp_dir} exists and --resume no was given; refusing to overwrite it '
                              '(use --force to archive it with a timestamp, or pick another name)')
    ckpts = list_checkpoints(exp_dir / 'checkpoints') if exists else []
    if exists and not force and not ckpts:  # an earlier run that stopped before its first checkpoint
        return 'archive', None
    fingerprint: Dict[str, Any] = {}
    stored: Optional[Dict[str, Any]] = {}
    if opt is not None and exists and not force:
        fingerprint = experiment_fingerprint(yaml.safe_load(dump_options(opt)) or {})
        f = exp_dir / 'options.yml'
        stored = experiment_fingerprint(yaml.safe_load(f.read_text(encoding='utf-8')) or {}) if f.is_file() \
            else fingerprint  # a folder from before options.yml was written: nothing to compare
    action = plan_folder(exp_dir, fingerprint, stored, force, verb='trained', content='experiments',
                         record='options.yml', ignore_leaves=RESUME_FREE_KEYS,
                         advice=f'or --resume {ckpts[-1][1]} to continue it anyway' if ckpts else '')
    return action, (ckpts[-1][1] if action == 'resume' else None)


#: option keys that may change between a run and its automatic resume (loader plumbing only)
RESUME_FREE_KEYS = ('num_workers', 'workers', 'progress', 'progress_bar', 'print_freq', 'tensorboard')


def experiment_fingerprint(opt: Dict[str, Any]) -> Dict[str, Any]:
    """The options that decide what an experiment folder holds: ``model``, ``datasets``, ``seed``."""
    return {k: opt.get(k) for k in ('model', 'datasets', 'seed')}


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


def _to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and torch.is_tensor(batch[0]):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


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


class _StopFlag:
    """Set by SIGTERM/SIGINT/SIGUSR1: the loop checkpoints at the next step and exits."""

    def __init__(self, enabled: bool):
        self.requested = False
        self._old = {}
        if enabled and hasattr(signal, 'SIGTERM'):
            try:
                for sig in (signal.SIGTERM, getattr(signal, 'SIGUSR1', None)):
                    if sig is not None:
                        self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not in the main thread
                self._old = {}

    def _handler(self, signum, frame):  # noqa: ARG002
        self.requested = True

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _reset_accelerate_state() -> None:
    """Allow several in-process runs (tests) with different settings; keeps a launched
    distributed environment untouched."""
    try:
        from accelerate.state import AcceleratorState, GradientState
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    except Exception:  # noqa: BLE001 - older/newer accelerate without these helpers
        pass


def _build_dataset(opt: Dict[str, Any], phase: str, seed: int):
    from dalpsr.data import build_dataset
    src = opt.get('_source', 'the options')
    cfg = dict(opt['datasets'][phase])
    loader_cfg = {k: cfg.pop(k) for k in LOADER_KEYS if k in cfg}
    if 'seed' not in cfg:
        from dalpsr.utils.registry import DATASET_REGISTRY
        try:
            cls = DATASET_REGISTRY.get(cfg.get('type', ''))
            if 'seed' in inspect.signature(cls.__init__).parameters:
                cfg['seed'] = seed
        except (KeyError, TypeError, ValueError):
            pass
    ds = build_dataset(cfg, where=f'datasets.{phase} in {src}')
    return ds, loader_cfg


def _checkpoint(accelerator, ckpt_root: Path, step: int, keep: int, extra: Dict[str, Any]) -> Path:
    """Atomic checkpoint: save_state into ``.tmp-checkpoint-<step>``, then rename."""
    tmp = ckpt_root / f'.tmp-checkpoint-{step}'
    final = ckpt_root / f'checkpoint-{step}'
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / 'trainer_state.json', extra)
        if final.exists():  # e.g. resumed from an earlier checkpoint: replace the stale one
            old = ckpt_root / f'.old-checkpoint-{step}-{get_time_str()}'
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        for _, path in list_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _export(model, exp_dir: Path, ema, accelerator) -> Optional[Path]:
    """``model.export`` into ``export/`` via a temporary folder (EMA weights when enabled)."""
    out = exp_dir / 'export'
    if accelerator.is_main_process:
        tmp = exp_dir / f'.tmp-export-{os.getpid()}'
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        with (ema.swap() if ema is not None else nullcontext()):
            model.export(str(tmp))
        if out.exists():  # an export of an earlier session (fewer steps): keep it, renamed
            old, n = exp_dir / f'export_archived_{get_time_str()}', 1
            while old.exists():
                old, n = exp_dir / f'export_archived_{get_time_str()}_{n}', n + 1
            os.replace(out, old)
        os.replace(tmp, out)
    accelerator.wait_for_everyone()
    return out


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def train(opt: Dict[str, Any]) -> Dict[str, Any]:
    """Train ``opt['model']`` on ``opt['datasets']`` with ``opt['train']`` (see module docstring).

    Returns ``{'exp_dir': Path, 'step': int, 'losses': [mean loss of each step of this
    session], 'val': last validation metrics, 'model': the model, 'checkpoint': last path}``.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    import dalpsr.archs  # noqa: F401  (fill the registries)
    import dalpsr.data  # noqa: F401
    import dalpsr.losses  # noqa: F401
    import dalpsr.models  # noqa: F401
    from dalpsr.data.loader import build_eval_loader, build_train_loader
    from dalpsr.models import build_model
    from dalpsr.utils.ema import ModelEMA
    from dalpsr.utils.logger import get_root_logger
    from dalpsr.utils.optim import build_optimizer, build_scheduler

    src = opt.get('_source', 'the options')
    if 'name' not in opt:
        raise OptionError(f"missing required key 'name' in {src}")
    for key in ('model', 'datasets'):
        if not isinstance(opt.get(key), dict):
            raise OptionError(f"missing required block '{key}' in {src}")
    if 'train' not in opt['datasets']:
        raise OptionError(f"missing required block 'datasets.train' in {src}")
    check_keys(opt['datasets'], {'train', 'val'}, f'datasets block of {src}')
    import_plugins(opt)
    t = resolve_train_opt(opt)
    seed = get_seed(opt)
    args = opt.get('_args') or {}
    exp_dir = experiments_root(opt) / str(opt['name'])
    ckpt_root = exp_dir / 'checkpoints'

    _reset_accelerate_state()
    use_cpu = bool(t['cpu']) or not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=use_cpu, mixed_precision=t['mixed_precision'], gradient_accumulation_steps=t['grad_accum'],
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=bool(t['ddp_find_unused_parameters'])),
                         InitProcessGroupKwargs(timeout=timedelta(minutes=30))])
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    if t['allow_tf32'] and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---- the experiment folder: decided identically on every process before anything is built
    action, resume_from = plan_experiment(exp_dir, args.get('resume', 'auto'), bool(args.get('force', False)), opt)
    log = get_root_logger(main_process=main)

    # ---- data
    train_set, train_loader_cfg = _build_dataset(opt, 'train', seed)
    batch_size = int(train_loader_cfg.get('batch_size', t['batch_size']))
    num_workers = int(train_loader_cfg.get('num_workers', t['num_workers']))
    val_loader = None
    if opt['datasets'].get('val'):
        val_set, val_loader_cfg = _build_dataset(opt, 'val', seed)
        val_loader = build_eval_loader(
            val_set, batch_size=int(val_loader_cfg.get('batch_size', t['val_batch_size'])),
            num_workers=int(val_loader_cfg.get('num_workers', t['val_num_workers'])))

    # ---- model, optimizer, scheduler (weights from the seed; per-process RNG after)
    set_random_seed(seed)
    model = build_model(opt, accelerator)
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
    prepared = accelerator.prepare(*[nets[n] for n in names], optimizer, scheduler)
    prepared_nets, optimizer, scheduler = list(prepared[:-2]), prepared[-2], prepared[-1]
    model.set_prepared(dict(zip(names, prepared_nets)))
    params = [p for g in optimizer.param_groups for p in g['params']]
    state = LoopState()
    accelerator.register_for_checkpointing(state)
    ema = ModelEMA.from_opt(t['ema'], {n: accelerator.unwrap_model(m) for n, m in zip(names, prepared_nets)})
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    set_random_seed(seed + rank)

    # ---- everything built without error: now act on the folder (main process only)
    accelerator.wait_for_everyone()
    if main:
        act_on_folder(exp_dir, 'archive' if action.startswith('archive') else 'fresh')
        ckpt_root.mkdir(exist_ok=True)
        for stale in ckpt_root.glob('.tmp-checkpoint-*'):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    fh = None
    if main:
        fh = logging.FileHandler(exp_dir / 'train.log', mode='a')
        fh.setFormatter(logging.Formatter('%(asctime)s %(levelname)s: %(message)s'))
        log.addHandler(fh)
    writer = None
    stop = _StopFlag(bool(t['handle_signals']))
    cleanup = ExitStack()
    try:
        if main:
            text = dump_options(opt)
            opt_file = exp_dir / 'options.yml'
            if opt_file.exists() and opt_file.read_text(encoding='utf-8') != text:
                changed = changed_keys(yaml.safe_load(opt_file.read_text(encoding='utf-8')) or {},
                                       yaml.safe_load(text) or {})
                opt_file = exp_dir / f'options_{get_time_str()}.yml'
                log.warning('options differ from the first run of this experiment (%s); saved as %s',
                            describe_keys(changed, 8), opt_file.name)
            atomic_write_text(opt_file, text)
        log.info('experiment %s (%s), %s process(es), device %s, mixed precision %s',
                 exp_dir, {'fresh': 'new', 'archive': 'new; the old folder was archived'}.get(action, 'resuming'),
                 world, accelerator.device, t['mixed_precision'])
        log.info('train set: %d items (%s); batch %d x %d process(es) x %d accumulation = %d samples/step',
                 len(train_set), type(train_set).__name__, batch_size, world, t['grad_accum'],
                 batch_size * world * t['grad_accum'])
        if resume_from is not None:
            accelerator.load_state(str(resume_from))
            log.info('resumed from %s at step %d', resume_from, state.step)
            if accelerator.step % t['grad_accum']:
                accelerator.step = 0

        if main and t['tensorboard']:
            try:
                from torch.utils.tensorboard import SummaryWriter
                writer = SummaryWriter(log_dir=str(exp_dir / 'tb'), purge_step=state.step + 1 if state.step else None)
            except ImportError as err:
                log.warning('tensorboard disabled: %s', err)

        def run_validation(step: int) -> Dict[str, float]:
            if val_loader is None:
                return {}
            for m in prepared_nets:
                m.eval()
            t0 = time.time()
            with isolated_rng(accelerator.device), (ema.swap() if ema is not None else nullcontext()), \
                    accelerator.autocast():
                metrics = model.validate(val_loader, step, writer) or {}
            for m in prepared_nets:
                m.train()
            metrics = {k: float(v) for k, v in metrics.items()}
            if metrics:
                log.info('[val step %d] %s (%.1f s)', step,
                         ', '.join(f'{k} {v:.4g}' for k, v in metrics.items()), time.time() - t0)
            if writer is not None:
                for k, v in metrics.items():
                    writer.add_scalar(f'val/{k}', v, step)
            return metrics

        total = t['total_iter']
        ga = t['grad_accum']
        stop_at = total if t['stop_after_iter'] is None else min(total, t['stop_after_iter'])
        losses: List[float] = []
        last_val: Dict[str, float] = {}
        last_ckpt: Optional[Path] = resume_from

        if state.step >= total:
            log.info('experiment already trained to step %d (total_iter %d)', state.step, total)
        else:
            if t['val_at_start'] and state.step == 0:
                last_val = run_validation(0)
            if state.samples_seen % (batch_size * world):
                raise RuntimeError(f'cannot resume: {state.samples_seen} samples seen is not a multiple of '
                                   f'batch_size x processes = {batch_size * world}')
            pin = t['pin_memory'] if t['pin_memory'] is not None else accelerator.device.type == 'cuda'
            loader = build_train_loader(
                train_set, batch_size, seed=seed, num_workers=num_workers, num_replicas=world, rank=rank,
                start_micro_step=state.samples_seen // (batch_size * world), pin_memory=pin,
                prefetch_factor=t['prefetch_factor'], persistent_workers=bool(t['persistent_workers']))
            data_iter = iter(loader)
            for m in prepared_nets:
                m.train()

            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm
            show_bar = bool(main and t['progress_bar'])
            bar = tqdm(total=total, initial=state.step, disable=not show_bar, dynamic_ncols=True,
                       desc=str(opt['name']))
            cleanup.callback(bar.close)
            if show_bar:
                cleanup.enter_context(logging_redirect_tqdm(loggers=[log]))
            window: Dict[str, float] = {}
            window_n = 0
            t_window = time.time()
            t_data = 0.0
            while state.step < stop_at:
                step_loss = 0.0
                grad_norm = None
                for micro in range(ga):
                    t1 = time.time()
                    batch = _to_device(next(data_iter), accelerator.device)
                    t_data += time.time() - t1
                    with accelerator.accumulate(*prepared_nets):
                        with accelerator.autocast():
                            out = model.training_step(batch, state.step)
                        loss = out['loss']
                        if not torch.isfinite(loss.detach()).all():
                            raise FloatingPointError(f'non-finite loss {loss.item()} at step {state.step + 1} '
                                                     f'(micro-batch {micro}); lower the LR or use bf16/fp32')
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            if t['max_grad_norm']:
                                grad_norm = accelerator.clip_grad_norm_(params, float(t['max_grad_norm']))
                            optimizer.step()
                            optimizer.zero_grad(set_to_none=True)
                    step_loss += float(loss.detach()) / ga
                    for k, v in out.items():
                        if k != 'loss':
                            window[k] = window.get(k, 0.0) + float(v) / ga
                    state.samples_seen += batch_size * world
                if not accelerator.sync_gradients:
                    raise RuntimeError('internal: gradient accumulation out of step with the loop')
                scheduler.step()
                state.step += 1
                if ema is not None:
                    ema.update(state.step)
                losses.append(step_loss)
                window['loss'] = window.get('loss', 0.0) + step_loss
                if grad_norm is not None:
                    window['grad_norm'] = window.get('grad_norm', 0.0) + float(grad_norm)
                window_n += 1
                bar.update(1)
                step = state.step

                if step % t['print_freq'] == 0 or step == stop_at:
                    keys = sorted(window)
                    vals = torch.tensor([window[k] / window_n for k in keys], device=accelerator.device,
                                        dtype=torch.float64 if accelerator.device.type == 'cpu' else torch.float32)
                    if world > 1:
                        vals = accelerator.reduce(vals, reduction='mean')
                    means = dict(zip(keys, vals.tolist()))
                    dt = (time.time() - t_window) / window_n
                    lr = scheduler.get_last_lr()[0]
                    eta = timedelta(seconds=int(dt * (stop_at - step)))
                    log.info('[step %d/%d] lr %.3e %s | %.3f s/step (data %.3f), %.1f samples/s, eta %s', step, total,
                             lr, ' '.join(f'{k} {means[k]:.4g}' for k in keys), dt, t_data / window_n,
                             batch_size * world * ga / max(dt, 1e-9), eta)
                    bar.set_postfix(loss=f"{means['loss']:.4g}", lr=f'{lr:.2e}')
                    if writer is not None:
                        for k, v in means.items():
                            writer.add_scalar(f'train/{k}', v, step)
                        writer.add_scalar('train/lr', lr, step)
                        writer.add_scalar('train/sec_per_step', dt, step)
                    window, window_n, t_window, t_data = {}, 0, time.time(), 0.0

                if (t['val_freq'] and step % t['val_freq'] == 0) or step == total:
                    last_val = run_validation(step)

                stop_now = stop.requested
                if world > 1 and t['handle_signals']:
                    flag = torch.tensor([1.0 if stop_now else 0.0], device=accelerator.device)
                    stop_now = bool(accelerator.reduce(flag, reduction='sum').item() > 0)
                if (t['checkpoint_freq'] and step % t['checkpoint_freq'] == 0) or step == stop_at or stop_now:
                    last_ckpt = _checkpoint(accelerator, ckpt_root, step, t['keep_checkpoints'], {
                        'step': step, 'samples_seen': state.samples_seen, 'total_iter': total,
                        'world_size': world, 'batch_size': batch_size, 'grad_accum': ga, 'seed': seed,
                        'time': get_time_str(), 'val': last_val})
                    log.info('checkpoint saved: %s', last_ckpt)
                if stop_now:
                    log.warning('stop requested by a signal: checkpoint written at step %d; '
                                'run the same command again to resume', step)
                    break
            cleanup.close()
            del data_iter, loader

        finished = state.step >= total
        export_dir = None
        if finished and t['export'] and (losses or not (exp_dir / 'export').is_dir()):
            export_dir = _export(model, exp_dir, ema, accelerator)
            log.info('exported to %s', export_dir)
        elif not finished:
            log.info('stopped at step %d of %d; resume with --resume auto', state.step, total)
        return {'exp_dir': exp_dir, 'step': state.step, 'losses': losses, 'val': last_val, 'model': model,
                'checkpoint': last_ckpt, 'export': export_dir, 'accelerator': accelerator, 'ema': ema}
    finally:
        cleanup.close()
        stop.restore()
        if writer is not None:
            writer.close()
        if fh is not None:
            log.removeHandler(fh)
            fh.close()


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry: parse, train, print one-line errors for bad options or folders."""
    try:
        opt = parse_args(argv)
        train(opt)
    except (OptionError, FileExistsError, FileNotFoundError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
