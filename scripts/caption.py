#!/usr/bin/env python
"""Caption a folder of images into a JSONL file (one line per image, format in docs/captioning.md).

    python scripts/caption.py --input datasets/train_hr --out datasets/train_hr_captions.jsonl \
        --captioner ram+llava --ram pretrained_models/ram --llava pretrained_models/llava-1.5-7b-hf

Resumable: rerunning with the same settings skips images that already have a successful line
and retries failed ones (appending; the last line per key wins). A run with different settings
(models, instruction) refuses to mix them into an existing file unless ``--overwrite`` is given,
which first archives the old file with a timestamp. A per-image failure (unreadable file, model
error) is recorded in that image's line (``error``) and the run goes on.
Several GPUs or machines: start the same command with ``accelerate launch`` (docs/scaling.md):
process r of n captions every n-th batch into its own part file, the main process merges them
into --out in the order one process would have written (same bytes whatever n) and folds part
files left by a killed run (any n) into --out before resuming; ``--device auto`` then means the
process's own GPU.
Options may also come from a YAML file (``-opt``, keys = the long option names with underscores);
command-line flags override it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dalpsr.captioning.captions import DEFAULT_INSTRUCTION, DEFAULT_INSTRUCTION_NO_TAGS  # noqa: E402
from dalpsr.captioning.pipeline import CAPTIONER_MODES  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('-opt', default=None, help='YAML file with any of the options below')
    p.add_argument('--preset', default=None, help='named settings of a method (dalpsr/utils/caption_presets.py: sspir)')
    p.add_argument('--input', help='image folder (scanned recursively unless --no-recursive)')
    p.add_argument('--out', help='output JSONL file')
    p.add_argument('--captioner', choices=CAPTIONER_MODES, default='ram+llava')
    p.add_argument('--tagger', choices=('ram', 'clip'), default='ram')
    p.add_argument('--ram', default='pretrained_models/ram', help='RAM folder or .pth (tag files next to it)')
    p.add_argument('--ram-threshold-scale', type=float, default=1.0)
    p.add_argument('--max-tags', type=int, default=0, help='keep at most N tags per image (0: all)')
    p.add_argument('--exclude-tags', default='', help='comma-separated tags never reported')
    p.add_argument('--clip-model', default='ViT-B-32')
    p.add_argument('--clip-pretrained', default=None, help='open_clip checkpoint file or pretrained tag')
    p.add_argument('--clip-model-config', default=None, help='JSON open_clip model config (custom models)')
    p.add_argument('--clip-vocab', default=None, help='tag vocabulary file (default: built-in list)')
    p.add_argument('--clip-top-k', type=int, default=8)
    p.add_argument('--clip-min-prob', type=float, default=0.05)
    p.add_argument('--llava', default='llava-hf/llava-1.5-7b-hf', help='hub id or local folder')
    p.add_argument('--vision-tower', default=None, help='tuned CLIP vision tower folder (caption-align export)')
    p.add_argument('--instruction', default=DEFAULT_INSTRUCTION)
    p.add_argument('--instruction-no-tags', default=DEFAULT_INSTRUCTION_NO_TAGS)
    p.add_argument('--max-new-tokens', type=int, default=200)
    p.add_argument('--num-beams', type=int, default=1)
    p.add_argument('--batch-size', type=int, default=4)
    p.add_argument('--device', default='auto', help='auto | cpu | cuda | cuda:N')
    p.add_argument('--dtype', default='auto', choices=('auto', 'fp32', 'fp16', 'bf16'))
    p.add_argument('--no-recursive', action='store_true')
    p.add_argument('--limit', type=int, default=0, help='caption at most N images (0: all)')
    p.add_argument('--overwrite', action='store_true', help='archive an existing output with other settings')
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset:  # a method's settings as defaults; -opt keys and flags override them
        from dalpsr.utils.caption_presets import preset_defaults
        try:
            parser.set_defaults(**preset_defaults(args.preset))
        except KeyError as err:
            parser.error(err.args[0])
        args = parser.parse_args(argv)
    if args.opt:
        from dalpsr.utils.options import OptionError, load_yaml
        cfg = load_yaml(args.opt)
        known = {a.dest for a in parser._actions} - {'help', 'opt', 'preset'}
        bad = sorted(set(cfg) - known)
        if bad:
            raise OptionError(f"{args.opt}: unknown key(s) {', '.join(bad)} (allowed: {', '.join(sorted(known))})")
        parser.set_defaults(**cfg)
        args = parser.parse_args(argv)
    for need in ('input', 'out'):
        if not getattr(args, need):
            parser.error(f'--{need} is required')
    return args


def build_pipeline(args, device: str):
    from dalpsr.captioning.pipeline import CaptionPipeline
    if args.tagger == 'ram':
        topts = dict(path=args.ram, threshold_scale=args.ram_threshold_scale, max_tags=args.max_tags,
                     exclude=[t.strip() for t in args.exclude_tags.split(',') if t.strip()])
    else:
        topts = dict(model=args.clip_model, pretrained=args.clip_pretrained, vocabulary=args.clip_vocab,
                     top_k=args.max_tags or args.clip_top_k, min_prob=args.clip_min_prob,
                     model_config=args.clip_model_config)
    lopts = dict(model=args.llava, vision_tower=args.vision_tower, max_new_tokens=args.max_new_tokens,
                 num_beams=args.num_beams, batch_size=args.batch_size)
    return CaptionPipeline(args.captioner, args.tagger, topts, lopts, args.instruction, args.instruction_no_tags,
                           device=device, dtype=args.dtype)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    from dalpsr.captioning.captions import file_sha1, make_record, read_caption_records
    from dalpsr.utils.img_io import ImageReadError, read_image
    from dalpsr.utils.misc import append_jsonl, get_time_str, resolve_device, scan_images
    from dalpsr.utils.sharding import current_shard

    shard = current_shard()  # rank 0 of 1 unless started by accelerate launch
    try:
        device = shard.device if (shard.device and args.device == 'auto') else resolve_device(args.device)
    except ValueError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    root = Path(args.input)
    try:
        paths = scan_images(root, recursive=not args.no_recursive)
    except FileNotFoundError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    if args.limit > 0:
        paths = paths[:args.limit]
    # key = stem; a repeated stem (sub-folders) gets its relative path without suffix
    keys, seen = [], set()
    for p in paths:
        k = p.stem
        if k in seen:
            k = p.relative_to(root).with_suffix('').as_posix()
            print(f'warning: duplicate image stem {p.stem!r}: {p} gets key {k!r}')
        seen.add(k)
        keys.append(k)

    try:
        pipe = build_pipeline(args, device)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    models = dict(pipe.models)
    if pipe.llava is not None:
        models['instruction_template'] = args.instruction

    out = Path(args.out)
    failure = None
    if shard.is_main:  # check / archive the output and fold part files of a killed sharded run into it
        try:
            _merge_parts(out, shard, keys)
            if out.exists():
                ok = [r for r in read_caption_records(out) if r.get('error') is None]
                mismatch = [r for r in ok if r.get('models') != models]
                if mismatch and not args.overwrite:
                    failure = (f'{out} holds captions made with other settings ({mismatch[0].get("models")}); '
                               'pass --overwrite to archive it and start again, or choose another --out')
                elif mismatch:
                    archived = out.with_name(f'{out.stem}_archived_{get_time_str()}{out.suffix}')
                    os.replace(out, archived)
                    print(f'archived {out} -> {archived}')
            out.parent.mkdir(parents=True, exist_ok=True)
        except (OSError, ValueError) as err:
            failure = str(err)
    shard.barrier()  # the other processes start once the output is checked (and archived)
    try:
        ok = [r for r in read_caption_records(out) if r.get('error') is None] if out.exists() else []
    except ValueError as err:
        failure = failure or str(err)
    if failure is None and any(r.get('models') != models for r in ok):
        failure = f'the main process refused {out} (see its message)'
    if failure is not None:
        print(f'error: {failure}', file=sys.stderr)
        return 2
    done = {r['key'] for r in ok}

    todo = [(k, p) for k, p in zip(keys, paths) if k not in done]
    batches = shard.take([todo[i:i + args.batch_size] for i in range(0, len(todo), args.batch_size)])
    part = shard.part_path(out)
    print(f'{len(paths)} images, {len(paths) - len(todo)} already captioned, {len(todo)} to do '
          f'({args.captioner}, tagger {args.tagger}, device {device})'
          + (f'; process {shard.rank} of {shard.world_size}: {sum(map(len, batches))}' if shard.distributed else ''))
    n_ok = n_fail = 0
    t0 = time.time()
    bar = tqdm(total=sum(map(len, batches)), unit='img', dynamic_ncols=True)
    for batch in batches:
        ready, recs = [], []
        for k, p in batch:
            try:
                sha = file_sha1(p)
            except OSError as err:
                recs.append(make_record(k, p, '', models=models, error=f'unreadable: {err}'))
                continue
            try:
                ready.append((k, p, sha, read_image(p)))
            except ImageReadError as err:
                recs.append(make_record(k, p, sha, models=models, error=f'unreadable: {err}'))
        results = _caption_batch(pipe, [r[3] for r in ready])
        for (k, p, sha, _), res in zip(ready, results):
            if isinstance(res, Exception):
                recs.append(make_record(k, p, sha, models=models, error=f'{type(res).__name__}: {res}'))
            else:
                recs.append(make_record(k, p, sha, res['tags'], res['description'], models, res['instruction']))
        for r in recs:
            append_jsonl(part, r)
            if r['error'] is None:
                n_ok += 1
            else:
                n_fail += 1
                tqdm.write(f"failed: {r['path']}: {r['error']}")
        bar.update(len(batch))
    bar.close()
    if shard.distributed:
        shard.barrier()  # every process has captioned its batches
        if shard.is_main:
            _merge_parts(out, shard, [k for k, _ in todo], args.batch_size)
    dt = time.time() - t0
    print(f'done: {n_ok} captioned, {n_fail} failed, {len(paths) - len(todo)} skipped in {dt:.1f} s '
          f'({dt / max(1, n_ok + n_fail):.2f} s/image) -> {out}')
    return 0


def _merge_parts(out: Path, shard, keys: List[str], batch_size: int = 0) -> None:
    """Append the records of the part files of ``out`` (dalpsr.utils.sharding) to ``out`` and remove
    the parts. Records are ordered by the batch of their key in ``keys`` (``batch_size`` > 0: the
    order one process writes; else key order), file order within a batch; a record already in
    ``out`` verbatim (a merge interrupted after its rename) is not repeated. Atomic rewrite."""
    import json

    from dalpsr.captioning.captions import read_caption_records
    from dalpsr.utils.misc import atomic_write_text
    parts = shard.part_files(out)
    if not parts:
        return
    rank = {k: (i // batch_size if batch_size else i) for i, k in enumerate(keys)}
    old = read_caption_records(out) if out.exists() else []
    seen = {json.dumps(r, sort_keys=True) for r in old}
    new = [r for p in parts for r in read_caption_records(p)]
    new = sorted((r for r in new if json.dumps(r, sort_keys=True) not in seen),
                 key=lambda r: rank.get(r['key'], len(rank)))
    text = ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in old + new)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    for p in parts:
        p.unlink()


def _caption_batch(pipe, images: List) -> List:
    """Results per image; when the batch fails, retry one by one so one bad image fails alone."""
    if not images:
        return []
    try:
        return pipe(images)
    except Exception:  # noqa: BLE001
        if len(images) == 1:
            import traceback
            err = sys.exc_info()[1]
            traceback.print_exc(limit=1, file=sys.stderr)
            return [err]
    out = []
    for img in images:
        try:
            out += pipe([img])
        except Exception as err:  # noqa: BLE001
            out.append(err)
    return out


if __name__ == '__main__':
    sys.exit(main())
