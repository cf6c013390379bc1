"""An offline CLIP BPE tokenizer built from the vocabulary that ships inside open_clip.

transformers ships no CLIP vocabulary and the hub is unreachable in tests, but open_clip
installs ``open_clip/bpe_simple_vocab_16e6.txt.gz`` (the OpenAI CLIP BPE merges). From it we
build a full 49,408-token ``transformers.CLIPTokenizer`` whose ids match open_clip's (padding
differs: HF pads with ``<|endoftext|>``, open_clip with 0). Used for tiny test models and
saved with them, so ``CLIPTokenizer.from_pretrained(dir)`` round-trips like a real checkpoint.
"""
from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path


def _bpe_file() -> Path:
    import open_clip
    path = Path(open_clip.__file__).parent / 'bpe_simple_vocab_16e6.txt.gz'
    if not path.is_file():
        raise FileNotFoundError(f'open_clip BPE vocabulary not found: {path} (reinstall open_clip_torch)')
    return path


def _bytes_to_unicode() -> dict:
    """GPT-2/CLIP byte -> printable unicode map (a public, fixed table)."""
    bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@lru_cache(maxsize=1)
def _vocab_and_merges():
    lines = gzip.open(_bpe_file()).read().decode('utf-8').split('\n')
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + '</w>' for v in vocab]
    vocab += [''.join(m) for m in merges]
    vocab += ['<|startoftext|>', '<|endoftext|>']
    return {tok: i for i, tok in enumerate(vocab)}, merges


def offline_clip_tokenizer(model_max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` (49,408 tokens) built offline; ids match open_clip's."""
    from transformers import CLIPTokenizer
    vocab, merges = _vocab_and_merges()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)
    return tok
