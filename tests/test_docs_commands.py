"""Every shell command shown in README.md and docs/*.md is accounted for (issue 13 item 9).

The commands are the ``python`` / ``accelerate`` / ``bash`` lines of the fenced code blocks (continuation
lines joined, ``&&`` chains split, trailing ``# comments`` dropped) and the inline code spans of the prose
that start with one of them and name a script. Each one must match exactly one
row of the tables below:

- ``RUN_BY_TEST``: a test that runs the command's script/options at tiny scale (the test checks that
  the node id exists);
- ``RUN_HERE``: cheap commands (seconds) run by a test of this file in a temporary folder;
- ``PARSE_ONLY``: commands that need real weights, a GPU, real datasets, the network or a long CPU
  run, with the reason.

Whatever the row, every ``python``/``accelerate`` command is parse-checked here without running it:
the script exists, its argument parser accepts exactly the documented arguments (``accelerate launch``
arguments by accelerate's own parser), every ``-opt``/``--opt`` file exists and loads with
``dalpsr.utils.options.load_options`` with the command's ``--set`` overrides, and for ``dalpsr/train.py``
and ``dalpsr/test.py`` the options pass the same checks the scripts run before building anything
(generate_lq.py: its degradation is built from ``-opt``/``--block``/``--set``); an ``experiments/<name>/``
argument names the experiment of an options file. (Few commands are cheap enough to run here: on the
shared 2-core machine even ``make_tiny_sd.py`` or 48 triplets take about a minute.)
A command that no row matches fails with one line naming the file, the line and the command.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import glob
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Optional, Tuple
from unittest import mock

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_FILES = ['README.md'] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, 'docs', '*.md')))
_LAUNCHERS = re.compile(r'^(?:\S*/)?(python3?|accelerate|bash|torchrun)$')
#: ``<config>`` placeholders in docs/training.md stand for any training options file; checked with this one.
PLACEHOLDERS = {'<config>': 'train_irpad_cpu'}


@dataclass
class DocCommand:
    file: str
    line: int
    text: str          # the command as the docs show it (env assignments and comments dropped)
    argv: List[str]    # shlex tokens, launcher first

    def where(self) -> str:
        return f'{self.file}:{self.line}: {self.text}'


def _commands_of(text: str, rel: str, line: int) -> List[DocCommand]:
    """Commands of one shell text (``&&`` chains split, env assignments and comments dropped)."""
    out = []
    text = re.sub(r'^\$\s+', '', text.strip())
    for part in text.split('&&'):
        try:
            tokens = shlex.split(part, comments=True)
        except ValueError:
            continue
        while tokens and re.match(r'^[A-Z_][A-Z0-9_]*=', tokens[0]):
            tokens = tokens[1:]          # OMP_NUM_THREADS=1 python ...
        if tokens and _LAUNCHERS.match(tokens[0]) and len(tokens) > 1:
            tokens[0] = _LAUNCHERS.match(tokens[0]).group(1)   # venv/bin/python -> python
            out.append(DocCommand(rel, line, ' '.join(tokens), tokens))
    return out


_INLINE = re.compile(r'(?<!`)`((?:venv/bin/)?(?:python3?|accelerate launch|bash) [^`]+)`(?!`)')


def extract_commands(files=DOC_FILES) -> List[DocCommand]:
    """Commands of ``files`` (relative to the repository root): the lines of fenced code blocks
    (continuation lines joined) and inline code spans that start with python/accelerate/bash."""
    out: List[DocCommand] = []
    for rel in files:
        lines = open(os.path.join(REPO, rel), encoding='utf-8').read().splitlines()
        fenced, joined, start = False, None, 0
        prose: List[Tuple[int, str]] = []
        for i, raw in enumerate(lines, 1):
            s = raw.strip()
            if s.startswith('```'):
                fenced, joined = not fenced, None
                continue
            if not fenced:
                prose.append((i, raw))
                continue
            if joined is None:
                start, joined = i, ''
            cont = s.endswith('\\')
            joined += ' ' + (s[:-1].strip() if cont else s)
            if cont:
                continue
            out += _commands_of(joined, rel, start)
            joined = None
        # inline code, possibly wrapped over two lines of a paragraph
        text = '\n'.join(r for _, r in prose)
        starts = [0]
        for _, r in prose:
            starts.append(starts[-1] + len(r) + 1)
        for m in _INLINE.finditer(text):
            k = max(j for j, off in enumerate(starts[:-1]) if off <= m.start())
            span = m.group(1).replace('\n', ' ')
            if re.search(r'\.(py|sh)\b| -m ', span):  # not a fragment of flags
                out += _commands_of(span, rel, prose[k][0])
    return out


# ------------------------------------------------------------------------------------------------------
# The tables. Patterns are regular expressions searched in the command text (``shlex.join`` of its tokens).

#: command pattern -> test node id that runs it: the same script, or the same options file / builder it
#: calls, at tiny scale (tiny random models, a few shipped photos).
RUN_BY_TEST: List[Tuple[str, str]] = [
    (r'^python -m pytest -q tests$', 'tests/test_docs_commands.py'),           # the suite itself
    (r'^python -m pytest$', 'tests/test_docs_commands.py'),
    (r'^python -m pytest -q tests/test_iqa\.py tests/test_iqa_models\.py', 'tests/test_iqa_models.py'),
    (r'^python scripts/demo\.py$', 'tests/test_demo.py::test_demo_data_part_writes_and_summarises_a_resumable_set'),
    (r'^python scripts/demo_sr\.py$',
     'tests/test_test_script.py::test_demo_sr_runs_the_tiny_stand_in_labelled_as_such'),
    # make_tiny_sd.py is a wrapper of build_tiny_sd, which this test builds and loads
    (r'^python scripts/make_tiny_sd\.py pretrained_models/tiny-sd$',
     'tests/test_sd_components.py::test_tiny_sd_layout_and_load'),
    # make_tiny_dalpsr.py is a wrapper of build_tiny_dalpsr, the fixture of this test
    (r'^python scripts/make_tiny_dalpsr\.py pretrained_models/tiny$',
     'tests/test_test_script.py::test_messy_folder_outputs_rules_prompts_and_metrics'),
    # the tiny recipes: DaLPSRModel on a tiny SD through train.py's loop (6 steps); the file itself is
    # validated here and in test_options_files_are_valid_and_ablations_differ
    (r'^python dalpsr/train\.py -opt options/train/train_dalpsr_tiny\.yml$',
     'tests/test_dalpsr_model.py::test_training_lowers_fixed_batch_loss_and_keeps_frozen_parts'),
    (r'^python dalpsr/train\.py -opt options/train/train_deedsr_stage1_tiny\.yml$',
     'tests/test_deedsr_stage1.py::test_moco_trains_and_resumes_exactly'),
    (r'^python dalpsr/train\.py -opt options/train/train_deedsr_stage2_tiny\.yml$',
     'tests/test_deedsr_stage2.py::test_stage2_loss_falls_and_resume_is_exact'),
    (r'^python dalpsr/train\.py -opt options/train/train_caption_align_tiny\.yml$',
     'tests/test_caption_align.py::test_alignment_reduces_the_lr_hr_feature_gap_and_export_plugs_into_llava'),
    (r'^python dalpsr/test\.py -opt options/test/test_dalpsr_tiny\.yml',
     'tests/test_test_script.py::test_messy_folder_outputs_rules_prompts_and_metrics'),
    (r'^python dalpsr/test\.py -opt options/test/test_bicubic\.yml',
     'tests/test_inference_feed_forward.py::test_bicubic_options_file_runs_from_the_command_line'),
    (r'^python scripts/generate_lq\.py --hr sample:val --out datasets/val_triplets --num 16 --seed 1$',
     'tests/test_generate_lq.py::test_same_bytes_whatever_the_workers'),
    (r'^python scripts/generate_lq\.py --hr sample:train --out /tmp/glw[12] --num 48 --workers [12]$',
     'tests/test_generate_lq.py::test_same_bytes_whatever_the_workers'),
    (r'^python scripts/generate_lq\.py -opt \S+ --block ',
     'tests/test_generate_lq.py::test_degradation_from_a_training_yaml_block'),
    (r'^accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no '
     r'scripts/generate_lq\.py',
     'tests/test_sharding.py::test_generate_lq_two_processes_resume_a_killed_run_into_the_same_bytes'),
    (r'^accelerate launch --multi_gpu --num_processes 2 .*dalpsr/train\.py -opt options/reference/train\.yml$',
     'tests/test_accelerate_multiproc.py::test_two_process_cpu_run'),
    (r'^accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no '
     r'dalpsr/test\.py -opt options/test/test_bicubic\.yml ',
     'tests/test_test_sharding.py::test_two_processes_write_the_bytes_and_records_of_one'),
    (r'^python scripts/iqa\.py -opt options/test/iqa_example\.yml',
     'tests/test_iqa.py::test_cli_flags_and_options_file'),
    (r'^python scripts/iqa\.py --sr results/ours/RealSR --gt datasets/RealSR/HR --out ',
     'tests/test_iqa.py::test_cli_flags_and_options_file'),
    (r'^python dalpsr/test\.py -opt options/test/test_deplsr_cpu\.yml',
     'tests/test_deplsr_testpy.py::test_testpy_runs_the_shipped_deplsr_over_odd_images'),
    (r'^python scripts/plot_architecture\.py --out figs/architecture\.png$',
     'tests/test_architecture_doc.py::test_figure_names_existing_code_and_its_command_runs'),
    (r'^python scripts/eval_srclip\.py ', 'tests/test_srclip.py::test_tiny_srclip_training_loss_falls_and_exports'),
    # the comparison harness (docs/compare.md): ci_tiny.yml with the tiny stand-ins built in the test
    (r'^python scripts/compare\.py -opt options/compare/ci_tiny\.yml',
     'tests/test_compare.py::test_whole_harness_table_csv_json_figure_and_the_failing_method'),
    # prepare_testsets.py on small real photos laid out as the downloads (RealSR V3, DRealSR) and the presets
    (r'^python scripts/prepare_testsets\.py --protocol realsr-stablesr ',
     'tests/test_prepare_testsets.py::test_realsr_stablesr_centre_crops_resume_and_refusal'),
    (r'^python scripts/prepare_testsets\.py --protocol (drealsr-stablesr|realsr-v3-full) ',
     'tests/test_prepare_testsets.py::test_drealsr_suffixes_and_full_realsr_v3'),
    (r'^python scripts/(prepare_testsets\.py --protocol div2k-val-|generate_lq\.py --preset )',
     'tests/test_prepare_testsets.py::test_synthetic_div2k_val_by_preset_records_seed_and_settings'),
]

#: command pattern -> name of the test below that runs it here (paths rewritten to a temporary folder).
RUN_HERE: List[Tuple[str, str]] = [
    (r'^python dalpsr/train\.py -opt options/reference/train\.yml$', 'test_reference_train_options_run_as_documented'),
]

#: command pattern -> why it is only parse-checked here.
GPU = 'needs a GPU'
SD = 'needs the real Stable Diffusion 2.1-base weights (and a trained ControlNet) under pretrained_models/'
LLAVA = 'needs the real RAM and LLaVA-1.5-7B weights and a GPU'
DATA = 'needs real datasets (DIV2K / RealSR / the user\'s folders) that are not shipped'
LONG = 'a CPU recipe of tens of minutes; its code path is tested with tiny options elsewhere'
BENCH = 'a benchmark: minutes of CPU, prints figures (no pass/fail)'
PARSE_ONLY: List[Tuple[str, str]] = [
    (r'^bash scripts/install\.sh$', 'creates a venv and installs the pins from PyPI (network); '
                                    'checked with `bash -n` here; .ci/run runs it'),
    (r'^python scripts/generate_lq\.py (--testset )?--hr datasets/(DIV2K_\w+|HR) ', DATA),
    (r'^python scripts/plot_triplets\.py ', 'plots the triplet set that scripts/demo.py writes under results/demo'),
    (r'^python dalpsr/train\.py -opt options/train/train_irpad(_cpu)?\.yml',
     LONG + ' (IRPAD: 30 min on 2 cores; paper scale needs open_clip ViT-B/16 and DIV2K)'),
    (r'^python scripts/eval_irpad\.py ', 'evaluates a trained IRPAD export on a 2,000-sample LR cache'),
    (r'^python scripts/make_lr_cache\.py ', 'builds 2,000-4,000 512-px LR samples (minutes of CPU)'),
    (r'^python scripts/irpad_feature_probe\.py ', 'needs the LR caches made by make_lr_cache.py'),
    (r'^python scripts/irpad_label_ceiling\.py ', 'needs the LR cache made by make_lr_cache.py'),
    (r'^python scripts/irpad_error_analysis\.py ', 'needs the per-sample results of eval_irpad.py'),
    (r'^python scripts/plot_irpad_curve\.py ', 'needs the eval_irpad.py folders of the curve runs '
                                               '(tests/test_plot_irpad_curve.py runs it on made-up metrics)'),
    (r'^python scripts/caption\.py ', LLAVA),
    (r'^accelerate launch .*scripts/caption\.py ', LLAVA + ' (several GPUs / machines)'),
    (r'^accelerate launch .*--num_processes (8|16|32) .*scripts/generate_lq\.py', 'several machines and ' + DATA),
    (r'^python dalpsr/train\.py -opt options/train/train_caption_align\.yml$', LLAVA),
    (r'^accelerate launch .*dalpsr/train\.py -opt options/train/\w*sd21\w*\.yml', SD + '; ' + GPU),
    (r'^accelerate launch .*--num_processes 8 .*dalpsr/test\.py -opt options/test/test_dalpsr_sd21\.yml$',
     SD + '; ' + GPU),
    (r'^accelerate launch .*dalpsr/train\.py -opt options/train/train_deedsr_stage1\.yml', GPU + ' and ' + DATA),
    (r'^accelerate launch .*dalpsr/train\.py -opt options/train/(train_srclip_vitb32|train_realdat_x4)\.yml',
     GPU + ' and the real CLIP ViT-B/32 weights'),
    (r'^accelerate launch --multi_gpu --num_processes 4 dalpsr/train\.py -opt options/train/<config>', GPU),
    (r'^python dalpsr/train\.py -opt options/train/<config>\.yml', 'a template (<config>: any file of options/train/; '
                                                                  'checked with train_irpad_cpu)'),
    (r'^python dalpsr/train\.py -opt options/train/train_deedsr_stage1(_supervised)?_cpu\.yml',
     LONG + ' (DeeDSR stage 1 on photos)'),
    (r'^python scripts/probe_degradation_encoder\.py ',
     'needs the export of the DeeDSR stage-1 CPU recipe and photos '
     '(tests/test_probe_degradation_encoder.py runs it on a tiny learner)'),
    (r'^python dalpsr/train\.py -opt options/train/train_(srclip|realdat|dat|realdat_oracle)_cpu\.yml',
     LONG + ' (DePLSR recipes)'),
    (r'^python scripts/(restore_folder|iqa)\.py .*datasets/deplsr/val_testset_x4_sub22/',
     'needs the DePLSR test set made by generate_lq.py from the val photos and a trained export'),
    (r'^python scripts/eval_realdat_pairs\.py ', 'needs the exports of the DePLSR CPU recipes and photos '
                                                 '(tests/test_realdat_oracle.py runs it on tiny exports)'),
    (r'^python scripts/realdat_conditioning_ablation\.py ',
     'needs the DePLSR test set made by generate_lq.py from the val photos '
     '(tests/test_realdat.py runs it on a tiny export)'),
    (r'^python dalpsr/test\.py -opt options/test/test_dalpsr_sd21\.yml', SD),
    (r'^python scripts/iqa\.py .*--device cuda', GPU + ' and the IQA metric weights'),
    (r'^python scripts/iqa\.py --sr results/dalpsr_sd21/RealSR --gt datasets/RealSR/HR --metrics dalpsr$',
     'the DaLPSR metric set needs its metric weights and RealSR'),
    (r'^python scripts/iqa\.py --sr results/ours/RealLR200 ', 'needs the NIQE/MUSIQ/MANIQA/CLIPIQA weights'),
    (r'^python scripts/iqa\.py --sr SR --gt GT ', 'needs the DISTS and CLIP ViT-B/32 weights'),
    (r'^python scripts/plot_sr_crops\.py ', 'needs the DePLSR test set and SR results made by test.py '
                                            '(tests/test_realdat.py runs it on tiny folders)'),
    (r'^python -m dalpsr\.metrics\.crosscheck$', 'compares against pyiqa with the real metric weights'),
    (r'^python benchmarks/bench_\w+\.py', BENCH + ' (the cuda rows need a GPU)'),
    (r'^python scripts/compare\.py -opt options/compare/papers\.yml', SD + '; ' + GPU + '; ' + DATA),
    (r'^python scripts/compare\.py -opt options/compare/photos_val_cpu\.yml$',
     LONG + ' (docs/results.md: every method on Kodak24 of ../shared/photos/val; tests/test_compare.py runs the '
            'harness on ci_tiny.yml)'),
]


def _match(table, text):
    return [row for row in table if re.search(row[0], text)]


def _classify(cmd: DocCommand):
    rows = ([('test', r) for r in _match(RUN_BY_TEST, cmd.text)] + [('here', r) for r in _match(RUN_HERE, cmd.text)]
            + [('parse', r) for r in _match(PARSE_ONLY, cmd.text)])
    return rows


# ------------------------------------------------------------------------------------------------------
# Parse-only checks.

class _Parsed(BaseException):
    """Raised by the patched ``ArgumentParser.parse_args`` once the script's arguments parsed."""


