#!/usr/bin/env python
"""Captioning cost: RAM tagging and LLaVA descriptions, seconds per image and peak memory.

Random weights with the published architectures (no download): RAM = Swin-L 384 + Query2Label
head over 4585 tags (``RAMTagger()`` defaults); LLaVA = the llava-1.5-7b-hf configuration (CLIP
ViT-L/336 tower, 2-layer projector, Llama-2-7B). Generation is forced to exactly
``--new-tokens`` tokens (min = max) so runs are comparable. On CPU the defaults shrink
(``--llava tiny``, RAM at batch 1): the figures then test the code path, not the model.

    python benchmarks/bench_captioning.py                       # CPU, reduced
    python benchmarks/bench_captioning.py --device cuda --llava 7b --ram-batch 1,8 --llava-batch 1,4,8
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dalpsr.utils.misc import resolve_device  # noqa: E402


def peak_mb(device) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process RSS high-water mark


def reset_peak(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, device, repeats):
    fn()  # warm-up
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t) / repeats


def bench_ram(args, device, dtype):
    from dalpsr.archs.ram_arch import RAMTagger, ram_preprocess, tiny_ram_config
    cfg = tiny_ram_config() if args.ram == 'tiny' else {}
    with torch.device(device):
        model = RAMTagger(**cfg).to(dtype).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f'RAM tagger ({args.ram}): {n / 1e6:.1f} M parameters, input {model.image_size}px, '
          f'{model.num_classes} tags, dtype {dtype}')
    for b in args.ram_batch:
        imgs = torch.rand(b, 3, 128, 128, device=device)
        reset_peak(device)

        @torch.no_grad()
        def run():
            return torch.sigmoid(model(ram_preprocess(imgs, model.image_size).to(dtype)))
        s = timed(run, device, args.repeats)
        print(f'  batch {b:3d}: {s / b * 1000:8.1f} ms/image  ({b / s:7.2f} images/s), peak {peak_mb(device):8.0f} MiB')
    del model


def build_llava(kind, device, dtype, tmp):
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)
    from dalpsr.captioning.tiny import LLAVA15_CHAT_TEMPLATE, make_tiny_llava, make_tiny_tokenizer
    if kind == 'tiny':
        path = make_tiny_llava(os.path.join(tmp, 'tiny-llava'))
        from dalpsr.captioning.llava import load_llava
        return load_llava(path, device=device, dtype={torch.float32: 'fp32', torch.float16: 'fp16',
                                                      torch.bfloat16: 'bf16'}[dtype])
    if kind != '7b':
        from dalpsr.captioning.llava import load_llava
        return load_llava(kind, device=device, dtype='auto')
    tok = make_tiny_tokenizer()  # ids < 300: a stand-in vocabulary; the model keeps the 32064-entry embedding
    vc = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          image_size=336, patch_size=14, projection_dim=768, hidden_act='quick_gelu')
    tc = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=tok.convert_tokens_to_ids('<image>'),
                      projector_hidden_act='gelu', vision_feature_layer=-2, vision_feature_select_strategy='default')
    cfg._attn_implementation = 'sdpa'
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(cfg, dtype=dtype).eval()
    ip = CLIPImageProcessor(size={'shortest_edge': 336}, crop_size={'height': 336, 'width': 336})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy='default',
                          num_additional_image_tokens=1, chat_template=LLAVA15_CHAT_TEMPLATE)
    proc.tokenizer.model_max_length = 4096
    return model, proc


def bench_llava(args, device, dtype):
    import tempfile

    import numpy as np
    from dalpsr.captioning import DEFAULT_INSTRUCTION, format_instruction
    from dalpsr.captioning.llava import LlavaCaptioner
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        model, proc = build_llava(args.llava, device, dtype, tmp)
        print(f'LLaVA ({args.llava}): {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, '
              f'dtype {next(model.parameters()).dtype}, built in {time.perf_counter() - t:.1f} s')
        proc.tokenizer.padding_side = 'left'
        cap = LlavaCaptioner.__new__(LlavaCaptioner)
        cap.model, cap.processor, cap.device, cap.seed = model, proc, device, 0
        cap.gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, num_beams=1, do_sample=False)
        rng = np.random.default_rng(0)
        tags = ['cat', 'sofa', 'window', 'plant', 'lamp', 'book', 'cushion', 'rug']
        for b in args.llava_batch:
            imgs = [rng.random((128, 128, 3)).astype(np.float32) for _ in range(b)]
            ins = [format_instruction(DEFAULT_INSTRUCTION, tags)] * b
            cap.batch_size = b
            reset_peak(device)
            s = timed(lambda: cap(imgs, ins), device, args.repeats)
            print(f'  batch {b:3d}: {s / b:8.3f} s/image ({args.new_tokens} new tokens; '
                  f'{b * args.new_tokens / s:8.1f} tokens/s), peak {peak_mb(device):8.0f} MiB')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='auto')
    p.add_argument('--dtype', default='auto', choices=('auto', 'fp32', 'fp16', 'bf16'))
    p.add_argument('--ram', default='full', choices=('full', 'tiny', 'skip'))
    p.add_argument('--ram-batch', default=None, help='comma-separated batch sizes (default: 1 on CPU, 1,8,32 on GPU)')
    p.add_argument('--llava', default=None, help='tiny | 7b | skip | a local LLaVA folder (default: tiny on CPU, 7b on GPU)')
    p.add_argument('--llava-batch', default=None, help='comma-separated (default: 1,2 on CPU, 1,4,8 on GPU)')
    p.add_argument('--new-tokens', type=int, default=None, help='tokens generated per image (default 8 CPU, 128 GPU)')
    p.add_argument('--repeats', type=int, default=None)
    p.add_argument('--threads', type=int, default=1, help='CPU threads')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from dalpsr.captioning.taggers import resolve_dtype
    try:
        device = torch.device(resolve_device(args.device))
    except ValueError as err:
        p.error(str(err))
    gpu = device.type == 'cuda'
    dtype = resolve_dtype(args.dtype, device)
    args.ram_batch = [int(x) for x in (args.ram_batch or ('1,8,32' if gpu else '1')).split(',')]
    args.llava_batch = [int(x) for x in (args.llava_batch or ('1,4,8' if gpu else '1,2')).split(',')]
    args.llava = args.llava or ('7b' if gpu else 'tiny')
    args.new_tokens = args.new_tokens or (128 if gpu else 8)
    args.repeats = args.repeats or (3 if gpu else 1)
    name = torch.cuda.get_device_name(device) if gpu else f'CPU ({args.threads} thread(s))'
    print(f'device: {name}; torch {torch.__version__}')
    if args.ram != 'skip':
        bench_ram(args, device, dtype)
        if gpu:
            torch.cuda.empty_cache()
    if args.llava != 'skip':
        bench_llava(args, device, dtype)


if __name__ == '__main__':
    main()
