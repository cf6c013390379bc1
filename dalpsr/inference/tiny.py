"""Tiny random stand-ins of every model test.py loads (tests, CPU demo). NOT real models.

``build_tiny_dalpsr(root)`` writes, in the same layouts as the real weights::

    root/sd/      tiny Stable Diffusion (diffusers layout; dalpsr.archs.sd_components.build_tiny_sd)
    root/dalpsr/  DaLPSR export: controlnet/ (latent-mode DaLPSRControlNet from the tiny UNet) + dalpsr.json
    root/irpad/   IRPAD export: irpad.json + irpad.safetensors (small conv encoder, default prompt spec)
    root/README.md

Outputs of these models are noise: they exercise the code paths (loading, prompts, tiling,
resume, metrics), never quality. Deterministic given ``seed``.

Layouts (``layout``):

* ``fast`` (default): the tiny SD of ``dalpsr.archs.sd_components`` with its UNet's attention
  blocks moved to the half-resolution level and no attention in the VAE's mid block. Small in
  tokens too, so a large image takes seconds: with SD's own layout (``sd``) the stand-in spent
  71 % of a 448x640 -> 1792x2560 run in ``scaled_dot_product_attention`` (self-attention over the
  9216 positions of every 96x96 latent tile in UNet and ControlNet, and over the 50176 positions of
  every 224x224 VAE decoder tile), measured with cProfile in the commit that added this layout;
  ``benchmarks/bench_tiny_standin.py`` prints both.
* ``sd``: ``build_tiny_sd``'s layout as is (attention at full latent resolution, like SD 2.1),
  the stand-in of earlier versions (tests/test_unchanged_inference.py uses it).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict

#: Label written into folder names, logs and README of anything produced with the stand-ins.
TINY_LABEL = 'TINY RANDOM STAND-IN - not a real model'

#: IRPAD size of the stand-in (a 3-layer conv encoder, 32-dim decoder).
TINY_IRPAD = dict(image_encoder={'type': 'conv', 'channels': [8, 16, 16]}, embed_dim=32, num_heads=2,
                  ffn_ratio=2.0, num_blocks=1)
LAYOUTS = ('fast', 'sd')


def _build_sd(path: str, seed: int, layout: str) -> None:
    """The tiny SD folder (written next to ``path`` first, then moved into place)."""
    import shutil

    import torch

    from dalpsr.archs.sd_components import TINY_UNET, TINY_VAE, build_tiny_sd
    out = Path(path)
    tmp = out.with_name(f'.{out.name}.layout{os.getpid()}')
    if tmp.exists():
        shutil.rmtree(tmp)
    build_tiny_sd(str(tmp), seed=seed)
    if layout == 'fast':
        from diffusers import AutoencoderKL, UNet2DConditionModel
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(**dict(TINY_UNET, down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
                                               up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D')))
            torch.manual_seed(seed + 1)
            vae = AutoencoderKL(**dict(TINY_VAE, mid_block_add_attention=False))
        finally:
            torch.random.set_rng_state(state)
        for name, net in (('unet', unet), ('vae', vae)):
            shutil.rmtree(tmp / name)
            net.save_pretrained(tmp / name)
    (tmp / 'layout.txt').write_text(layout + '\n')
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def build_tiny_dalpsr(root, seed: int = 0, overwrite: bool = False, layout: str = 'fast') -> Dict[str, str]:
    """Write the tiny SD + DaLPSR export + IRPAD export under ``root`` (see module doc).

    Parts already present (a complete folder) are kept unless ``overwrite`` (an SD folder of
    another ``layout`` is rebuilt, and the DaLPSR export with it). Returns
    ``{'sd': ..., 'dalpsr': ..., 'irpad': ...}`` (absolute folder paths).
    """
    import torch

    from dalpsr.archs.controlnet_arch import export_dalpsr, get_controlnet_class
    from dalpsr.data.prompt_labels import PromptSpec

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    paths = {'sd': str(root / 'sd'), 'dalpsr': str(root / 'dalpsr'), 'irpad': str(root / 'irpad')}
    layout_file = root / 'sd' / 'layout.txt'
    old_layout = layout_file.read_text().strip() if layout_file.is_file() else 'sd'
    rebuilt = overwrite or not (root / 'sd' / 'model_index.json').is_file() or old_layout != layout
    if rebuilt:
        _build_sd(paths['sd'], seed, layout)
    if rebuilt or not (root / 'dalpsr' / 'dalpsr.json').is_file():
        from diffusers import UNet2DConditionModel
        unet = UNet2DConditionModel.from_pretrained(paths['sd'], subfolder='unet')
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed + 10)
            cn = get_controlnet_class().from_unet(unet, condition_mode='latent',
                                                  conditioning_embedding_out_channels=(16,))
            # from_unet zero-initialises the output convs; perturb them so the ControlNet acts
            with torch.no_grad():
                for name, p in cn.named_parameters():
                    if 'zero_conv' in name or 'controlnet_down_blocks' in name or 'controlnet_mid_block' in name:
                        p.add_(torch.randn_like(p) * 0.02)
        finally:
            torch.random.set_rng_state(state)
        meta = {'sd': {'pretrained': paths['sd']}, 'scale': 4,
                'prompt': {'order': ['restoration', 'caption', 'added'], 'separator': '. ', 'use_caption': True,
                           'use_restoration': True, 'added_prompt': '', 'caption_dropout': 0.0,
                           'restoration_dropout': 0.0, 'empty_dropout': 0.1},
                'text': {'max_chunks': 3}, 'prediction_type': 'epsilon', 'restoration_prompt_source': 'labels',
                'restoration_prompt_spec': PromptSpec().to_opt(),
                'trainable': ['controlnet'], 'trained_parts': {}, 'note': TINY_LABEL}
        export_dalpsr(paths['dalpsr'], cn, meta)
    if overwrite or not (root / 'irpad' / 'irpad.json').is_file():
        from dalpsr.archs.irpad_arch import IRPAD
        from dalpsr.models.irpad_model import save_irpad
        spec = PromptSpec()
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed + 20)
            net = IRPAD(len(spec.types), spec.num_intervals, spec.candidates(), **TINY_IRPAD)
        finally:
            torch.random.set_rng_state(state)
        save_irpad(net, {'types': list(spec.types), 'num_intervals': spec.num_intervals}, paths['irpad'],
                   extra={'note': TINY_LABEL, 'train_crop': 0})  # predicts on whole LRs
    readme = root / 'README.md'
    if not readme.is_file():
        readme.write_text(f'{TINY_LABEL}.\nWritten by dalpsr.inference.tiny.build_tiny_dalpsr(seed={seed}): '
                          'random weights in the layouts of the real models; outputs are noise.\n'
                          + json.dumps(paths, indent=2) + '\n')
    return paths


__all__ = ['build_tiny_dalpsr', 'TINY_LABEL', 'TINY_IRPAD', 'LAYOUTS']

if __name__ == '__main__':  # pragma: no cover
    import sys
    print(build_tiny_dalpsr(sys.argv[1] if len(sys.argv) > 1 else os.path.join('pretrained_models', 'tiny')))