def _parse_script(script: str, args: List[str], module: Optional[str] = None) -> argparse.Namespace:
    """Run ``script`` (or ``-m module``) as ``__main__`` up to its first ``parse_args`` and return the namespace.
    Raises AssertionError with argparse's message when the arguments are refused."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, a=None, namespace=None):
        raise _Parsed(original(self, a, namespace))

    err = io.StringIO()
    target = module or os.path.join(REPO, script)
    with mock.patch.object(argparse.ArgumentParser, 'parse_args', parse_then_stop), \
            mock.patch.object(sys, 'argv', [target] + list(args)), mock.patch.object(sys, 'path', list(sys.path)), \
            contextlib.redirect_stderr(err):
        try:
            if module:
                runpy.run_module(module, run_name='__main__', alter_sys=False)
            else:
                runpy.run_path(target, run_name='__main__')
        except _Parsed as done:
            return done.args[0]
        except SystemExit as ex:
            msg = err.getvalue().strip().splitlines()
            raise AssertionError(f'{script or module}: arguments refused (exit {ex.code}): '
                                 f'{msg[-1] if msg else ""}') from None
    raise AssertionError(f'{script or module}: ran to the end without parsing its arguments')


def _full_parse(script: str, args: List[str]) -> None:
    """A script of scripts/ or benchmarks/ with a module-level ``parse_args(argv)`` checks more after argparse
    (caption.py: --input/--out required, -opt keys, presets): call it."""
    if not script.startswith(('scripts/', 'benchmarks/')):
        return
    with open(os.path.join(REPO, script), encoding='utf-8') as f:
        tree = ast.parse(f.read())
    if not any(isinstance(n, ast.FunctionDef) and n.name == 'parse_args' for n in tree.body):
        return
    import importlib.util
    name = f'_doccmd_{os.path.basename(script)[:-3]}'
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, script))
    mod = importlib.util.module_from_spec(spec)
    err = io.StringIO()
    with mock.patch.object(sys, 'path', list(sys.path)), contextlib.redirect_stderr(err):
        spec.loader.exec_module(mod)
        try:
            mod.parse_args(list(args))
        except SystemExit as ex:
            msg = err.getvalue().strip().splitlines()
            raise AssertionError(f'{script}: parse_args refuses (exit {ex.code}): {msg[-1] if msg else ""}') from None


def _check_options(script: str, ns: argparse.Namespace) -> None:
    """``-opt`` files exist and load with their ``--set``; train.py/test.py options pass the scripts' checks."""
    from dalpsr.utils.options import load_options
    path = getattr(ns, 'opt', None)
    if script == 'scripts/generate_lq.py':  # its -opt/--block/--set give the degradation: build it
        from dalpsr.data.degradations import RealESRGANDegradation
        from tests.script_loader import load_script
        opt = load_script('generate_lq').load_opt(path and os.path.join(REPO, path), ns.set, ns.block)
        RealESRGANDegradation(**opt['degradation'])
        return
    if script == 'scripts/iqa.py':  # the file, --set and the flags merged as iqa.py merges them
        from tests.script_loader import load_script
        from dalpsr.metrics.specs import expand_metric_names
        kw = load_script('iqa').resolve(argparse.Namespace(**{**vars(ns), 'opt': path and os.path.join(REPO, path)}))
        expand_metric_names(kw['metrics'])  # every metric or preset name is known
        return
    if script == 'scripts/compare.py':  # compare options (not test.py's top level) and each method's test options
        from dalpsr.compare.options import load_compare_options
        opt = load_compare_options(os.path.join(REPO, path), list(ns.set))
        for m in opt['methods'].values():
            load_options(os.path.join(REPO, m['options']), m['set'], is_train=False)
        return
    if not path:
        return
    for key, val in PLACEHOLDERS.items():
        path = path.replace(key, val)
    assert os.path.isfile(os.path.join(REPO, path)), f'options file {path} does not exist'
    overrides = list(getattr(ns, 'set', None) or [])
    full = os.path.join(REPO, path)
    if script == 'dalpsr/train.py':
        from dalpsr.training.options import TOP_KEYS, check_train_options, resolve_train_opt
        opt = load_options(full, overrides, is_train=True, top_keys=TOP_KEYS)
        check_train_options(opt)
        from dalpsr.utils.ema import ModelEMA
        ModelEMA.from_opt(resolve_train_opt(opt)['ema'], {})  # docs set train.ema.* from the command line
    elif script == 'dalpsr/test.py':
        from dalpsr.inference.options import resolve_test_opt
        resolve_test_opt(load_options(full, overrides, is_train=False))
    else:
        load_options(full, overrides, is_train=False)


