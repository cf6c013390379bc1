"""The import graph of dalpsr/, built from the source: no circle, and packages import only the
layers below them (docs/ARCHITECTURE.md).

Edges are read with ``ast`` from every ``import``/``from ... import`` anywhere in a file (function-
local imports included: hiding an import in a function does not remove the dependency) plus the
``_MODULES`` registration lists of package ``__init__`` files (imported by ``importlib``).
"""
import ast
import os
from collections import deque

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = 'dalpsr'

#: Layers, bottom first. A module of package P may import its own package and packages of
#: *lower* layers only (never one of the same layer). Top-level modules of dalpsr/ (the entry
#: points test.py, train.py and dalpsr/__init__.py) may import anything. A new package needs a
#: row here and in docs/ARCHITECTURE.md.
LAYERS = [
    {'utils'},                          # options, registries, file I/O, workers: no dalpsr import
    {'data', 'archs', 'losses'},        # degradations/labels/datasets; networks; loss functions
    {'metrics', 'captioning'},          # IQA metrics (sample images of data); taggers (RAM arch)
    {'pipelines'},                      # denoising loop, schedulers, denoisers over archs
    {'models'},                         # training wrappers of archs (validation through pipelines)
    {'restorers'},                      # one registered restorer per method (test time)
    {'inference', 'training'},          # test.py core; train loop
    {'compare'},                        # comparison harness: runs the test.py core (inference) per method x set
]

#: Imports against the layers in files other developers own, allowed by name (module, imported
#: module) until they are moved; each says why and what would fix it.
ALLOWED_EDGES = {}

#: Circles that exist in files other developers are changing right now, allowed by name until
#: their work lands (each entry: the modules of the circle, sorted). Empty: none today.
ALLOWED_CYCLES = set()


def _module_files(root=ROOT):
    out = {}
    for d, dirs, files in os.walk(os.path.join(root, PACKAGE)):
        dirs[:] = sorted(x for x in dirs if not x.startswith(('.', '__pycache__')))
        for f in sorted(files):
            if f.endswith('.py'):
                path = os.path.join(d, f)
                name = os.path.relpath(path, root)[:-3].replace(os.sep, '.')
                out[name[:-len('.__init__')] if name.endswith('.__init__') else name] = path
    return out


