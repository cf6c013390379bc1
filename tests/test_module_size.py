"""One concept per module: no module of dalpsr/ over MAX_LINES lines (DEVELOPERS.md: <= ~500)."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 500

#: Temporary exceptions for files being split by someone right now: path -> who splits it and how.
#: Empty since test.py, train.py and pipelines/sampler.py were split (issue 12); an entry is added
#: only with a plan to split the file, and removed when that work lands.
ALLOWLIST = {}


def module_sizes(root=ROOT):
    """``{'dalpsr/x/y.py': number of lines}`` of every Python file under dalpsr/."""
    out = {}
    for d, dirs, files in os.walk(os.path.join(root, 'dalpsr')):
        dirs[:] = [x for x in dirs if x != '__pycache__']
        for f in files:
            if f.endswith('.py'):
                path = os.path.join(d, f)
                with open(path, encoding='utf-8') as fh:
                    out[os.path.relpath(path, root).replace(os.sep, '/')] = sum(1 for _ in fh)
    return out


def oversized(sizes, limit=MAX_LINES, allow=ALLOWLIST):
    return sorted(f'{p}: {n} lines' for p, n in sizes.items() if n > limit and p not in allow)


def test_no_module_over_the_limit():
    sizes = module_sizes()
    assert 'dalpsr/metrics/metric_set.py' in sizes and len(sizes) > 40  # the walk sees the package
    big = oversized(sizes)
    assert not big, (f'modules over {MAX_LINES} lines (split them by concern, see docs/ARCHITECTURE.md): '
                     + ', '.join(big))


def test_limit_rule_itself(tmp_path):
    (tmp_path / 'dalpsr' / 'sub').mkdir(parents=True)
    (tmp_path / 'dalpsr' / 'sub' / 'big.py').write_text('x = 1\n' * (MAX_LINES + 1))
    (tmp_path / 'dalpsr' / 'ok.py').write_text('x = 1\n' * MAX_LINES)
    sizes = module_sizes(str(tmp_path))
    assert sizes == {'dalpsr/sub/big.py': MAX_LINES + 1, 'dalpsr/ok.py': MAX_LINES}
    assert oversized(sizes) == [f'dalpsr/sub/big.py: {MAX_LINES + 1} lines']
    assert oversized(sizes, allow={'dalpsr/sub/big.py': 'being split'}) == []


#: The entry points and their cores read as short named steps (issue 12): no function over this.
MAX_FUNCTION_LINES = 80
ENTRY_POINT_CODE = ('dalpsr/train.py', 'dalpsr/test.py', 'dalpsr/training', 'dalpsr/inference')


def long_functions(root=ROOT, paths=ENTRY_POINT_CODE, limit=MAX_FUNCTION_LINES):
    """``['path:function (n lines)', ...]`` for every function of ``paths`` longer than ``limit``."""
    import ast
    files = []
    for p in paths:
        full = os.path.join(root, p)
        if os.path.isdir(full):
            files += [os.path.join(full, f) for f in sorted(os.listdir(full)) if f.endswith('.py')]
        else:
            files.append(full)
    out = []
    for f in files:
        with open(f, encoding='utf-8') as fh:
            tree = ast.parse(fh.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f'{os.path.relpath(f, root)}:{node.name} ({n} lines)')
    return out


def test_no_long_function_in_the_entry_points():
    assert not long_functions(), ('functions over %d lines in the train/test entry points (split them into '
                                  'named steps): %s' % (MAX_FUNCTION_LINES, ', '.join(long_functions())))


def test_function_rule_itself(tmp_path):
    (tmp_path / 'pkg').mkdir()
    (tmp_path / 'pkg' / 'a.py').write_text('def short():\n    return 1\n\n\ndef long():\n' + '    x = 1\n' * 81)
    assert long_functions(str(tmp_path), ('pkg',)) == ['pkg/a.py:long (82 lines)']