def _script_and_args(cmd: DocCommand) -> Tuple[Optional[str], Optional[str], List[str]]:
    """(script path, module name, script arguments); accelerate's own arguments parsed by its parser."""
    argv = list(cmd.argv)
    if argv[0] == 'accelerate':
        assert argv[1] == 'launch', f'only `accelerate launch` is documented, got {argv[1]}'
        from accelerate.commands.launch import launch_command_parser
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                ns = launch_command_parser().parse_args(argv[2:])
            except SystemExit:
                raise AssertionError(f'accelerate launch refuses: {err.getvalue().strip().splitlines()[-1]}') from None
        return ns.training_script, None, list(ns.training_script_args)
    if argv[1] == '-m':
        return None, argv[2], argv[3:]
    return argv[1], None, argv[2:]


COMMANDS = extract_commands()
_EXPERIMENT_NAMES: List[str] = []


def _experiment_names() -> List[str]:
    """``name:`` of every training options file (train.py writes ``experiments/<name>/``), and the
    names a documented train.py command sets with ``--set name=...``."""
    if not _EXPERIMENT_NAMES:
        from dalpsr.utils.options import load_yaml
        _EXPERIMENT_NAMES.extend(str(load_yaml(p).get('name'))
                                 for p in sorted(glob.glob(os.path.join(REPO, 'options', 'train', '*.yml'))))
        for cmd in COMMANDS:
            if 'dalpsr/train.py' in cmd.argv:
                _EXPERIMENT_NAMES.extend(b[len('name='):] for a, b in zip(cmd.argv, cmd.argv[1:])
                                         if a == '--set' and b.startswith('name='))
    return _EXPERIMENT_NAMES


