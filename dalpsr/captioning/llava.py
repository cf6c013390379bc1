"""LLaVA descriptions through transformers (``llava-hf/llava-1.5-7b-hf`` or a local folder).

The semantic prompt p_s of DaLPSR (paper III-C): LLaVA answers the instruction (which carries
the RAM tags) about the LR image. Greedy decoding by default (reproducible); batched with left
padding; bf16 (or fp16) on a GPU, fp32 on the CPU. ``vision_tower`` swaps in an encoder
fine-tuned by the ``CaptionAlignModel`` (a ``CLIPVisionModel`` folder written by its export).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from dalpsr.captioning.taggers import Images, resolve_dtype

DEFAULT_LLAVA = 'llava-hf/llava-1.5-7b-hf'


def _to_pil(images: Images):
    from PIL import Image
    if isinstance(images, torch.Tensor):
        images = [im.permute(1, 2, 0).float().cpu().numpy() for im in images]
    return [Image.fromarray((np.clip(np.asarray(im, dtype=np.float32), 0, 1) * 255 + 0.5).astype(np.uint8))
            for im in images]


def load_llava(model: str = DEFAULT_LLAVA, device='cpu', dtype: str = 'auto', vision_tower: Optional[str] = None,
               revision: Optional[str] = None):
    """(model.eval(), processor) from a hub id (cache only when offline) or a local folder.

    ``vision_tower``: folder of a tuned ``CLIPVisionModel`` replacing the model's tower.
    Missing files give a one-line error naming what to download and where.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    dev = torch.device(device)
    dt = resolve_dtype(dtype, dev)
    local = Path(model).is_dir()
    if not local and (Path(model).exists() or model.startswith(('.', '/'))):
        raise FileNotFoundError(f'LLaVA folder not found: {model}')
    try:
        proc = AutoProcessor.from_pretrained(model, revision=revision)
        llava = LlavaForConditionalGeneration.from_pretrained(model, revision=revision, dtype=dt)
    except OSError as err:
        raise FileNotFoundError(
            f'LLaVA weights not available for {model!r} ({str(err).splitlines()[0][:160]}); download '
            f'{DEFAULT_LLAVA} (huggingface-cli download {DEFAULT_LLAVA} --local-dir pretrained_models/llava-1.5-7b-hf) '
            'and pass that folder') from None
    if vision_tower:
        replace_vision_tower(llava, vision_tower)
    proc.tokenizer.padding_side = 'left'  # decoder-only batch generation
    return llava.to(dev).eval(), proc


def replace_vision_tower(llava, path: str) -> None:
    """Load a ``CLIPVisionModel`` folder into ``llava``'s vision tower (shapes must match)."""
    from transformers import CLIPVisionModel
    p = Path(path)
    if not (p / 'config.json').is_file() and (p / 'vision_tower' / 'config.json').is_file():
        p = p / 'vision_tower'  # a CaptionAlignModel export folder
    if not (p / 'config.json').is_file():
        raise FileNotFoundError(f'tuned vision tower not found: {p}/config.json (train one with '
                                'options/train/train_caption_align.yml; its export writes <exp>/export/vision_tower)')
    old = llava.model.vision_tower
    tower = CLIPVisionModel.from_pretrained(p, dtype=next(old.parameters()).dtype)
    a, b = old.config, tower.config
    if (a.hidden_size, a.image_size, a.patch_size, a.num_hidden_layers) != \
            (b.hidden_size, b.image_size, b.patch_size, b.num_hidden_layers):
        raise ValueError(f'vision tower {p} (hidden {b.hidden_size}, image {b.image_size}, patch {b.patch_size}, '
                         f'{b.num_hidden_layers} layers) does not fit this LLaVA (hidden {a.hidden_size}, image '
                         f'{a.image_size}, patch {a.patch_size}, {a.num_hidden_layers} layers)')
    llava.model.vision_tower = tower.to(next(old.parameters()).device)


class LlavaCaptioner:
    """Describe images: ``captioner(images, instructions) -> List[str]``.

    Args:
        model: hub id or local folder (default ``llava-hf/llava-1.5-7b-hf``).
        max_new_tokens: length cap of a description.
        num_beams / do_sample / temperature: decoding (greedy by default).
        batch_size: images per ``generate`` call.
        vision_tower: tuned tower folder (CaptionAlignModel export) or None.
    """

    name = 'llava'

    def __init__(self, model: str = DEFAULT_LLAVA, device='cpu', dtype: str = 'auto', max_new_tokens: int = 200,
                 num_beams: int = 1, do_sample: bool = False, temperature: float = 1.0, batch_size: int = 4,
                 vision_tower: Optional[str] = None, seed: int = 0):
        self.model, self.processor = load_llava(model, device, dtype, vision_tower)
        self.device = torch.device(device)
        self.gen = dict(max_new_tokens=int(max_new_tokens), num_beams=int(num_beams), do_sample=bool(do_sample))
        if do_sample:
            self.gen['temperature'] = float(temperature)
        self.batch_size = max(1, int(batch_size))
        self.seed = seed
        self.model_id = f'llava:{model}' + (f'+tower:{vision_tower}' if vision_tower else '')

    def prompts(self, instructions: Sequence[str]) -> List[str]:
        """Chat-formatted prompts (the model's own chat template) with one image each."""
        return [self.processor.apply_chat_template(
            [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': ins}]}],
            add_generation_prompt=True) for ins in instructions]

    @torch.no_grad()
    def __call__(self, images: Images, instructions: Sequence[str]) -> List[str]:
        pil = _to_pil(images)
        if len(pil) != len(instructions):
            raise ValueError(f'{len(pil)} images but {len(instructions)} instructions')
        out: List[str] = []
        for i in range(0, len(pil), self.batch_size):
            texts = self.prompts(instructions[i:i + self.batch_size])
            inputs = self.processor(images=pil[i:i + self.batch_size], text=texts, return_tensors='pt', padding=True)
            inputs = {k: (v.to(self.device, self.model.dtype) if k == 'pixel_values' else v.to(self.device))
                      for k, v in inputs.items()}
            if self.gen['do_sample']:
                torch.manual_seed(self.seed)
            ids = self.model.generate(**inputs, **self.gen, pad_token_id=self.processor.tokenizer.pad_token_id)
            new = ids[:, inputs['input_ids'].shape[1]:]
            out += [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]
        return out
