"""Tiny random stand-ins of every model test.py loads (tests, CPU demo). NOT real models.

``build_tiny_dalpsr(root)`` writes, in the same layouts as the real weights::

    root/sd/      tiny Stable Diffusion (diffusers layout; dalpsr.archs.sd_components.build_tiny_sd)
    root/dalpsr/  DaLPSR export: controlnet/ (latent-mode DaLPSRControlNet from the tiny UNet) + dalpsr.json
    root/irpad/   IRPAD export: irpad.json + irpad.safetensors (small conv encoder, default prompt spec)
    root/README.md

Outputs of these models are noise: they exercise the code paths (loading, prompts, tiling,
resume, metrics), never quality. Deterministic given ``seed``.

Layouts (``layout``):

* ``fast`` (default; revision 2): 4 UNet levels of 8/16/32/32 channels with the cross-attention
  blocks at the lowest (1/8 latent) resolution only (and the mid block), and a VAE of 4/8/8/8
  channels (4 group-norm groups) with no mid-block attention (:data:`FAST_UNET`, :data:`FAST_VAE`;
  still diffusers' ``UNet2DConditionModel`` / ``AutoencoderKL``, a ``ControlNetModel`` from the UNet,
  latent factor 8, the same code path). With SD's layout (``sd``) the stand-in spent 71 % of a
  448x640 -> 1792x2560 run in ``scaled_dot_product_attention`` (self-attention over the 9216
  positions of every 96x96 latent tile and the 50176 of every 224x224 VAE decoder tile); revision 1
  of ``fast`` (attention at half latent resolution, 32/64-channel UNet, 8/16/16/16 VAE) still spent
  29 % there (2304 positions, 4 heads of 16 dims) and the rest in convolutions of 16-64 channels
  at full latent and pixel resolution (torch.profiler at commit e12c2e8, before revision 2).
  ``benchmarks/bench_tiny_standin.py`` prints the layouts side by side.
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


#: Revision of each layout, written into ``sd/layout.txt``: a folder of an older revision is rebuilt.
LAYOUT_REVISION = {'fast': 2, 'sd': 1}
#: The ``fast`` layout's changes to ``dalpsr.archs.sd_components.TINY_UNET`` / ``TINY_VAE`` (module doc).
FAST_UNET = dict(block_out_channels=(8, 16, 32, 32),
                 down_block_types=('DownBlock2D', 'DownBlock2D', 'DownBlock2D', 'CrossAttnDownBlock2D'),
                 up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D', 'UpBlock2D', 'UpBlock2D'),
                 attention_head_dim=(2, 2, 2, 2))
FAST_VAE = dict(block_out_channels=(4, 8, 8, 8), norm_num_groups=4, mid_block_add_attention=False)


def layout_id(layout: str) -> str:
    """The line ``sd/layout.txt`` holds for ``layout``, e.g. ``'fast 2'``."""
    return f'{layout} {LAYOUT_REVISION[layout]}'


def read_layout_id(sd_dir) -> str:
    """The layout line of a built SD folder (``'sd 1'`` for folders written before layouts existed,
    ``'fast 1'`` for the first ``fast`` layout, which wrote no revision)."""
    f = Path(sd_dir) / 'layout.txt'
    if not f.is_file():
        return layout_id('sd')
    words = f.read_text().split()
    return ' '.join(words) if len(words) == 2 else f'{words[0] if words else "sd"} 1'


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
            unet = UNet2DConditionModel(**dict(TINY_UNET, **FAST_UNET))
            torch.manual_seed(seed + 1)
            vae = AutoencoderKL(**dict(TINY_VAE, **FAST_VAE))
        finally:
            torch.random.set_rng_state(state)
        for name, net in (('unet', unet), ('vae', vae)):
            shutil.rmtree(tmp / name)
            net.save_pretrained(tmp / name)
    (tmp / 'layout.txt').write_text(layout_id(layout) + '\n')
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
    rebuilt = (overwrite or not (root / 'sd' / 'model_index.json').is_file()
               or read_layout_id(root / 'sd') != layout_id(layout))
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


__all__ = ['build_tiny_dalpsr', 'TINY_LABEL', 'TINY_IRPAD', 'LAYOUTS', 'LAYOUT_REVISION', 'layout_id',
           'read_layout_id']

if __name__ == '__main__':  # pragma: no cover
    import sys
    print(build_tiny_dalpsr(sys.argv[1] if len(sys.argv) > 1 else os.path.join('pretrained_models', 'tiny')))