def _check_experiment_paths(cmd: DocCommand) -> None:
    """An ``experiments/<name>/...`` argument names the experiment folder of an options file."""
    for tok in cmd.argv:
        for val in tok.split('='):
            m = re.match(r'^experiments/([^/<>]+)(/|$)', val)
            if m and m.group(1) not in _experiment_names():
                raise AssertionError(f"{val}: no options file has name '{m.group(1)}' "
                                     f"(train.py writes experiments/<name>/)")


def test_extraction_finds_the_commands_of_every_kind():
    """The extractor sees continuation lines, && chains, env prefixes, accelerate and bash lines."""
    texts = [c.text for c in COMMANDS]
    assert len(COMMANDS) > 40
    assert any(t.startswith('accelerate launch --multi_gpu --num_machines 2') for t in texts)  # joined lines
    assert 'bash scripts/install.sh' in texts and 'python scripts/demo.py' in texts  # && split, venv/bin/python
    assert any(t.startswith('python dalpsr/train.py -opt options/train/train_deedsr_stage1_cpu.yml') for t in texts)


def test_every_doc_command_is_accounted_for():
    """Exactly one table row per command; a new doc command must be added to a table."""
    problems = []
    for cmd in COMMANDS:
        rows = _classify(cmd)
        if not rows:
            problems.append(f'{cmd.where()}  -- neither run by a test nor listed as parse-only')
        elif len(rows) > 1:
            problems.append(f'{cmd.where()}  -- matches {len(rows)} table rows: {[r[1][0] for r in rows]}')
    assert not problems, '\n' + '\n'.join(problems)


