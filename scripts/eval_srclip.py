#!/usr/bin/env python
"""Zero-shot degradation retrieval of a trained SRCLIP, per type (DePLSR's evaluate.py).

    python scripts/eval_srclip.py --model experiments/srclip_cpu/export --hr /path/to/held_out_photos
    python scripts/eval_srclip.py --model DIR --template 'A photo with {}'     # the paper's prompt

The held-out set: ``--num`` random ``--gt-size`` crops of the ``--hr`` photos (default the 'val'
sample photos, disjoint from training), degraded with DePLSR's pipeline (``--chain``, ``--scale``
or ``--lq-size``) and seed ``--seed`` (training used another). For each type the image's fine
embedding of that type is compared with the text embeddings of the evaluation classes (blur
sigma {0,1,2,3} within 0.5; Gaussian sigma {0,15,30} within 10; Poisson scale {0,1,2,3} within
0.5; JPEG quality {30,50,70,90} within 10; ringing no/yes), each caption put into ``--template``;
the closest class is correct when its value is within the tolerance of the true value.
Chance: the expected accuracy of a uniformly random class on the same samples.

Prints a table and writes ``--out``/metrics.json (atomic; an existing file is refused unless
--overwrite). Exit status: 0 done, 2 bad input (one-line message).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', required=True, help='SRCLIP export folder (srclip.json + srclip.safetensors)')
    p.add_argument('--hr', default='sample:val', help="held-out photos: folder or 'sample:val'")
    p.add_argument('--num', type=int, default=300)
    p.add_argument('--gt-size', type=int, default=192)
    p.add_argument('--seed', type=int, default=6)
    p.add_argument('--chain', choices=['two_order', 'released'], default='two_order')
    p.add_argument('--scale', type=int, default=4, help='LQ = degraded crop / scale (ignored with --lq-size)')
    p.add_argument('--lq-size', type=int, default=None, help='LQ resized to this square size (224 in the paper)')
    p.add_argument('--template', default='{}', help="class caption template, e.g. 'A photo with {}'")
    p.add_argument('--batch-size', type=int, default=50)
    p.add_argument('--device', default='cpu')
    p.add_argument('--out', default=None, help='folder for metrics.json (default: print only)')
    p.add_argument('--overwrite', action='store_true')
    return p


def evaluate(args):
    import torch
    from dalpsr.data.deplsr_datasets import SRCLIPCaptionDataset
    from dalpsr.models.srclip_model import load_srclip, retrieval_accuracy
    if '{}' not in args.template:
        raise ValueError(f"--template must contain '{{}}', got {args.template!r}")
    enc, meta = load_srclip(args.model, args.device)
    deg = {'chain': args.chain, 'scale': args.scale}
    if args.lq_size:
        deg['lq_size'] = args.lq_size
    ds = SRCLIPCaptionDataset(hr=args.hr, gt_size=args.gt_size, num_samples=args.num, seed=args.seed, degradation=deg)
    fines, values = [], []
    with torch.no_grad():
        for a in range(0, len(ds), args.batch_size):
            items = [ds[i] for i in range(a, min(len(ds), a + args.batch_size))]
            lq = torch.stack([it['lq'] for it in items]).to(args.device)
            fines.append(enc.encode_image(lq)['fine'])
            values.append(torch.stack([it['values'] for it in items]))
    res = retrieval_accuracy(enc, torch.cat(fines), torch.cat(values).to(args.device), args.template)
    return {'metrics': res, 'model': os.path.abspath(args.model), 'model_type': meta.get('type'),
            'data': {'hr': args.hr, 'num': args.num, 'gt_size': args.gt_size, 'seed': args.seed,
                     'degradation': deg}, 'template': args.template}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.out:
        path = os.path.join(args.out, 'metrics.json')
        if os.path.exists(path) and not args.overwrite:
            print(f'error: {path} exists; pass --overwrite to replace it', file=sys.stderr)
            return 2
    try:
        rec = evaluate(args)
    except (FileNotFoundError, ValueError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    m = rec['metrics']
    from dalpsr.data.deplsr_degradation import TYPES
    print(f"{'type':10s} {'accuracy':>9s} {'chance':>7s}")
    for t in list(TYPES) + ['mean']:
        print(f"{t:10s} {m[f'acc/{t}']:9.3f} {m[f'chance/{t}']:7.3f}")
    if args.out:
        from dalpsr.utils.misc import atomic_write_json
        os.makedirs(args.out, exist_ok=True)
        atomic_write_json(os.path.join(args.out, 'metrics.json'), rec)
        print(f'written: {os.path.join(args.out, "metrics.json")}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