def _registered(tree):
    """Names in a module-level ``_MODULES = [...]`` list."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == '_MODULES'
                                                for t in node.targets):
            return [e.value for e in node.value.elts if isinstance(e, ast.Constant)]
    return []


def build_graph(root=ROOT):
    """``{module: {imported dalpsr module: first line}}`` for every module of dalpsr/."""
    files = _module_files(root)
    graph = {}
    for mod, path in files.items():
        with open(path, encoding='utf-8') as f:
            tree = ast.parse(f.read(), path)
        is_pkg = path.endswith('__init__.py')
        edges = {}

        def add(target, line):
            while target and target not in files:  # `import a.b.c` of a name inside a module
                target = target.rpartition('.')[0]
            if target and target != mod:
                edges.setdefault(target, line)

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split('.')[0] == PACKAGE:
                        add(a.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ''
                if node.level:
                    parts = mod.split('.') if is_pkg else mod.split('.')[:-1]
                    parts = parts[:len(parts) - (node.level - 1)]
                    base = '.'.join(parts + ([base] if base else []))
                if base.split('.')[0] != PACKAGE:
                    continue
                for a in node.names:
                    sub = f'{base}.{a.name}'
                    add(sub if sub in files else base, node.lineno)
        if is_pkg:
            for name in _registered(tree):
                add(f'{mod}.{name}', 0)
        graph[mod] = edges
    return graph


def find_cycles(graph):
    """One shortest circle (list of modules, first repeated at the end) per strongly connected
    component of more than one module."""
    index, low, on, stack, comps, counter = {}, {}, set(), [], [], [0]

    def strong(v):  # Tarjan, iterative
        work = [(v, iter(sorted(graph.get(v, ()))))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            strong(v)
    cycles = []
    for comp in comps:
        if len(comp) < 2:
            continue
        members = set(comp)
        start = min(comp)
        prev, queue = {start: None}, deque([start])
        found = None
        while queue and found is None:  # shortest path back to start inside the component
            v = queue.popleft()
            for w in sorted(graph[v]):
                if w == start:
                    found = v
                    break
                if w in members and w not in prev:
                    prev[w] = v
                    queue.append(w)
        path, v = [], found
        while v is not None:
            path.append(v)
            v = prev[v]
        cycles.append(path[::-1] + [start])
    return cycles


def package_of(mod):
    """'dalpsr.data.lr_cache' -> 'data'; top-level modules ('dalpsr', 'dalpsr.test') -> None."""
    parts = mod.split('.')
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and os.path.isdir(os.path.join(ROOT, *parts))) else None


def layering_violations(graph):
    rank = {p: i for i, layer in enumerate(LAYERS) for p in layer}
    unknown, bad = set(), []
    for mod, edges in sorted(graph.items()):
        src = package_of(mod)
        if src is None:
            continue
        if src not in rank:
            unknown.add(src)
            continue
        for target, line in sorted(edges.items()):
            dst = package_of(target)
            if dst == src or (mod, target) in ALLOWED_EDGES:
                continue
            if dst is None or dst not in rank or rank[dst] >= rank[src]:
                bad.append(f'{mod} (line {line}) imports {target}: {src} may not import '
                           f'{dst or "an entry point"}')
    return sorted(unknown), bad


def test_graph_reads_function_local_imports_and_registrations(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / 'sub').mkdir(parents=True)
    (pkg / '__init__.py').write_text('')
    (pkg / 'sub' / '__init__.py').write_text("_MODULES = ['a']\n")
    (pkg / 'sub' / 'a.py').write_text('from dalpsr.sub import b\n')
    (pkg / 'sub' / 'b.py').write_text('def f():\n    from .c import g\n    import dalpsr.sub.a.x\n')
    (pkg / 'sub' / 'c.py').write_text('import os\n')
    g = build_graph(str(tmp_path))
    assert g['dalpsr.sub'] == {'dalpsr.sub.a': 0}
    assert g['dalpsr.sub.a'] == {'dalpsr.sub.b': 1}
    assert g['dalpsr.sub.b'] == {'dalpsr.sub.c': 2, 'dalpsr.sub.a': 3}
    assert find_cycles(g) == [['dalpsr.sub.a', 'dalpsr.sub.b', 'dalpsr.sub.a']]
    assert find_cycles({'x': {'y': 1}, 'y': {'z': 1}, 'z': {}}) == []


def test_no_import_circle_in_dalpsr():
    cycles = find_cycles(build_graph())
    new = [c for c in cycles if tuple(sorted(set(c))) not in ALLOWED_CYCLES]
    assert not new, 'import circle(s): ' + '; '.join(' -> '.join(c) for c in new)


def test_allowed_cycles_still_exist():
    """An allowlisted circle that is gone must leave ALLOWED_CYCLES (the list only shrinks)."""
    present = {tuple(sorted(set(c))) for c in find_cycles(build_graph())}
    assert not (ALLOWED_CYCLES - present), f'remove from ALLOWED_CYCLES: {sorted(ALLOWED_CYCLES - present)}'


def test_allowed_edges_still_needed():
    """An allowed edge whose module exists but no longer imports the target must leave ALLOWED_EDGES."""
    graph = build_graph()
    stale = [e for e in ALLOWED_EDGES if e[0] in graph and e[1] not in graph[e[0]]]
    assert not stale, f'remove from ALLOWED_EDGES: {stale}'


def test_packages_import_only_lower_layers():
    unknown, bad = layering_violations(build_graph())
    assert not unknown, (f'package(s) {unknown} have no layer: add them to LAYERS in '
                         'tests/test_import_graph.py and to docs/ARCHITECTURE.md')
    assert not bad, '\n'.join(bad)


@pytest.mark.parametrize('edge, ok', [(('dalpsr.data.x', 'dalpsr.utils.misc'), True),
                                      (('dalpsr.utils.misc', 'dalpsr.data.x'), False),
                                      (('dalpsr.data.x', 'dalpsr.archs.y'), False),
                                      (('dalpsr.models.m', 'dalpsr.test'), False)])
def test_layering_rule_itself(edge, ok):
    _, bad = layering_violations({edge[0]: {edge[1]: 1}})
    assert (not bad) == ok