def _test_node_exists(node: str) -> bool:
    path, _, rest = node.partition('::')
    full = os.path.join(REPO, path)
    if not os.path.isfile(full):
        return False
    if not rest:
        return True
    names = rest.split('::')
    tree = ast.parse(open(full, encoding='utf-8').read())
    scope = tree.body
    for name in names:
        found = [n for n in scope if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name]
        if not found:
            return False
        scope = found[0].body
    return True


#: inline ``key:`` spans of the docs that are not options keys, with where they are.
NOT_OPTION_KEYS = {'metric': 'docs/metrics.md: "`metric: message`", the text iqa.py appends to a reason cell'}
_KEY_SPAN = re.compile(r'(?<!`)`([a-z_][a-z0-9_]*):(?: [^`\n]*)?`(?!`)')


def _option_keys() -> set:
    """Every key, at any depth, of every options file (the reference files document them all)."""
    import yaml
    keys: set = set()

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                keys.add(str(k))
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    for path in glob.glob(os.path.join(REPO, 'options', '**', '*.yml'), recursive=True):
        with open(path, encoding='utf-8') as f:
            for doc in yaml.safe_load_all(f):
                walk(doc)
    return keys


def test_option_keys_named_in_the_docs_exist():
    """An inline `key:` or `key: value` in the prose names a key of some options file
    (README once said `plugins:` for `imports:`, and `logger:` for a block that does not exist)."""
    keys = _option_keys() | set(NOT_OPTION_KEYS)
    bad = []
    for rel in DOC_FILES:
        fenced = False
        for i, raw in enumerate(open(os.path.join(REPO, rel), encoding='utf-8').read().splitlines(), 1):
            if raw.strip().startswith('```'):
                fenced = not fenced
                continue
            if not fenced:
                bad += [f'{rel}:{i}: {m.group(0)} is no key of any options file'
                        for m in _KEY_SPAN.finditer(raw) if m.group(1) not in keys]
    assert not bad, '\n' + '\n'.join(bad)


