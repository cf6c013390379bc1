"""The experiment folder of a training run: the folder rule, checkpoints and the export.

Layout and rules: docs/training.md. The rule itself (fresh / resume when the options match /
refuse naming the changed keys / archive under ``--force``) is the one of
dalpsr/utils/experiment.py, shared with test.py; this module adds what is particular to
training: checkpoints, ``--resume no|PATH`` and a folder without any checkpoint.

Checkpoints are our own rather than Accelerate's ``ProjectConfiguration(total_limit=...)``:
Accelerate 1.15's ``save_state`` with automatic naming deletes the oldest checkpoints *before*
writing the new one straight into its final folder. Measured with
``python benchmarks/bench_train_pieces.py`` (keep / ``total_limit`` 2, the third save killed
after the weights): Accelerate leaves ``checkpoint_1`` (complete) and ``checkpoint_2``
(partial, no RNG states) and its next ``load_state()`` picks the partial one; ours leaves
``checkpoint-1`` and ``checkpoint-2`` complete plus ``.tmp-checkpoint-3``, which is never
resumed from and removed at the next start. Its folders are also numbered by save count, not
by step.
"""
from __future__ import annotations

import os
import re
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from dalpsr.utils.experiment import act_on_folder, changed_keys, describe_keys, folder_in_use, plan_folder
from dalpsr.utils.misc import atomic_write_json, atomic_write_text, get_time_str
from dalpsr.utils.options import OptionError, dump_options

CKPT_RE = re.compile(r'^checkpoint-(\d+)$')
#: option keys that may change between a run and its automatic resume (loader plumbing only)
RESUME_FREE_KEYS = ('num_workers', 'workers', 'progress', 'progress_bar', 'print_freq', 'tensorboard')


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


def experiment_fingerprint(opt: Dict[str, Any]) -> Dict[str, Any]:
    """The options that decide what an experiment folder holds: ``model``, ``datasets``, ``seed``."""
    return {k: opt.get(k) for k in ('model', 'datasets', 'seed')}


def plan_experiment(exp_dir: Path, resume: str = 'auto', force: bool = False,
                    opt: Optional[Dict[str, Any]] = None) -> Tuple[str, Optional[Path]]:
    """Decide what to do with ``exp_dir`` without touching it (same answer on every process).

    Returns ``('fresh', None)``, ``('archive', None)`` (rename the old folder, then fresh),
    ``('resume', checkpoint_dir)`` or ``('archive_then_resume', checkpoint_dir)``. ``--resume
    auto`` continues the latest checkpoint when the ``model`` / ``datasets`` / ``seed`` options
    of ``opt`` match the folder's ``options.yml`` and refuses otherwise, naming the changed keys
    (:class:`~dalpsr.utils.experiment.FolderConflict`); ``--force`` archives; ``--resume no``
    refuses any existing folder (:class:`FileExistsError`).
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


def open_experiment_folder(exp_dir: Path, action: str, accelerator) -> None:
    """Act on :func:`plan_experiment`'s decision (main process; the others wait): archive the
    old folder when asked, create ``checkpoints/``, remove temporary folders of a killed save."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        act_on_folder(exp_dir, 'archive' if action.startswith('archive') else 'fresh')
        ckpt_root = exp_dir / 'checkpoints'
        ckpt_root.mkdir(exist_ok=True)
        for stale in ckpt_root.glob('.tmp-checkpoint-*'):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()


def write_options_file(exp_dir: Path, opt: Dict[str, Any], log) -> Path:
    """``options.yml`` (atomic); a later session with other options writes ``options_<time>.yml``
    and logs the changed keys."""
    text = dump_options(opt)
    opt_file = exp_dir / 'options.yml'
    if opt_file.exists() and opt_file.read_text(encoding='utf-8') != text:
        changed = changed_keys(yaml.safe_load(opt_file.read_text(encoding='utf-8')) or {}, yaml.safe_load(text) or {})
        opt_file = exp_dir / f'options_{get_time_str()}.yml'
        log.warning('options differ from the first run of this experiment (%s); saved as %s',
                    describe_keys(changed, 8), opt_file.name)
    atomic_write_text(opt_file, text)
    return opt_file


def save_checkpoint(accelerator, ckpt_root: Path, step: int, keep: int, extra: Dict[str, Any]) -> Path:
    """Atomic checkpoint: ``save_state`` into ``.tmp-checkpoint-<step>``, then rename; keep the
    newest ``keep`` (older ones are deleted only after the new one is complete)."""
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


def export_model(model, exp_dir: Path, ema, accelerator) -> Path:
    """``model.export`` into ``export/`` via a temporary folder (EMA weights when enabled); an
    earlier export is kept as ``export_archived_<time>``."""
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
