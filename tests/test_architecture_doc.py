"""docs/ARCHITECTURE.md stays true: its layer table is the one tests/test_import_graph.py enforces,
every repository path it names exists, and its figure's command runs and names only existing code."""
import os
import re

from tests.script_loader import load_script
from tests.test_import_graph import LAYERS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, 'docs', 'ARCHITECTURE.md')
TOP = ('dalpsr/', 'scripts/', 'options/', 'docs/', 'tests/', 'figs/', 'benchmarks/')


def _doc():
    with open(DOC, encoding='utf-8') as f:
        return f.read()


def test_layer_table_is_the_enforced_one():
    rows = re.findall(r'^\| (\d+) \| ([^|]+) \|', _doc(), flags=re.M)
    table = [set(re.findall(r'`(\w+)`', names)) for _, names in sorted(rows, key=lambda r: int(r[0]))]
    assert [int(n) for n, _ in rows] == list(range(len(rows)))
    assert table == LAYERS


def test_paths_named_in_the_doc_exist():
    paths = {p.split('::')[0].rstrip('.,') for p in re.findall(r'`([^`\s]+)`', _doc()) if p.startswith(TOP)}
    paths |= set(re.findall(r'\]\(\.\./([^)#]+)\)', _doc()))  # relative links
    assert len(paths) > 15
    missing = sorted(p for p in paths if '<' not in p and not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, f'docs/ARCHITECTURE.md names missing paths: {missing}'


def test_figure_names_existing_code_and_its_command_runs(tmp_path):
    plot = load_script('plot_architecture')
    paths = plot.code_paths()
    assert 'dalpsr/data/degradations.py' in paths and 'scripts/iqa.py' in paths
    missing = [p for p in paths if not os.path.exists(os.path.join(ROOT, p))]
    assert not missing, f'figs/architecture.png names missing paths: {missing}'
    out = tmp_path / 'arch.png'
    assert plot.main(['--out', str(out)]) == 0
    with open(out, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert 'scripts/plot_architecture.py --out figs/architecture.png' in _doc()
