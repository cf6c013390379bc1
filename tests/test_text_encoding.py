"""Long-prompt encoding for SD's CLIP text encoder (tiny random encoder, offline CLIP tokenizer)."""
import pytest
import torch

from dalpsr.archs.text_encoding import chunk_token_ids, count_chunks, encode_prompts


@pytest.fixture(scope='module')
def tok():
    from dalpsr.utils.clip_tokenizer import offline_clip_tokenizer
    return offline_clip_tokenizer()


@pytest.fixture(scope='module')
def encoder():
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=32)
    return CLIPTextModel(cfg).eval()


SHORT = 'a photo of a cat sitting on a wooden table'
LONG = ' '.join(['a small red house near the river'] * 25) + ' at dusk'  # 177 tokens: 3 chunks


def _pipeline_embedding(tok, enc, prompt):
    ids = tok([prompt], padding='max_length', max_length=77, truncation=True, return_tensors='pt').input_ids
    with torch.no_grad():
        return enc(ids)[0][0]


def test_short_prompt_equals_diffusers_style_encoding(tok, encoder):
    e = encode_prompts(tok, encoder, [SHORT])
    assert e.shape == (1, 77, 32)
    torch.testing.assert_close(e[0], _pipeline_embedding(tok, encoder, SHORT))


def test_long_prompt_is_chunked_with_bos_eos_and_each_chunk_encoded_separately(tok, encoder):
    n_tokens = len(tok(LONG, add_special_tokens=False).input_ids)
    assert 150 < n_tokens <= 225  # needs 3 chunks of 75
    ids, mask, n = chunk_token_ids(tok, [LONG, SHORT], max_chunks=4)
    assert n == 3 and ids.shape == (2, 3, 77)
    assert (ids[:, :, 0] == tok.bos_token_id).all()
    flat = ids[0, :, 1:76].reshape(-1)[:n_tokens].tolist()
    assert flat == tok(LONG, add_special_tokens=False).input_ids  # nothing lost, order kept
    assert ids[0, 0, 76] == tok.eos_token_id  # a full chunk ends with EOS
    assert ids[1, 1].tolist()[:2] == [tok.bos_token_id, tok.eos_token_id]  # padding chunk = empty prompt
    assert int(mask[1, 0].sum()) == len(tok(SHORT).input_ids)

    e = encode_prompts(tok, encoder, [LONG, SHORT], max_chunks=4)
    assert e.shape == (2, 3 * 77, 32)
    # the short prompt's first chunk is its ordinary embedding; its padding chunks equal the empty prompt's
    torch.testing.assert_close(e[1, :77], _pipeline_embedding(tok, encoder, SHORT))
    torch.testing.assert_close(e[1, 77:154], _pipeline_embedding(tok, encoder, ''))
    # the long prompt's second chunk depends on the words there and not on the first chunk's
    words = LONG.split()
    changed_tail = ' '.join(words[:-1] + ['zebra'])
    e2 = encode_prompts(tok, encoder, [changed_tail, SHORT], max_chunks=4)
    torch.testing.assert_close(e2[0, :77], e[0, :77])
    assert not torch.allclose(e2[0, 154:], e[0, 154:])


def test_max_chunks_truncates_with_warning_and_min_chunks_pads(tok, encoder):
    with pytest.warns(UserWarning, match='dropped'):
        e = encode_prompts(tok, encoder, [LONG], max_chunks=2)
    assert e.shape == (1, 154, 32)
    neg = encode_prompts(tok, encoder, ['blurry'], min_chunks=3)
    assert neg.shape == (1, 231, 32)
    assert count_chunks(tok, [SHORT, LONG], max_chunks=5) == [1, 3]


def test_tokenizer_without_max_length_is_refused(tok, encoder):
    import copy
    t = copy.deepcopy(tok)
    t.model_max_length = int(1e30)
    with pytest.raises(ValueError, match='model_max_length'):
        encode_prompts(t, encoder, [SHORT])
