"""The test run: every test set through one restorer, with records, metrics and resumability.

:func:`test` resolves the options, builds the method's restorer (cheap: weights load on its
first ``restore``), decides the result folder (resume / refuse / archive), prepares the prompts
the restorer ``needs`` and restores the images to do in batches of one LR size, writing each
output atomically with its record. The same for every method; see dalpsr/test.py for the
command line and docs/inference.md for the guide.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from dalpsr.inference.inputs import InputRejected, gt_key, list_set_images, load_lr, read_gt
from dalpsr.inference.options import batch_size, device as resolve_device, fingerprint_payload, image_seed, \
    method_class, resolve_test_opt
from dalpsr.inference.prompts import PromptModels, fill_captions, fill_restoration
from dalpsr.inference.results import RECORDS, TestSet, check_inputs, peak_memory, prepare_results, progress, \
    reject, summarize_set
from dalpsr.inference.sharded import local_device, merge_records, share, units
from dalpsr.utils.experiment import library_versions
from dalpsr.utils.misc import atomic_write_json, atomic_write_text, get_time_str, read_jsonl
from dalpsr.utils.options import dump_options
from dalpsr.utils.sharding import Shard, current_shard

logger = logging.getLogger('dalpsr')
#: record keys a restorer's last_stats may not overwrite
_RESERVED = {'key', 'lr_path', 'lr_size', 'seed', 'status', 'message', 'output', 'sr_size', 'notes', 'seconds',
             'batch', 'metrics', 'caption', 'restoration_prompt', 'device', 'time'}


def build_method(opt: Dict[str, Any], device: str):
    """The restorer of ``opt['method']`` with the option blocks it reads and ``device``."""
    from dalpsr.utils.registry import RESTORER_REGISTRY
    cls = method_class(opt, opt['_source'])
    blocks = {b: opt[b] for b in getattr(cls, 'option_blocks', ())}
    return RESTORER_REGISTRY.build(opt['method'], f"method in {opt['_source']}", device=device, **blocks)


def test(opt: Dict[str, Any], force: Optional[bool] = None) -> Dict[str, Any]:
    """Run every test set of ``opt``. Returns ``{'dir': Path, 'sets': {name: summary}}``.
    Raises OptionError / FileNotFoundError / FileExistsError with one-line messages."""
    from dalpsr.utils.logger import get_root_logger
    if force is None:
        force = bool((opt.get('_args') or {}).get('force', False))
    opt = resolve_test_opt(opt)
    shard = current_shard()
    device = local_device(resolve_device(opt['model']['device']), shard)
    restorer = build_method(opt, device)
    payload = fingerprint_payload(opt, restorer.describe(), getattr(restorer, 'option_blocks', ()))
    for key, block in opt['datasets'].items():  # check the inputs exist before touching the results folder
        if not Path(block['dataroot_lq']).is_dir():
            raise FileNotFoundError(f"datasets.{key}.dataroot_lq: folder not found: {block['dataroot_lq']}")
    out = Path(opt['path']['results_root']) / opt['name']
    refused = None
    if shard.is_main:  # only the main process decides (resume / refuse / archive) the folder
        try:
            out = prepare_results(opt, payload, force)
        except FileExistsError as err:
            refused = str(err)
    refused = share(shard, refused)
    if refused:
        raise FileExistsError(refused if shard.is_main else f'the main process refused the folder: {refused}')
    get_root_logger('dalpsr')
    handler = logging.FileHandler(out / 'test.log', mode='a', encoding='utf-8')
    rank = f'[{shard.rank}/{shard.world_size}] ' if shard.distributed else ''
    handler.setFormatter(logging.Formatter(f'%(asctime)s %(levelname)s: {rank}%(message)s'))
    logger.addHandler(handler)
    try:
        return _run(opt, restorer, payload, out, device, shard)
    finally:
        logger.removeHandler(handler)
        handler.close()


def _run(opt: Dict[str, Any], restorer, payload: Dict[str, Any], out: Path, device: str,
         shard: Shard) -> Dict[str, Any]:
    import torch
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    sets = _prepare_sets(opt, restorer, out, device, shard)
    metric_set, metric_info = _metric_set(opt, sets, shard)
    for ts in sets:
        restore_set(ts, restorer, opt, metric_set, device, shard)
    shard.barrier()  # every process has written its records
    if not shard.is_main:
        return {'dir': out, 'sets': {}}
    results = {}
    for ts in sets:
        _merge(ts)
        results[ts.name] = _finish_set(ts, metric_info, payload)
    atomic_write_json(out / 'summary.json', {'name': opt['name'], 'sets': results, 'finished': get_time_str()})
    return {'dir': out, 'sets': results}


def _merge(ts: TestSet) -> None:
    """The main process folds the record part files of ``ts`` (this or a killed run) into records.jsonl."""
    records = ts.dir / RECORDS
    if merge_records(records, [k for k, _ in ts.images]) or ts.records_file != records:
        ts.records_file = records
        ts.records = {r['key']: r for r in read_jsonl(records)} if records.is_file() else {}


def _prepare_sets(opt: Dict[str, Any], restorer, out: Path, device: str, shard: Shard) -> List[TestSet]:
    """Main process: input rules and prompts of every set (once); every process gets the result."""
    needs = set(restorer.needs)
    shared = None
    if shard.is_main:
        atomic_write_text(out / 'options.yml', dump_options(opt))
        note = (getattr(restorer, 'meta', None) or {}).get('note')
        procs = f', {shard.world_size} processes' if shard.distributed else ''
        logger.info(f"test {opt['name']} -> {out} (device {device}, method {opt['method']['type']}{procs})"
                    f"{' [' + note + ']' if note else ''}")
        if 'restoration' in needs and opt['irpad']['source'] == 'none':
            logger.warning('the model was trained with restoration prompts but irpad.source is none: p_r stays empty')
        for block in opt['datasets'].values():  # records of a killed sharded run first, in image order
            images, _ = list_set_images(Path(block['dataroot_lq']), bool(opt['test']['recursive']))
            merge_records(out / block['name'] / RECORDS, [k for k, _ in images])
        sets = [TestSet(k, b, out, opt) for k, b in opt['datasets'].items()]
        for ts in sets:
            logger.info(f'[{ts.name}] {len(ts.images)} images ({ts.resumed} already done, {len(ts.todo)} to do'
                        f"{f', {ts.ignored} non-image files ignored' if ts.ignored else ''})")
            check_inputs(ts, opt['test'])
        models = PromptModels(opt, device)
        for ts in sets:  # stage by model so only one large model needs to be resident at a time
            fill_captions(ts, models, opt, 'caption' in needs)
        if opt['captioner']['free_after_use']:
            models.free('captioner')
        for ts in sets:
            fill_restoration(ts, models, opt, 'restoration' in needs)
        models.free('irpad')
        shared = [(units(ts.todo, batch_size(opt), ts.shapes), ts.captions, ts.restoration, ts.notes)
                  for ts in sets]
    shared = share(shard, shared)
    if not shard.is_main:
        sets = [TestSet(k, b, out, opt) for k, b in opt['datasets'].items()]
    for ts, (batches, captions, restoration, notes) in zip(sets, shared):
        ts.units, ts.captions, ts.restoration, ts.notes = batches, captions, restoration, notes
        ts.todo = [item for unit in batches for item in unit]
        ts.records_file = shard.part_path(ts.records_file)
    return sets


def _metric_set(opt: Dict[str, Any], sets: List[TestSet], shard: Optional[Shard] = None):
    if not (opt['metrics']['names'] and any(ts.gt and ts.todo for ts in sets)):
        return None, None
    from dalpsr.metrics.iqa import MetricSet
    mt = opt['metrics']
    dev = local_device(resolve_device(mt['device']), shard or Shard())  # this process's GPU when sharded
    ms = MetricSet(mt['names'], device=dev, weights_dir=mt['weights_dir'],
                   crop_border=int(mt['crop_border']), seed=opt['seed'], options=mt['options'], logger=logger)
    return ms, ms.describe()


def _finish_set(ts: TestSet, metric_info, payload: Dict[str, Any]) -> Dict[str, Any]:
    info = metric_info
    if info is None and (ts.dir / 'summary.json').is_file():  # nothing scored now: keep the earlier record
        info = json.loads((ts.dir / 'summary.json').read_text(encoding='utf-8')).get('metric_info')
    summary = summarize_set(ts, info)
    summary.update(versions=library_versions(), options=payload, finished=get_time_str())
    atomic_write_json(ts.dir / 'summary.json', summary)
    means = ', '.join(f"{k} {v['mean']:.4f}" for k, v in summary['metrics'].items())
    sec = summary['seconds_per_image']
    timing = f"; {sec['mean']:.2f} s/img" if sec else ''
    logger.info(f"[{ts.name}] ok {summary['ok']}/{summary['images']} (skipped {summary['skipped']}, failed "
                f"{summary['failed']}){'; ' + means if means else ''}{timing}")
    return summary


def _next_batch(ts: TestSet, todo: List[Tuple[str, Path]], i: int, size: int, rules: Dict[str, Any], bar):
    """Consecutive images of one LR size from ``todo[i:]`` -> (batch [(key, path, img)], next i)."""
    batch = []
    while i < len(todo) and len(batch) < size:
        key, path = todo[i]
        try:
            img, _ = load_lr(path, rules)
        except InputRejected as err:  # changed on disk since the check
            reject(ts, key, path, err)
            i += 1
            bar.update(1)
            continue
        if batch and img.shape != batch[0][2].shape:
            break
        batch.append((key, path, img))
        i += 1
    return batch, i


def restore_set(ts: TestSet, restorer, opt: Dict[str, Any], metric_set, device: str,
                shard: Optional[Shard] = None) -> None:
    """Restore this process's units of the images still to do of one set (``ts.units``, the batches
    of consecutive images of one LR size one process would make), with records."""
    shard = shard or Shard()
    mine = shard.take(ts.units or units(ts.todo, batch_size(opt), ts.shapes))
    if not mine:
        return
    bar = progress(sum(map(len, mine)), f'{ts.name}: SR', opt['test']['progress_bar'])
    if shard.distributed:
        logger.info(f'[{ts.name}] process {shard.rank} of {shard.world_size}: {sum(map(len, mine))} images')
    for unit in mine:
        _restore_unit(ts, unit, restorer, opt, metric_set, device, bar)
    bar.close()


def _restore_unit(ts: TestSet, todo: List[Tuple[str, Path]], restorer, opt: Dict[str, Any], metric_set,
                  device: str, bar) -> None:
    import torch

    from dalpsr.utils.img_io import img2tensor
    i = 0
    while i < len(todo):
        batch, i = _next_batch(ts, todo, i, batch_size(opt), opt['test'], bar)
        if not batch:
            continue
        keys = [b[0] for b in batch]
        seeds = [image_seed(opt['seed'], k) for k in keys]
        lq = torch.stack([img2tensor(b[2]) for b in batch])
        if device.startswith('cuda'):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            sr = restorer.restore(lq, seeds=seeds, captions=[ts.captions.get(k, '') for k in keys],
                                  restoration=[ts.restoration.get(k, '') for k in keys])
            if device.startswith('cuda'):
                torch.cuda.synchronize()
            err_msg = None
        except Exception as err:  # noqa: BLE001 - e.g. out of memory on one huge image
            err_msg = f'{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ""}'
            sr = None
            if device.startswith('cuda'):
                torch.cuda.empty_cache()
        dt = (time.perf_counter() - t0) / len(batch)
        mem, mem_kind = peak_memory(device)
        stats = dict(restorer.last_stats or {}) if sr is not None else {}
        for j, (key, path, img) in enumerate(batch):
            rec = {'key': key, 'lr_path': str(path), 'lr_size': list(img.shape[:2]), 'seed': seeds[j],
                   'caption': ts.captions.get(key, ''), 'restoration_prompt': ts.restoration.get(key, ''),
                   'notes': ts.notes.get(key, []), 'seconds': round(dt, 4), 'batch': len(batch),
                   'peak_mem_mb': round(mem, 1), 'peak_mem_kind': mem_kind, 'device': device, 'time': get_time_str()}
            if sr is None:
                rec.update(status='failed', message=f'{path}: restoring failed: {err_msg}')
                logger.warning(f'[{ts.name}] {rec["message"]}')
                ts.record(rec)
                continue
            _add_stats(rec, stats, j, len(batch))
            _write_output(ts, key, rec, sr[j], metric_set, opt)
        bar.update(len(batch))
        bar.set_postfix_str(f'{dt:.2f} s/img')


def _add_stats(rec: Dict[str, Any], stats: Dict[str, Any], j: int, n: int) -> None:
    """A restorer's last_stats into image ``j``'s record (times of the batch per image)."""
    for k, v in stats.items():
        if k == 'notes':
            rec['notes'] = rec['notes'] + list(v)
        elif k == 'per_image':
            rec.update({kk: vv for kk, vv in v[j].items() if kk not in _RESERVED})
        elif k not in _RESERVED and isinstance(v, (int, float)) and not isinstance(v, bool):
            rec[k] = round(v / n, 4) if k.endswith('_s') else v


def _write_output(ts: TestSet, key: str, rec: Dict[str, Any], out, metric_set, opt: Dict[str, Any]) -> None:
    """Write one SR image atomically, score it against its GT, append its record."""
    from dalpsr.utils.img_io import img2tensor, read_image, tensor2img, write_image
    out_path = ts.output_path(key)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_image(out_path, tensor2img(out))
    rec.update(status='ok', message='', output=str(out_path), sr_size=list(out.shape[-2:]))
    gt_path = ts.gt.get(gt_key(key))
    if metric_set is not None:
        gt = None
        if gt_path is not None:
            rec['gt_path'] = str(gt_path)
            gt, why = read_gt(gt_path, tuple(out.shape[-2:]), bool(opt['test']['gt_modcrop']))
            if why:
                rec['notes'] = rec['notes'] + [why]
                logger.warning(f'[{ts.name}] {key}: {why}')
        elif ts.block['dataroot_gt']:
            rec['notes'] = rec['notes'] + ['no GT with this key']
        # the saved (8-bit) image is what is scored, as scripts/iqa.py would
        saved = img2tensor(read_image(out_path))[None]
        rec['metrics'] = metric_set.compute(saved, img2tensor(gt)[None] if gt is not None else None)
    ts.record(rec)
