"""The comparison harness end to end (scripts/compare.py on options/compare/ci_tiny.yml): bicubic, the
shipped DePLSR-CPU and tiny random stand-ins of DaLPSR, SSP-IR and DeeDSR on three small real photos,
plus a deliberately broken method. Checks the table (markdown, CSV, JSON), the figure, resumability
(a finished cell is not rerun, the failed one is retried), the published rows' protocol marking,
metric values equal to scripts/iqa.py's on the same folders, the folder rule, the memory probe and
the sources of options/compare/published.yml."""
import csv
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from tests.script_loader import load_script
from tests.test_deedsr_restorer import tiny_export, tiny_root  # noqa: F401 - fixtures: a tiny DeeDSR export
from tests.test_sspir_restorer import export  # noqa: F401 - fixture: a tiny SSP-IR export

REPO = Path(__file__).resolve().parent.parent
CI = str(REPO / 'options/compare/ci_tiny.yml')
STAND_INS = ('dalpsr_tiny', 'sspir_tiny', 'deedsr_tiny')


@pytest.fixture(scope='module')
def small_set(tmp_path_factory):
    """Three shipped photos as a synthetic test set: 96 px GT crops, 24 px LR (generate_lq --testset)."""
    from dalpsr.data.triplet_writer import write_triplets
    out = tmp_path_factory.mktemp('cmp_set') / 'set'
    write_triplets(out, hr='sample:val', num=3, seed=0, gt_size=96, testset=True, progress=False, verbose=False)
    return {'lq': str(out / 'LR'), 'gt': str(out / 'GT')}


@pytest.fixture(scope='module')
def tiny_dalpsr(tmp_path_factory):
    from dalpsr.inference.tiny import build_tiny_dalpsr
    return build_tiny_dalpsr(str(tmp_path_factory.mktemp('cmp_tiny') / 'models'))


