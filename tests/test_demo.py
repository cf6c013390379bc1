"""The README's main job (scripts/demo.py): its data part writes the set it summarises."""
import json

from tests.script_loader import load_script


def _demo():
    return load_script('demo')


def test_demo_data_part_writes_and_summarises_a_resumable_set(tmp_path, capsys):
    out = tmp_path / 'demo'
    assert _demo().main(['--out', str(out), '--num', '3', '--gt-size', '64', '--workers', '1', '--no-sr']) == 0
    recs = [json.loads(line) for line in (out / 'triplets' / 'meta.jsonl').read_text().splitlines() if line.strip()]
    assert len(recs) == 3
    text = capsys.readouterr().out
    assert '3 triplets in' in text
    for t in ('blur', 'noise', 'jpeg'):
        assert f'  {t} ' in text
    for r in recs:  # the summary shows the prompts that were written (4 examples, 3 samples)
        assert f"{r['key']}: {r['prompt']}" in text
    # a rerun resumes: same files, nothing rewritten
    def stamps():  # sample files untouched, index unchanged (bookkeeping like generate.json may be updated)
        out_ = {str(p): p.stat().st_mtime_ns for p in (out / 'triplets').rglob('*.png')}
        out_['meta'] = (out / 'triplets' / 'meta.jsonl').read_bytes()
        return out_
    before = stamps()
    assert len(before) == 7
    assert _demo().main(['--out', str(out), '--num', '3', '--gt-size', '64', '--workers', '1', '--no-sr']) == 0
    assert stamps() == before
