"""dalpsr/utils/experiment.py: the one folder rule of train.py and test.py, and its helpers."""
import os
import pathlib

import pytest

from dalpsr.utils.experiment import (FolderConflict, act_on_folder, changed_keys, library_versions, merge_defaults,
                                     plan_folder, prepare_folder, read_record, write_record)
from dalpsr.utils.options import OptionError


def test_changed_keys_are_dotted_sorted_and_count_one_sided_keys():
    old = {'model': {'hidden': 4, 'drop': 0.0}, 'seed': 1, 'datasets': {'train': {'length': 8}}}
    new = {'model': {'hidden': 8, 'drop': 0.0, 'extra': 1}, 'seed': 1, 'datasets': {'train': {'length': 8}}}
    assert changed_keys(old, new) == ['model.extra', 'model.hidden']
    assert changed_keys(old, old) == []
    assert changed_keys(1, 2) == ['<root>']
    assert changed_keys({'a': {'b': 1}}, {'a': 3}) == ['a']


def test_merge_defaults_checks_keys_and_does_not_share_objects():
    defaults = {'steps': 4, 'tile': {'size': 64}}
    out = merge_defaults(defaults, {'steps': 2}, 'sampler block of x.yml')
    assert out == {'steps': 2, 'tile': {'size': 64}}
    out['tile']['size'] = 1
    assert defaults['tile']['size'] == 64
    assert merge_defaults(defaults, None, 'w') == defaults
    with pytest.raises(OptionError, match=r"sampler block of x.yml: unknown key 'step' \(did you mean 'steps'"):
        merge_defaults(defaults, {'step': 2}, 'sampler block of x.yml')
    with pytest.raises(OptionError, match='w must be a mapping, got list'):
        merge_defaults(defaults, [1], 'w')


def test_library_versions_reads_installed_metadata():
    import torch
    v = library_versions(('torch', 'no-such-package-dalpsr'))
    assert torch.__version__.startswith(v['torch']) and v['no-such-package-dalpsr'] == 'missing'


def test_plan_folder_table(tmp_path):
    out = tmp_path / 'run'
    fp = {'sampler': {'steps': 4}, 'seed': 0}
    assert plan_folder(out, fp, None) == 'fresh'                      # missing
    out.mkdir()
    assert plan_folder(out, fp, None) == 'fresh'                      # empty
    (out / 'a.png').write_bytes(b'x')
    assert plan_folder(out, fp, fp) == 'resume'                       # same options
    assert plan_folder(out, fp, {'sampler': {'steps': 2}, 'seed': 0}, force=True) == 'archive'
    with pytest.raises(FolderConflict, match=r'different options \(sampler.steps, seed\)\. Use --force') as err:
        plan_folder(out, fp, {'sampler': {'steps': 2}, 'seed': 1})
    assert err.value.changed == ['sampler.steps', 'seed']
    assert isinstance(err.value, FileExistsError) and isinstance(err.value, OptionError)
    assert '\n' not in str(err.value) and str(out) in str(err.value)
    with pytest.raises(FolderConflict, match='holds no run.json'):
        plan_folder(out, fp, None)
    # keys that do not change the contents may differ
    assert plan_folder(out, {'d': {'num_workers': 2}}, {'d': {'num_workers': 0}}, ignore_leaves=['num_workers']) \
        == 'resume'
    with pytest.raises(FolderConflict, match='was trained with other options.*or --resume X'):
        plan_folder(out, {'a': 1}, {'a': 2}, verb='trained', advice='or --resume X')
    (tmp_path / 'file').write_text('x')
    with pytest.raises(FolderConflict, match='is not a folder'):
        plan_folder(tmp_path / 'file', fp, None)
    assert sorted(os.listdir(out)) == ['a.png']                       # planning touched nothing


def test_archive_keeps_everything_and_prepare_folder_resumes_or_refuses(tmp_path):
    out = tmp_path / 'res'
    fp = {'steps': 4}
    assert prepare_folder(out, fp, extra={'created': 'now'}) == 'fresh'
    assert read_record(out / 'run.json') == {'fingerprint': fp, 'created': 'now'}
    (out / 'img.png').write_bytes(b'1')
    assert prepare_folder(out, fp) == 'resume' and (out / 'img.png').is_file()
    assert read_record(out / 'run.json')['created'] == 'now'           # a resume does not rewrite it
    with pytest.raises(FolderConflict, match=r'\(steps\)'):
        prepare_folder(out, {'steps': 2})
    assert (out / 'img.png').read_bytes() == b'1'
    assert prepare_folder(out, {'steps': 2}, force=True) == 'archive'
    archived = [p for p in tmp_path.iterdir() if p.name.startswith('res_archived_')]
    assert len(archived) == 1 and (archived[0] / 'img.png').read_bytes() == b'1'
    assert read_record(out / 'run.json')['fingerprint'] == {'steps': 2} and not (out / 'img.png').exists()
    # a second archive in the same second gets its own name
    (out / 'x').write_text('2')
    second = act_on_folder(out, 'archive')
    assert second.name.startswith('res_archived_') and second != archived[0] and (second / 'x').read_text() == '2'
    with pytest.raises(ValueError, match='unknown folder action'):
        act_on_folder(out, 'delete')


def test_records_are_written_atomically(tmp_path, monkeypatch):
    f = tmp_path / 'run.json'
    write_record(f, {'a': 1})

    real = pathlib.Path.write_text

    def half_then_fail(self, text, *args, **kwargs):  # the disk fills up in the middle of the write
        real(self, text[:3], *args, **kwargs)
        raise RuntimeError('disk full')

    monkeypatch.setattr(pathlib.Path, 'write_text', half_then_fail)
    with pytest.raises(RuntimeError):
        write_record(f, {'a': 2})
    monkeypatch.undo()
    assert read_record(f) == {'a': 1} and os.listdir(tmp_path) == ['run.json']
    f.write_text('{half')
    assert read_record(f) is None and read_record(tmp_path / 'none.json') is None