@pytest.fixture(scope='module')
def overrides(small_set, tiny_dalpsr, export, tiny_export, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp('cmp_results')
    return root, [
        f'path.results_root={root}', f"sets.sample_val.dataroot_lq={small_set['lq']}",
        f"sets.sample_val.dataroot_gt={small_set['gt']}",
        f"methods.dalpsr_tiny.set=[sampler.num_steps=2, model.path={tiny_dalpsr['dalpsr']}, "
        f"irpad.path={tiny_dalpsr['irpad']}]",
        f"methods.sspir_tiny.set=[sampler.num_steps=2, model.path={export['path']}]",
        f'methods.deedsr_tiny.set=[sampler.num_steps=2, model.path={tiny_export}]',
        'methods.broken.options=options/test/test_dalpsr_tiny.yml',
        f"methods.broken.set=[model.path={root / 'no_such_export'}]", 'methods.broken.label=Broken',
    ]


@pytest.fixture(scope='module')
def first_run(overrides):
    """The first run (rc, result folder, table document)."""
    cmp = load_script('compare')
    root, sets = overrides
    cwd = os.getcwd()
    os.chdir(REPO)  # the options name repository paths (test options files, published.yml)
    try:
        rc = cmp.main(['-opt', CI] + [a for s in sets for a in ('--set', s)])
    finally:
        os.chdir(cwd)
    out = root / 'ci_tiny'
    return rc, out, json.loads((out / 'table.json').read_text())


def _ours(doc):
    return {r['method']: r for r in doc['rows'] if r['kind'] == 'ours'}


def test_whole_harness_table_csv_json_figure_and_the_failing_method(first_run):
    rc, out, doc = first_run
    assert rc == 1  # one cell failed: the exit status says so, the others finished
    ours = _ours(doc)
    assert set(ours) == {'bicubic', 'deplsr_cpu', 'broken'} | set(STAND_INS)
    for m in ('bicubic', 'deplsr_cpu') + STAND_INS:
        r = ours[m]
        assert (r['status'], r['ok'], r['images']) == ('ok', 3, 3), (m, r['message'])
        assert set(r['values']) == {'psnr', 'ssim'} and r['s_per_img'] > 0
        assert r['peak_mem_kind'] == 'cpu_peak_rss_increase' and r['peak_mem_mb'] >= 0
    # the real networks beat noise: DePLSR-CPU and bicubic well above the random stand-ins
    assert min(ours['bicubic']['values']['psnr'], ours['deplsr_cpu']['values']['psnr']) > \
        max(ours[m]['values']['psnr'] for m in STAND_INS)
    broken = ours['broken']
    assert broken['status'] == 'failed' and 'no_such_export' in broken['message'] and not broken['values']
    md = (out / 'table.md').read_text()
    assert md.count('TINY RANDOM STAND-IN') == 3 and '| Broken |' in md and 'failed 0/0' in md
    assert 'peak MiB (RSS)' in md and 'peak resident memory' in md
    rows = list(csv.DictReader(io.StringIO((out / 'table.csv').read_text())))
    assert len(rows) == len(doc['rows'])
    for row, r in zip(rows, doc['rows']):
        assert row['method'] == r['method'] and row['row'] == r['kind']
        if r['values'].get('psnr') is not None:
            assert float(row['psnr']) == r['values']['psnr']
    import matplotlib.image as mpimg
    fig = mpimg.imread(str(out / 'figure.png'))
    h, w = fig.shape[:2]
    # 2 rows (images) x 7 panels (LR, the 5 methods that ran, HR); the broken method has no column
    assert abs(w / h - (2.2 * 7) / (2.35 * 2)) < 0.05


def test_published_rows_are_marked_by_protocol(first_run, overrides):
    _, out, doc = first_run
    pub = [r for r in doc['rows'] if r['kind'] == 'published']
    assert {r['method_published'] for r in pub} == {'DaLPSR', 'SSP-IR', 'DeeDSR', 'DePLSR'}
    assert all(not r['protocol_match'] and r['protocol_note'].startswith('OTHER protocol') for r in pub)
    assert (out / 'table.md').read_text().count('OTHER protocol') == len(pub)
    sspir = next(r for r in pub if r['method_published'] == 'SSP-IR')
    assert sspir['values']['psnr'] == 19.18 and sspir['s_per_img'] == 8.82 and 'A100' in sspir['hardware']
    # the same cells on a set declared as SSP-IR's DIV2K-Val protocol: only SSP-IR's row is comparable
    from dalpsr.compare.harness import build_document
    from dalpsr.compare.options import load_compare_options
    from dalpsr.compare.published import load_published
    from dalpsr.compare.table import render_markdown
    from dalpsr.utils.experiment import read_record
    root, sets = overrides
    opt = load_compare_options(CI, sets + ['sets.sample_val.protocol=div2k-val-2k-sspir'])
    records = {m: {'sample_val': read_record(out / 'cells' / m / 'sample_val.json')} for m in opt['methods']}
    doc2 = build_document(opt, records, load_published(str(REPO / 'options/compare/published.yml')))
    match = {r['method_published']: r['protocol_match'] for r in doc2['rows'] if r['kind'] == 'published'}
    assert match == {'DaLPSR': False, 'SSP-IR': True, 'DeeDSR': False, 'DePLSR': False}
    md = render_markdown(doc2)
    assert 'same protocol (div2k-val-2k-sspir)' in md and md.count('OTHER protocol') == 3


def test_second_run_reruns_nothing_but_the_failed_cell(first_run, overrides):
    _, out, _ = first_run
    cells = {p: p.stat().st_mtime_ns for p in (out / 'cells').rglob('*.json')}
    images = {p: p.stat().st_mtime_ns for p in (out / 'runs').rglob('*.png')}
    from dalpsr.compare.harness import compare
    from dalpsr.compare.options import load_compare_options
    root, sets = overrides
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        res = compare(load_compare_options(CI, sets))
    finally:
        os.chdir(cwd)
    assert res['ran'] == [('broken', 'sample_val')] and res['failed'] == [('broken', 'sample_val')]
    assert len(res['done_before']) == 5
    changed = [p.parent.name + '/' + p.name for p, t in cells.items() if p.stat().st_mtime_ns != t]
    assert changed == ['broken/sample_val.json']
    assert {p: p.stat().st_mtime_ns for p in (out / 'runs').rglob('*.png')} == images


def test_harness_metrics_equal_iqa_py_on_the_same_folders(first_run, tmp_path):
    _, out, doc = first_run
    iqa = load_script('iqa')
    gt = doc['sets'][0]['dataroot_gt']
    for m, r in _ours(doc).items():
        if r['status'] != 'ok':
            continue
        dst = tmp_path / m
        assert iqa.main(['--sr', r['sr_dir'], '--gt', gt, '--metrics', 'psnr', 'ssim', '--crop-border', '4',
                         '--out', str(dst), '--no-progress']) == 0
        res = json.loads((dst / 'summary.json').read_text())['results']
        assert {k: v['mean'] for k, v in res.items()} == r['values'], m
        ours_csv = (Path(r['iqa_dir']) / 'per_image.csv').read_text()
        assert ours_csv == (dst / 'per_image.csv').read_text()


def test_changed_options_are_refused_and_force_archives(first_run, overrides):
    from dalpsr.compare.harness import compare
    from dalpsr.compare.options import load_compare_options
    root, sets = overrides
    _, out, _ = first_run
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        opt = load_compare_options(CI, sets + ['metrics.crop_border=2', 'methods.broken.options=options/x.yml'])
        with pytest.raises(FileNotFoundError, match='methods.broken.options'):
            compare(opt)  # inputs are checked before the folder is touched
        opt = load_compare_options(CI, sets + ['metrics.crop_border=2'])
        with pytest.raises(FileExistsError, match=r'bicubic\.sample_val\.metrics\.crop_border'):
            compare(opt)
        opt = load_compare_options(CI, sets + ['metrics.crop_border=2'])
        opt['methods'] = {'bicubic': opt['methods']['bicubic']}
        res = compare(opt, force=True)
    finally:
        os.chdir(cwd)
    assert res['ran'] == [('bicubic', 'sample_val')]
    archived = [p for p in root.iterdir() if p.name.startswith('ci_tiny_archived_')]
    assert len(archived) == 1 and (archived[0] / 'table.json').is_file()


def test_compare_options_errors_are_one_line(tmp_path):
    from dalpsr.compare.options import resolve_compare_options
    from dalpsr.utils.options import OptionError
    base = {'name': 'x', 'sets': {'a': {'dataroot_lq': 'lq'}}, 'methods': {'m': {'options': 'o.yml'}}}
    resolve_compare_options(base)
    for bad, msg in ((dict(base, colour=1), "unknown key 'colour'"),
                     (dict(base, sets={'a': {}}), "'dataroot_lq'"),
                     (dict(base, methods={'m': {'options': 'o.yml', 'set': ['nokey']}}), 'methods.m.set'),
                     (dict(base, figure={'set': 'zz'}), 'figure.set'),
                     (dict(base, metrics={'names': []}), 'metrics.names')):
        with pytest.raises(OptionError, match=re.escape(msg)):
            resolve_compare_options(bad, 'c.yml')


def test_memory_probe_resets_the_peak_between_cells():
    from dalpsr.compare.harness import MemoryProbe
    with MemoryProbe('cpu') as first:
        big = np.ones(300 * 2 ** 20 // 8)
        big[::4096] = 2.0
        del big
    with MemoryProbe('cpu') as second:
        small = np.ones(100 * 2 ** 20 // 8)
        small[::4096] = 2.0
        del small
    if first.kind != 'cpu_peak_rss_increase':
        pytest.skip('/proc/self/clear_refs is not available here')
    assert first.mb > 280
    assert 90 < second.mb < 200  # the earlier 300 MiB peak does not leak into the later cell


def test_published_file_is_sourced_and_every_value_is_in_its_source():
    from dalpsr.compare.published import load_published
    pub = load_published(str(REPO / 'options/compare/published.yml'))
    assert {e['method'] for e in pub['entries']} == {'DaLPSR', 'SSP-IR', 'DeeDSR', 'DePLSR'}
    shared = REPO.parent / 'shared'
    if not shared.is_dir():
        shared = Path('/work/shared')
    texts = {'related-methods.md': shared / 'specs' / 'related-methods.md',
             'dalpsr-paper.md': shared / 'seeds' / 'dalpsr-paper.md'}
    if not all(p.is_file() for p in texts.values()):
        pytest.skip('../shared (specs and papers) is not here')
    for e in pub['entries']:
        name = 'dalpsr-paper.md' if 'dalpsr-paper.md' in e['source'] else 'related-methods.md'
        assert name in e['source']
        text = texts[name].read_text(encoding='utf-8')
        for metric, v in list(e['values'].items()) + [('s_per_img', e['s_per_img'])]:
            if v is None:
                continue
            forms = {f'{v:.2f}', f'{v:.3f}', f'{v:.4f}'.lstrip('0'), f'{v:.4f}', f'{v:.2f}'.rstrip('0')}
            assert any(re.search(rf'(?<![\d.]){re.escape(f)}(?!\d)', text) for f in forms), (e['method'], metric, v)


def test_published_entry_without_source_is_refused(tmp_path):
    from dalpsr.compare.published import load_published
    from dalpsr.utils.options import OptionError
    p = tmp_path / 'pub.yml'
    p.write_text('protocols: {x: a set}\nentries:\n  - {method: M, paper: P, table: T, dataset: D, protocol: x, '
                 'values: {psnr: 20.0}}\n')
    with pytest.raises(OptionError, match="missing required key 'source'"):
        load_published(str(p))
    p.write_text('protocols: {x: a set}\nentries:\n  - {method: M, paper: P, table: T, dataset: D, protocol: y, '
                 'values: {psnr: 20.0}, source: s}\n')
    with pytest.raises(OptionError, match="protocol 'y'"):
        load_published(str(p))


def test_reference_compare_options_document_every_key_and_load(repo_root):
    from dalpsr.compare.options import DEFAULTS, METHOD_DEFAULTS, SET_DEFAULTS, TOP_KEYS, resolve_compare_options
    from dalpsr.utils.options import load_yaml
    from tests.test_options import documented_tree
    text = (REPO / 'options/reference/compare.yml').read_text()
    doc = documented_tree(text)
    keys = set(TOP_KEYS) | {f'{b}.{k}' for b in ('path', 'metrics', 'figure') for k in DEFAULTS[b]}
    keys |= {f'sets.realsr.{k}' for k in SET_DEFAULTS} | {f'methods.bicubic.{k}' for k in METHOD_DEFAULTS}
    missing = sorted(k for k in keys if not doc.get(k))
    assert not missing, f'options/reference/compare.yml does not document (with a comment) {missing}'
    resolve_compare_options(load_yaml(str(REPO / 'options/reference/compare.yml')))
