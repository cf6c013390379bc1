"""Tiny, randomly initialised LLaVA (transformers format) for tests and CPU demos.

``make_tiny_llava(out_dir)`` writes a folder that ``LlavaForConditionalGeneration.from_pretrained``
and ``AutoProcessor.from_pretrained`` read exactly like ``llava-hf/llava-1.5-7b-hf``: a 32 px
CLIP vision tower (patch 8 -> 16 patches + CLS), a 2-layer 32-dim Llama, a byte-level BPE
tokenizer trained in-process on a few sentences (with an ``<image>`` token) and the LLaVA-1.5
chat template. Its descriptions are random words: it exercises the code paths, not quality.
"""
from __future__ import annotations

from pathlib import Path

#: LLaVA-1.5 conversation format ("USER: <image>\n... ASSISTANT:"), as a chat template.
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{% if message['role'] != 'user' %}</s>{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")

_CORPUS = [
    'Describe this image and its style in a very detailed manner around the following tags:',
    'a photo of a cat, a dog, a house, a tree, a river, a mountain, a person, a car, a flower.',
    'The image shows a detailed scene with bright colors, soft light and sharp textures.',
    'USER: ASSISTANT: the style is realistic, natural, vivid, warm, cold, dark, blurry.',
]


def make_tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with <s>, </s>, <unk>, <pad>, <image>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE(unk_token='<unk>'))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ['<unk>', '<s>', '</s>', '<pad>', '<image>']
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token='<s>', eos_token='</s>', unk_token='<unk>',
                                  pad_token='<pad>', extra_special_tokens={'image_token': '<image>'},
                                  model_max_length=512)
    tok.padding_side = 'left'
    return tok


def make_tiny_llava(out_dir: str, seed: int = 0, image_size: int = 32) -> str:
    """Write a tiny LLaVA-1.5-format model + processor to ``out_dir``; return the path."""
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tiny_tokenizer()
    image_id = tok.convert_tokens_to_ids('<image>')
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=image_size, patch_size=8, projection_dim=32)
    tc = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=image_id,
                      vision_feature_layer=-2, vision_feature_select_strategy='default')
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    ip = CLIPImageProcessor(size={'shortest_edge': image_size}, crop_size={'height': image_size, 'width': image_size},
                            do_center_crop=True, do_resize=True, do_normalize=True)
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy='default',
                          num_additional_image_tokens=1, chat_template=LLAVA15_CHAT_TEMPLATE)
    proc.save_pretrained(out)
    return str(out)
