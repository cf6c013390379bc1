"""SSP-IR's caption preset of scripts/caption.py: LLaVA alone with SSP-IR's instruction, 512 new
tokens; flags override the preset; the instruction is what LLaVA is asked (tiny LLaVA run)."""
import json

import pytest

from dalpsr.utils.caption_presets import SSPIR_INSTRUCTION
from tests.script_loader import load_script


@pytest.fixture(scope='module')
def caption_script():
    return load_script('caption')


def test_preset_sets_defaults_and_flags_override(caption_script, capsys):
    a = caption_script.parse_args(['--preset', 'sspir', '--input', 'x', '--out', 'y.jsonl'])
    assert a.captioner == 'llava' and a.instruction_no_tags == a.instruction == SSPIR_INSTRUCTION
    assert a.max_new_tokens == 512
    b = caption_script.parse_args(['--preset', 'sspir', '--input', 'x', '--out', 'y.jsonl', '--max-new-tokens', '7'])
    assert b.max_new_tokens == 7 and b.captioner == 'llava'
    plain = caption_script.parse_args(['--input', 'x', '--out', 'y.jsonl'])
    assert plain.captioner == 'ram+llava' and plain.instruction != SSPIR_INSTRUCTION
    with pytest.raises(SystemExit):
        caption_script.parse_args(['--preset', 'nope', '--input', 'x', '--out', 'y.jsonl'])
    assert "unknown caption preset 'nope'" in capsys.readouterr().err


def test_preset_run_asks_llava_the_sspir_instruction(caption_script, tmp_path, sample_paths):
    import shutil

    from dalpsr.captioning.tiny import make_tiny_llava
    llava = make_tiny_llava(str(tmp_path / 'llava'))
    d = tmp_path / 'hr'
    d.mkdir()
    shutil.copyfile(sample_paths['train'][0], d / sample_paths['train'][0].name)
    out = tmp_path / 'caps.jsonl'
    assert caption_script.main(['--preset', 'sspir', '--input', str(d), '--out', str(out), '--llava', llava,
                                '--max-new-tokens', '4', '--device', 'cpu']) == 0
    recs = [json.loads(ln) for ln in out.read_text().splitlines() if ln.strip()]
    assert len(recs) == 1 and recs[0]['error'] is None
    assert recs[0]['instruction'] == SSPIR_INSTRUCTION and recs[0]['tags'] == []
    assert recs[0]['models']['captioner'] == 'llava'
