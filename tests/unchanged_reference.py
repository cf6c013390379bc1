#!/usr/bin/env python
"""Reference outputs of DaLPSR inference on tiny random models, for "behaviour unchanged" checks.

``tests/test_unchanged_inference.py`` compares the current code against values recorded from
commit 3297236 (before the inference package existed) with this very file::

    PYTHONPATH=/path/to/checkout-3297236 python tests/unchanged_reference.py --out tests/data/unchanged_inference

(the script's own folder is first on ``sys.path``, so ``dalpsr`` comes from ``PYTHONPATH``).
It only uses what both versions offer: ``DaLPSRSampler(components, controlnet)(lq, **kwargs)`` and
``scripts/demo_sr.py --tiny``. Every case is small (a few seconds on one CPU thread).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import types
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

#: SD 2.1-base scheduler config (as tests/test_sampler.py).
SD21_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                      prediction_type='epsilon', steps_offset=1, clip_sample=False, set_alpha_to_one=False,
                      skip_prk_steps=True, _class_name='PNDMScheduler')

LONG_PROMPT = ('a long caption ' + ' '.join(f'word{i}' for i in range(30)))  # 2 CLIP chunks

#: name -> (condition mode, LR size (h, w), batch size, sampler kwargs)
CASES: Dict[str, Tuple[str, Tuple[int, int], int, Dict[str, Any]]] = {
    'ddpm_lr_cfg': ('latent', (8, 8), 1, dict(prompts='a cat', num_steps=3, scheduler='ddpm', seed=1)),
    'ddim_noise_nocfg_wavelet': ('latent', (8, 8), 1, dict(prompts='x', num_steps=2, scheduler='ddim', start='noise',
                                                              guidance_scale=1.0, seed=2, color_fix='wavelet')),
    'ddim_noise_guidance': ('latent', (8, 8), 1, dict(prompts='a dog', num_steps=3, scheduler='ddim',
                                                         start='noise_guidance', noise_guidance_steps=1, seed=3)),
    'dpm_tiled_batch2': ('latent', (8, 12), 2, dict(prompts=['a cat', 'a dog'], num_steps=2, scheduler='dpmsolver++',
                                                      seed=[3, 4], tile={'latent_size': 6, 'latent_overlap': 2,
                                                                         'vae_encoder_tile': 32,
                                                                         'vae_encoder_overlap': 8,
                                                                         'vae_decoder_tile': 4,
                                                                         'vae_decoder_overlap': 1})),
    'unipc_image_mode_start500': ('image', (8, 8), 1, dict(prompts='x', num_steps=2, scheduler='unipc',
                                                              start_step=500, seed=5)),
    'ddim_long_prompt': ('latent', (8, 12), 1, dict(prompts=LONG_PROMPT, num_steps=2, scheduler='ddim', seed=6,
                                                      color_fix='none')),
}


def tiny_sd(mode: str = 'latent', seed: int = 0):
    """Tiny random SD parts + ControlNet (REFERENCE.md section 2 sizes), built in memory."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dalpsr.utils.clip_tokenizer import offline_clip_tokenizer
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                                up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), cross_attention_dim=32,
                                attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 4,
                        up_block_types=('UpDecoderBlock2D',) * 4, block_out_channels=(8, 16, 16, 16),
                        latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=64)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_hidden_layers=2, max_position_embeddings=77, bos_token_id=49406,
                                      eos_token_id=49407, pad_token_id=49407))
    if mode == 'latent':
        cn = ControlNetModel.from_unet(unet, conditioning_channels=4, conditioning_embedding_out_channels=(16,))
    else:
        cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    # from_unet zero-initialises the ControlNet outputs: perturb them so the ControlNet acts
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if 'zero_conv' in name or 'controlnet_down_blocks' in name or 'controlnet_mid_block' in name \
                    or 'conv_out' in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    comps = types.SimpleNamespace(vae=vae, unet=unet, text_encoder=te, tokenizer=offline_clip_tokenizer(),
                                  scheduler_config=dict(SD21_SCHEDULER))
    return comps, cn


def case_lq(hw: Tuple[int, int], batch: int) -> torch.Tensor:
    """A smooth random LR batch [batch, 3, h, w] in [0, 1] (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, hw[0] // 4 + 1, hw[1] // 4 + 1, generator=g)
    return torch.nn.functional.interpolate(x, size=hw, mode='bilinear', align_corners=False)


def run_cases(make_sampler) -> Dict[str, np.ndarray]:
    """``make_sampler(comps, controlnet)`` -> a callable like ``DaLPSRSampler.__call__``.
    Returns case name -> float32 SR [B, 3, 4h, 4w]."""
    out, built = {}, {}
    for name, (mode, hw, batch, kw) in CASES.items():
        if mode not in built:
            built[mode] = make_sampler(*tiny_sd(mode))
        out[name] = built[mode](case_lq(hw, batch), **kw).numpy().astype(np.float32)
    return out


def run_demo(work: Path, sampler_extra: Dict[str, Any] = None, args: List[str] = ()) -> Dict[str, np.ndarray]:
    """scripts/demo_sr.py --tiny (2 shipped photographs, 32 px LR, 4 DDIM steps) -> key -> uint8 SR.
    ``sampler_extra``: keys added to the demo's ``sampler`` options; ``args``: extra demo arguments
    (both empty for the recording)."""
    import importlib.util

    import cv2
    import dalpsr
    root = Path(dalpsr.__file__).resolve().parents[1]  # the demo of the checkout under test
    spec = importlib.util.spec_from_file_location('demo_sr_ref', root / 'scripts' / 'demo_sr.py')
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    if sampler_extra:
        build = demo.build_options

        def build_options(*args, **kwargs):
            opt = build(*args, **kwargs)
            opt['sampler'].update(sampler_extra)
            return opt
        demo.build_options = build_options
    rc = demo.main(['--tiny', '--tiny-dir', str(work / 'tiny'), '--results-root', str(work / 'results')] + list(args))
    if rc != 0:
        raise RuntimeError(f'demo_sr failed (rc {rc})')
    folder = work / 'results' / 'demo_sr_TINY_RANDOM_STAND-IN' / 'demo'
    return {p.stem: cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted(folder.glob('*.png'))}


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', required=True, help='folder for cases.npz, demo.npz and summary.json')
    p.add_argument('--work', default=None, help='scratch folder (default: <out>/../work)')
    args = p.parse_args(argv)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    torch.set_num_threads(1)
    import dalpsr
    from dalpsr.pipelines import DaLPSRSampler
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else out.parent / 'work'
    cases = run_cases(lambda comps, cn: DaLPSRSampler(comps, cn, device='cpu'))
    demo = run_demo(work)
    np.savez_compressed(out / 'cases.npz', **cases)
    np.savez_compressed(out / 'demo.npz', **demo)
    summary = {'dalpsr': os.path.dirname(dalpsr.__file__), 'torch': torch.__version__,
               'cases': {k: {'shape': list(v.shape), 'sha256': digest(v), 'mean': float(v.mean())}
                         for k, v in cases.items()},
               'demo': {k: {'shape': list(v.shape), 'sha256': digest(v), 'mean': float(v.mean())}
                        for k, v in demo.items()}}
    (out / 'summary.json').write_text(json.dumps(summary, indent=1) + '\n')
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
