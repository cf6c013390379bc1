"""The offline CLIP tokenizer must agree with open_clip's tokenizer and survive save/load."""
import open_clip
from transformers import CLIPTokenizer

from dalpsr.utils.clip_tokenizer import offline_clip_tokenizer

TEXTS = ['a photo of a cat', 'Deblur with sigma 0.5~0.75, Denoise with sigma 0~0.25, Dejpeg with sigma 0.75~1',
         'naïve café, 8k, high-resolution!!']


def test_ids_match_open_clip_and_roundtrip(tmp_path):
    tok = offline_clip_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    ref = open_clip.get_tokenizer('ViT-B-32')(TEXTS)
    for text, ref_ids in zip(TEXTS, ref.tolist()):
        ids = tok(text).input_ids
        assert ids[0] == 49406 and ids[-1] == 49407
        assert ref_ids[:len(ids)] == ids
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    assert [again(t).input_ids for t in TEXTS] == [tok(t).input_ids for t in TEXTS]
    padded = again(TEXTS[0], padding='max_length', truncation=True).input_ids
    assert len(padded) == 77