def test_every_table_row_is_used_and_every_test_node_exists():
    used = {row[0] for cmd in COMMANDS for _, row in _classify(cmd)}
    unused = [p for p, _ in RUN_BY_TEST + RUN_HERE + PARSE_ONLY if p not in used]
    assert not unused, f'table rows that match no doc command (remove them): {unused}'
    missing = [node for _, node in RUN_BY_TEST if not _test_node_exists(node)]
    assert not missing, f'test nodes that do not exist: {missing}'
    here = [name for _, name in RUN_HERE if not callable(globals().get(name))]
    assert not here, f'RUN_HERE names tests that do not exist: {here}'


def test_reference_train_options_run_as_documented(tmp_path):
    """docs/training.md: `python dalpsr/train.py -opt options/reference/train.yml` "runs as is: a toy
    model, seconds on CPU" (about 5 s of training): the whole run, checkpoint and export included."""
    import dalpsr.train as T
    root = tmp_path / 'exp'
    with contextlib.chdir(REPO):
        rc = T.main(['-opt', 'options/reference/train.yml', '--set', f'path.experiments_root={root}',
                     '--set', 'train.progress_bar=false'])
    assert rc == 0
    exp = root / 'reference_toy'
    from dalpsr.utils.options import load_options
    total = load_options(os.path.join(REPO, 'options/reference/train.yml'))['train']['total_iter']
    assert (exp / 'checkpoints' / f'checkpoint-{total}').is_dir()
    assert any((exp / 'export').iterdir()) and 'reference_toy' in (exp / 'options.yml').read_text()


