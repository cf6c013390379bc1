#!/usr/bin/env python
"""Write a tiny random LLaVA (transformers format, 32 px CLIP tower, 2-layer Llama) for CPU runs.

    python scripts/make_tiny_llava.py --out pretrained_models/tiny-llava [--samples datasets/samples]

``--samples DIR`` also links the photographs shipped in installed packages into DIR/train and
DIR/val (the HR folders of options/train/train_caption_align_tiny.yml).
The model is untrained: it exercises every code path (captioning, alignment, export), its words are noise.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default='pretrained_models/tiny-llava')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--samples', default=None, help='also link shipped sample images into DIR/train and DIR/val')
    p.add_argument('--overwrite', action='store_true')
    args = p.parse_args(argv)
    out = Path(args.out)
    if (out / 'config.json').exists() and not args.overwrite:
        print(f'{out} already holds a model (use --overwrite to replace it)')
    else:
        from dalpsr.captioning.tiny import make_tiny_llava
        make_tiny_llava(str(out), seed=args.seed)
        print(f'tiny LLaVA written to {out}')
    if args.samples:
        from dalpsr.data.sample_images import link_sample_images
        for split in ('train', 'val'):
            n = len(link_sample_images(str(Path(args.samples) / split), split))
            print(f'{n} {split} images in {Path(args.samples) / split}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
