"""scripts/plot_irpad_curve.py: points sorted by photos, numbers taken from each metrics.json."""
import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location('plot_irpad_curve', REPO / 'scripts' / 'plot_irpad_curve.py')
curve = importlib.util.module_from_spec(spec)
spec.loader.exec_module(curve)


def _eval_dir(root, name, acc):
    d = root / name
    d.mkdir()
    m = {}
    for t, a in acc.items():
        m.update({f'acc/{t}': a, f'bacc/{t}': a - 0.01, f'within1/{t}': min(1.0, a + 0.3)})
    m['acc/mean'] = sum(acc.values()) / len(acc)
    (d / 'metrics.json').write_text(json.dumps({'metrics': m}))
    return d


def test_curve_points_sorted_and_written(tmp_path, capsys):
    a = _eval_dir(tmp_path, 'n300', {'blur': 0.6, 'noise': 0.7, 'jpeg': 0.8})
    b = _eval_dir(tmp_path, 'n12', {'blur': 0.4, 'noise': 0.5, 'jpeg': 0.6})
    out = tmp_path / 'fig' / 'curve.png'
    assert curve.main(['--point', f'300={a}', '--point', f'12={b}', '--out', str(out)]) == 0
    table = json.loads(out.with_suffix('.json').read_text())
    assert table['photos'] == [12, 300]
    assert table['acc/blur'] == [0.4, 0.6] and table['acc/jpeg'] == [0.6, 0.8]
    assert table['bacc/noise'] == [0.49, 0.69]
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert 'blur   12: 0.400  300: 0.600' in capsys.readouterr().out


def test_bad_points_get_one_line(tmp_path, capsys):
    assert curve.main(['--point', 'twelve=x', '--out', str(tmp_path / 'c.png')]) == 2
    assert 'must be N=DIR' in capsys.readouterr().err
    assert curve.main(['--point', f'12={tmp_path / "none"}', '--out', str(tmp_path / 'c.png')]) == 2
    assert 'metrics.json not found' in capsys.readouterr().err
    assert not (tmp_path / 'c.png').exists()