@pytest.mark.parametrize('cmd', COMMANDS, ids=[f'{c.file}:{c.line}:{c.argv[1] if len(c.argv) > 1 else ""}'
                                                for c in COMMANDS])
def test_command_parses(cmd):
    """The script exists and accepts exactly the documented arguments; its options files load."""
    launcher = os.path.basename(cmd.argv[0])
    if launcher == 'bash':
        script = os.path.join(REPO, cmd.argv[1])
        assert os.path.isfile(script), f'{cmd.where()}: {cmd.argv[1]} does not exist'
        res = subprocess.run(['bash', '-n', script], capture_output=True, text=True)
        assert res.returncode == 0, f'{cmd.where()}: {res.stderr.strip()}'
        return
    if cmd.argv[1:3] == ['-m', 'pytest']:
        paths = [a for a in cmd.argv[3:] if not a.startswith('-')]
        missing = [a for a in paths if not os.path.exists(os.path.join(REPO, a.split('::')[0]))]
        assert not missing, f'{cmd.where()}: {missing} do not exist'
        return
    try:
        script, module, args = _script_and_args(cmd)
        args = [a for a in args]
        if script is not None:
            assert os.path.isfile(os.path.join(REPO, script)), f'{script} does not exist'
        with contextlib.chdir(REPO):  # the docs' paths are relative to the repository root
            ns = _parse_script(script, args, module)
            if script is not None:
                _full_parse(script, args)
                _check_options(script, ns)
        _check_experiment_paths(cmd)
    except Exception as err:  # noqa: BLE001 - one line naming the doc line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        pytest.fail(f'{cmd.where()}\n  -> {first}', pytrace=False)
