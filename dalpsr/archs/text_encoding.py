"""Encode prompts longer than CLIP's 77 tokens for Stable Diffusion's text encoder.

CLIP text encoders have 77 positions (BOS + 75 tokens + EOS). DaLPSR prompts (an LLaVA
description plus a restoration prompt) are often longer. :func:`encode_prompts` splits each
prompt's tokens into chunks of ``model_max_length - 2`` (75), wraps every chunk in BOS/EOS, pads
it to 77 exactly as diffusers pipelines pad a single prompt, encodes all chunks of the batch in
one call and concatenates them along the sequence: ``[B, 77 * n, D]``. The UNet's cross-attention
accepts any sequence length, so the extra chunks simply add context tokens.

A prompt that fits in one chunk gives exactly the embedding a diffusers pipeline computes
(``tokenizer(prompt, padding='max_length', max_length=77, truncation=True)``), so short prompts
are unaffected. Within one call every prompt gets ``n`` chunks (``n`` = chunks the longest prompt
needs, at most ``max_chunks``); the extra chunks of shorter prompts encode the empty string and
take part in cross-attention, so a prompt's embedding depends on the longest prompt it is
encoded with. Callers that must not depend on batch composition group prompts by
:func:`count_chunks` first (``DaLPSRSampler`` does). Tokens beyond ``max_chunks * 75`` are dropped
(a warning says how many).
"""
from __future__ import annotations

import math
import warnings
from typing import List, Sequence

import torch


def chunk_token_ids(tokenizer, prompts: Sequence[str], max_chunks: int = 3, min_chunks: int = 1):
    """Token ids ``LongTensor [B, n, L]`` (``L = tokenizer.model_max_length``) and ``n``.

    Each row is ``[BOS] + <= L-2 tokens + [EOS] + padding`` (pad id: the tokenizer's pad token,
    falling back to EOS) and an attention mask of the same shape (1 up to and including EOS).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError('encode_prompts: empty prompt list')
    if max_chunks < 1 or min_chunks < 1:
        raise ValueError('max_chunks and min_chunks must be >= 1')
    length = int(tokenizer.model_max_length)
    if length > 10_000:
        raise ValueError('tokenizer.model_max_length is unset; build the CLIP tokenizer with model_max_length=77')
    inner = length - 2
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids = tokenizer(list(prompts), add_special_tokens=False, truncation=False, padding=False,
                    verbose=False)['input_ids']
    need = max(max(1, math.ceil(len(t) / inner)) for t in ids)
    n = max(min(need, max_chunks), min(min_chunks, max_chunks))
    dropped = [len(t) - n * inner for t in ids if len(t) > n * inner]
    if dropped:
        warnings.warn(f'encode_prompts: {len(dropped)} prompt(s) longer than {n * inner} tokens '
                      f'(max_chunks={max_chunks}); dropped up to {max(dropped)} tokens at the end')
    out = torch.full((len(ids), n, length), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), n, length), dtype=torch.long)
    for i, toks in enumerate(ids):
        for c in range(n):
            part = toks[c * inner:(c + 1) * inner]
            row = [bos] + list(part) + [eos]
            out[i, c, :len(row)] = torch.tensor(row)
            mask[i, c, :len(row)] = 1
    return out, mask, n


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str], max_chunks: int = 3, device=None,
                   min_chunks: int = 1) -> torch.FloatTensor:
    """Encode ``prompts`` of any length -> ``[B, 77 * n, D]`` (the text encoder's dtype).

    ``n`` = chunks needed by the longest prompt (``min_chunks <= n <= max_chunks``). Pass the same
    ``min_chunks`` (e.g. the positive prompts' ``n``) when encoding a negative prompt so both
    classifier-free-guidance branches have the same length, or encode both lists in one call.
    """
    ids, mask, n = chunk_token_ids(tokenizer, prompts, max_chunks, min_chunks)
    b, _, length = ids.shape
    device = device if device is not None else next(text_encoder.parameters()).device
    use_mask = bool(getattr(getattr(text_encoder, 'config', None), 'use_attention_mask', False))
    kwargs = {'attention_mask': mask.view(b * n, length).to(device)} if use_mask else {}
    hidden = text_encoder(ids.view(b * n, length).to(device), **kwargs)[0]  # [B*n, 77, D]
    return hidden.reshape(b, n * length, hidden.shape[-1])


def encode_prompts_with_grad(tokenizer, text_encoder, prompts: Sequence[str], max_chunks: int = 3, device=None,
                             min_chunks: int = 1) -> torch.FloatTensor:
    """As :func:`encode_prompts` but keeps the autograd graph (for a trainable text encoder)."""
    return encode_prompts.__wrapped__(tokenizer, text_encoder, prompts, max_chunks, device, min_chunks)


def count_chunks(tokenizer, prompts: Sequence[str], max_chunks: int = 3) -> List[int]:
    """Chunks each prompt needs (capped at ``max_chunks``), e.g. to group prompts by length."""
    inner = int(tokenizer.model_max_length) - 2
    ids = tokenizer(list(prompts), add_special_tokens=False, truncation=False, verbose=False)['input_ids']
    return [min(max_chunks, max(1, math.ceil(len(t) / inner))) for t in ids]


__all__ = ['encode_prompts', 'encode_prompts_with_grad', 'chunk_token_ids', 'count_chunks']
