#!/usr/bin/env python
"""The README's main job: dalpsr end to end on images that ship in installed packages.

    python scripts/demo.py                       # data summary + super-resolution demos
    python scripts/demo.py --no-sr               # only the degraded triplet set and its summary
    python scripts/demo.py --no-diffusion        # data + the real (CPU-trained DePLSR) restoration only
    python scripts/demo.py --num 200 --workers 2 --out results/demo

1. Degrades random crops of the shipped photos (scikit-image, matplotlib, pyiqa) with the
   Real-ESRGAN second-order pipeline into a triplet set (HR crop, LR, meta.jsonl with the
   recorded parameters, labels and restoration prompt) via scripts/generate_lq.py, and prints
   the label histogram per degradation type and example prompts.
2. Super-resolves shipped photos (degraded x4, never seen in training) with the DePLSR model
   trained on a CPU that ships in pretrained_models/deplsr_cpu_x4 (scripts/demo_deplsr.py): a real
   restoration on any machine, with PSNR-Y against the HR next to bicubic.
3. Runs dalpsr/test.py on shipped LR images through scripts/demo_sr.py: with the real SD 2.1-base
   weights when they are under pretrained_models/ (or in the HF cache), otherwise it prints what
   to download and where and runs a tiny random stand-in of the diffusion model, labelled as such.

Reruns resume (finished samples and images are skipped); nothing earlier is overwritten.
"""
import argparse
import importlib.util
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _script(name: str):
    """Import scripts/<name>.py as a module (scripts/ is not a package)."""
    path = os.path.join(ROOT, 'scripts', f'{name}.py')
    spec = importlib.util.spec_from_file_location(f'dalpsr_script_{name}', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default='results/demo', help='output folder (default results/demo)')
    p.add_argument('--num', type=int, default=96, help='number of triplets (default 96)')
    p.add_argument('--gt-size', type=int, default=512, help='HR crop size (LR = gt_size / 4; default 512)')
    p.add_argument('--seed', type=int, default=0, help='seed of every random choice (default 0)')
    p.add_argument('--workers', type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument('--no-sr', action='store_true', help='skip both super-resolution parts')
    p.add_argument('--no-diffusion', action='store_true',
                   help='skip the diffusion part (its stand-in without the SD weights)')
    args = p.parse_args(argv)

    t0 = time.time()
    triplets = os.path.join(args.out, 'triplets')
    print(f'[1/3] degraded triplet set from the shipped photos -> {triplets}', flush=True)
    rc = _script('generate_lq').main(['--hr', 'sample:train', '--out', triplets, '--num', str(args.num),
                                      '--gt-size', str(args.gt_size), '--seed', str(args.seed),
                                      '--workers', str(args.workers), '--quiet'])
    if rc:
        return rc
    from dalpsr.data.triplet_dataset import summarize_triplets
    print(summarize_triplets(triplets, num_examples=4), flush=True)
    print(f'(triplets, labels and prompts in {triplets}; {time.time() - t0:.0f} s so far)', flush=True)
    if args.no_sr:
        return 0
    print('\n[2/3] real super-resolution of shipped photos with the CPU-trained DePLSR model '
          '(pretrained_models/deplsr_cpu_x4)', flush=True)
    rc = _script('demo_deplsr').main(['--out', os.path.join(args.out, 'deplsr'), '--seed', str(args.seed)])
    if rc or args.no_diffusion:
        return rc
    print(f'\n[3/3] diffusion super-resolution of shipped images with dalpsr/test.py', flush=True)
    return _script('demo_sr').main(['--results-root', os.path.join(args.out, 'sr')])


if __name__ == '__main__':
    sys.exit(main())
