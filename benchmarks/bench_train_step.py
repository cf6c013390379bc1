#!/usr/bin/env python
"""DaLPSR training step cost: seconds per optimizer step and peak memory of the ControlNet
training step on the SD 2.1-base architecture, per mixed-precision mode and gradient
checkpointing setting.

Random weights with the published architecture (``dalpsr/archs/configs/sd21_base_*.json``:
UNet 866 M, VAE 84 M, OpenCLIP-H text encoder 340 M parameters; ControlNet initialised from
the UNet, trainable; no download). One step is exactly what ``dalpsr/train.py`` runs for
``DaLPSRModel``: VAE-encode the HR crop, z_LR condition from the upsampled LR, chunked CLIP
encoding of a long composed prompt (caption + restoration prompt, 2 x 77 tokens), ControlNet +
frozen UNet, eps-MSE, backward under ``accelerator.autocast``, gradient clipping, Adam step.

Each configuration runs in its own process, so "peak" is that configuration's own high-water
mark: ``torch.cuda.max_memory_allocated`` on a GPU, the process RSS high-water mark on CPU.

    python benchmarks/bench_train_step.py                                   # CPU: 128 px, batch 1, fp32/bf16
    python benchmarks/bench_train_step.py --device cuda                     # GPU: 512 px, batch 4, fp32/fp16/bf16
    python benchmarks/bench_train_step.py --device cpu --size 64 --channel-scale 0.5 --precision fp32

Columns: precision (``train.mixed_precision``; frozen parts are held in that dtype, trainable
weights stay fp32), gradient checkpointing (``model.gradient_checkpointing``), s/step (mean of
``--steps`` steps after ``--warmup``), peak memory, trainable parameters.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from dalpsr.utils.misc import resolve_device  # noqa: E402

_WORDS = ('a detailed photograph of an old stone bridge over a slow river in autumn light with red and '
          'yellow trees on both banks reflections on the water a small boat moored under the arch moss on '
          'the wet stones soft clouds in a pale blue sky and distant hills fading into haze the style is '
          'realistic with natural colors fine textures sharp focus and gentle contrast typical of a travel '
          'photo taken in the late afternoon').split()


def caption(words: int) -> str:
    """A fixed caption of ``words`` words (cycled from a fixed text)."""
    return ' '.join(_WORDS[i % len(_WORDS)] for i in range(words)).capitalize() + '.'


def peak_mb(device: torch.device) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(args) -> dict:
    """One configuration in this process -> result dict."""
    from accelerate import Accelerator

    from dalpsr.archs.sd_components import build_sd21_base_random
    from dalpsr.models.dalpsr_model import DaLPSRModel

    use_cpu = args.device == 'cpu'
    if not use_cpu:
        torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
        torch.backends.cudnn.allow_tf32 = bool(args.tf32)
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=args.precision)
    device = accelerator.device
    t0 = time.perf_counter()
    comps = build_sd21_base_random(seed=0, channel_scale=args.channel_scale, device=device)
    opt = {'name': 'bench', 'seed': 0, '_source': 'bench_train_step.py',
           'model': {'type': 'DaLPSRModel', 'gradient_checkpointing': bool(args.checkpointing),
                     'attention': args.attention, 'text': {'max_chunks': 3},
                     'prompt': {'caption_dropout': 0.0, 'restoration_dropout': 0.0, 'empty_dropout': 0.0}}}
    torch.manual_seed(0)
    model = DaLPSRModel(opt, accelerator, components=comps)
    build_s = time.perf_counter() - t0
    cn = model.controlnet
    trainable = sum(p.numel() for p in cn.parameters() if p.requires_grad)
    optimizer = torch.optim.Adam([p for p in cn.parameters() if p.requires_grad], lr=2e-5)
    cn, optimizer = accelerator.prepare(cn, optimizer)
    model.set_prepared({'controlnet': cn})

    b, s = args.batch, args.size
    g = torch.Generator().manual_seed(0)
    batch = {'gt': torch.rand(b, 3, s, s, generator=g), 'lq': torch.rand(b, 3, s // 4, s // 4, generator=g),
             'prompt': ['Deblur with sigma 0.5~0.75, Denoise with sigma 0~0.25, Dejpeg with sigma 0.25~0.5'] * b,
             'caption': [caption(args.caption_words)] * b, 'index': torch.arange(b)}
    tokens = len(model.tokenizer(model.compose_prompts(batch, training=False)[0]).input_ids)

    def step(i):
        with accelerator.autocast():
            out = model.training_step(batch, i)
        accelerator.backward(out['loss'])
        accelerator.clip_grad_norm_(cn.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out['loss'].detach())

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    losses = [step(i) for i in range(args.warmup)]
    sync()
    t = time.perf_counter()
    for i in range(args.steps):
        losses.append(step(args.warmup + i))
    sync()
    sec = (time.perf_counter() - t) / args.steps
    import math
    return {'precision': args.precision, 'checkpointing': bool(args.checkpointing), 'sec_per_step': sec,
            'peak_mb': peak_mb(device), 'trainable_m': trainable / 1e6, 'build_s': build_s,
            'loss_finite': all(math.isfinite(v) for v in losses), 'prompt_tokens': tokens,
            'device': str(device), 'device_name': torch.cuda.get_device_name(device) if device.type == 'cuda'
            else 'cpu', 'threads': torch.get_num_threads(), 'size': s, 'batch': b,
            'channel_scale': args.channel_scale}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    p.add_argument('--size', type=int, default=None, help='HR crop side in px (default 512 GPU, 128 CPU)')
    p.add_argument('--batch', type=int, default=None, help='per-step batch (default 4 GPU, 1 CPU)')
    p.add_argument('--precision', default=None,
                   help='comma-separated of fp32 (=no), fp16, bf16 (default fp32,fp16,bf16 GPU; fp32,bf16 CPU)')
    p.add_argument('--checkpointing', default='on,off', help='comma-separated of on, off')
    p.add_argument('--channel-scale', type=float, default=1.0,
                   help='narrow every width (1 = the published SD 2.1-base; e.g. 0.5 for small machines)')
    p.add_argument('--attention', default='sdpa', choices=('sdpa', 'default'))
    p.add_argument('--caption-words', type=int, default=70, help='caption length (70 words -> 2 text chunks)')
    p.add_argument('--steps', type=int, default=None, help='timed steps (default 10 GPU, 2 CPU)')
    p.add_argument('--warmup', type=int, default=None, help='untimed steps first (default 3 GPU, 1 CPU)')
    p.add_argument('--threads', type=int, default=None, help='CPU threads (default: torch default)')
    p.add_argument('--tf32', type=int, default=1, help='allow TF32 matmuls on GPU for fp32 (train.allow_tf32)')
    p.add_argument('--json', default=None, help='also write the results to this JSON file')
    p.add_argument('--one', action='store_true', help=argparse.SUPPRESS)  # internal: run one config here
    args = p.parse_args(argv)

    try:
        args.device = resolve_device(args.device)
    except ValueError as err:
        p.error(str(err))
    gpu = args.device == 'cuda'
    args.size = args.size or (512 if gpu else 128)
    args.batch = args.batch or (4 if gpu else 1)
    args.steps = args.steps or (10 if gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    if args.size % 32:
        p.error(f'--size must be a multiple of 32 (LR = size/4 and latent = size/8), got {args.size}')
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.one:
        args.checkpointing = args.checkpointing == 'on'
        print('RESULT ' + json.dumps(run_one(args)), flush=True)
        return 0

    precisions = [('no' if v.strip() == 'fp32' else v.strip())
                  for v in (args.precision or ('fp32,fp16,bf16' if gpu else 'fp32,bf16')).split(',')]
    for v in precisions:
        if v not in ('no', 'fp16', 'bf16'):
            p.error(f'--precision: unknown {v!r} (use fp32, fp16, bf16)')
    ckpts = [v.strip() for v in args.checkpointing.split(',')]
    if any(v not in ('on', 'off') for v in ckpts):
        p.error('--checkpointing takes on, off or on,off')
    env = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONPATH=str(REPO))
    print(f'DaLPSR training step, SD 2.1-base architecture (channel_scale {args.channel_scale}), random weights; '
          f'{args.device}, HR {args.size} px, batch {args.batch}, attention {args.attention}, '
          f'{args.warmup} warm-up + {args.steps} timed steps', flush=True)
    results = []
    for prec in precisions:
        for ck in ckpts:
            cmd = [sys.executable, os.path.abspath(__file__), '--one', '--device', args.device,
                   '--size', str(args.size), '--batch', str(args.batch), '--precision', prec, '--checkpointing', ck,
                   '--channel-scale', str(args.channel_scale), '--attention', args.attention,
                   '--caption-words', str(args.caption_words), '--steps', str(args.steps),
                   '--warmup', str(args.warmup), '--tf32', str(args.tf32)]
            if args.threads:
                cmd += ['--threads', str(args.threads)]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = [ln for ln in r.stdout.splitlines() if ln.startswith('RESULT ')]
            if r.returncode or not line:
                err = (r.stderr.strip().splitlines() or ['?'])[-1]
                oom = 'out of memory' in r.stderr.lower()
                res = {'precision': prec, 'checkpointing': ck == 'on', 'error': 'OOM' if oom else err[:200]}
            else:
                res = json.loads(line[-1][7:])
            results.append(res)
            name = 'fp32' if prec == 'no' else prec
            if 'error' in res:
                print(f'  {name:5s} ckpt {ck:3s}: FAILED ({res["error"]})', flush=True)
            else:
                print(f'  {name:5s} ckpt {ck:3s}: {res["sec_per_step"]:8.3f} s/step  peak {res["peak_mb"]:9.0f} MiB  '
                      f'trainable {res["trainable_m"]:.1f} M  (built in {res["build_s"]:.0f} s, '
                      f'prompt {res["prompt_tokens"]} tokens, loss finite: {res["loss_finite"]})', flush=True)
    ok = [r for r in results if 'error' not in r]
    print()
    dev = ok[0]['device_name'] if ok else args.device
    print(f'| precision | grad. checkpointing | s/step | peak memory (MiB) | trainable params |  ({dev}, '
          f'{args.size} px, batch {args.batch})')
    print('|---|---|---|---|---|')
    for r in results:
        name = 'fp32' if r['precision'] == 'no' else r['precision']
        ck = 'on' if r['checkpointing'] else 'off'
        if 'error' in r:
            print(f'| {name} | {ck} | {r["error"]} | | |')
        else:
            print(f'| {name} | {ck} | {r["sec_per_step"]:.3f} | {r["peak_mb"]:.0f} | {r["trainable_m"]:.1f} M |')
    if args.json:
        from dalpsr.utils.misc import atomic_write_json
        atomic_write_json(args.json, {'args': {k: v for k, v in vars(args).items() if k != 'one'},
                                      'results': results})
    return 0 if len(ok) == len(results) else 1


if __name__ == '__main__':
    sys.exit(main())
