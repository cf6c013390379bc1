"""Prompts every method may ask for (``Restorer.needs``), prepared before restoring and cached.

* semantic prompt p_s (``caption``): the set's ``caption_file`` (C6 JSONL, by key or SHA-1), else
  the cache ``<set>/captions.jsonl``, else computed by the ``captioner`` (none | ram | llava |
  ram+llava) and appended to the cache (resumable);
* restoration prompt p_r (``restoration``): the cache ``<set>/restoration.jsonl``, the set's
  ``restoration_file`` (``irpad.source: file``) or IRPAD on the LR (``irpad.source: irpad``).

Models are built only when an image needs them, one at a time.
"""
from __future__ import annotations

import gc
import logging
from typing import Any, Dict

from dalpsr.inference.inputs import load_lr
from dalpsr.inference.options import device as _device
from dalpsr.inference.results import TestSet, progress
from dalpsr.utils.misc import append_jsonl, read_jsonl
from dalpsr.utils.options import OptionError

logger = logging.getLogger('dalpsr')


class PromptModels:
    """Builds the captioner / IRPAD on first use (and frees them on request)."""

    def __init__(self, opt: Dict[str, Any], device: str):
        self.opt, self.device = opt, device
        self._captioner = self._irpad = None

    def captioner(self):
        if self._captioner is None:
            from dalpsr.captioning.captions import DEFAULT_INSTRUCTION, DEFAULT_INSTRUCTION_NO_TAGS
            from dalpsr.captioning.pipeline import CaptionPipeline
            c = self.opt['captioner']
            self._captioner = CaptionPipeline(c['mode'], c['tagger'], c['tagger_opts'] or {}, c['llava_opts'] or {},
                                              c['instruction'] or DEFAULT_INSTRUCTION,
                                              c['instruction_no_tags'] or DEFAULT_INSTRUCTION_NO_TAGS,
                                              device=_device(c['device'] or self.device), dtype=c['dtype'])
            logger.info(f"captioner: {c['mode']} ({self._captioner.models})")
        return self._captioner

    def irpad(self):
        if self._irpad is None:
            from dalpsr.models.irpad_model import IRPADPredictor
            ir = self.opt['irpad']
            self._irpad = IRPADPredictor.from_pretrained(str(ir['path']), device=_device(ir['device'] or self.device))
            logger.info(f"IRPAD: {ir['path']}")
        return self._irpad

    def free(self, which: str) -> None:
        setattr(self, f'_{which}', None)
        gc.collect()
        try:
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass


def fill_captions(ts: TestSet, models: PromptModels, opt: Dict[str, Any], use_caption: bool) -> None:
    """p_s for every image to do: caption_file, then the cache, then the captioner ('' if none)."""
    if not use_caption or not ts.todo:
        return
    from dalpsr.captioning.captions import file_sha1, latest_records, load_captions, make_record
    given = load_captions(ts.block['caption_file']) if ts.block['caption_file'] else {}
    cache = ts.dir / 'captions.jsonl'
    cached = {k: r for k, r in latest_records(read_jsonl(cache)).items() if r.get('error') is None} \
        if cache.is_file() else {}
    need = []
    for key, path in ts.todo:
        if key in given:
            ts.captions[key] = given[key]
        elif key in cached:
            ts.captions[key] = cached[key].get('description') or ''
        else:
            sha = file_sha1(path)
            if sha in given:
                ts.captions[key] = given[sha]
            else:
                need.append((key, path, sha))
    mode = opt['captioner']['mode']
    if not need:
        return
    if mode == 'none':
        if ts.block['caption_file']:
            logger.warning(f"[{ts.name}] {len(need)} image(s) have no caption in {ts.block['caption_file']} and "
                           "captioner.mode is none: their p_s is empty")
        for key, _, _ in need:
            ts.captions[key] = ''
        return
    pipe = models.captioner()
    bs = max(1, int(opt['captioner']['batch_size']))
    bar = progress(len(need), f'{ts.name}: captions', opt['test']['progress_bar'])
    for i in range(0, len(need), bs):
        chunk = need[i:i + bs]
        imgs = [load_lr(p, opt['test'])[0] for _, p, _ in chunk]
        try:
            res = pipe(imgs)
        except Exception:  # noqa: BLE001 - retry one by one so one bad image fails alone
            res = []
            for img in imgs:
                try:
                    res += pipe([img])
                except Exception as err:  # noqa: BLE001
                    res.append(err)
        for (key, path, sha), r in zip(chunk, res):
            if isinstance(r, Exception):
                msg = f'{type(r).__name__}: {str(r).splitlines()[0] if str(r) else ""}'
                logger.warning(f'[{ts.name}] caption failed for {path}: {msg} (p_s left empty)')
                append_jsonl(cache, make_record(key, str(path), sha, models=pipe.models, error=msg))
                ts.captions[key] = ''
                ts.notes.setdefault(key, []).append('caption failed')
            else:
                append_jsonl(cache, make_record(key, str(path), sha, r['tags'], r['description'], pipe.models,
                                                r['instruction']))
                ts.captions[key] = r['description']
        bar.update(len(chunk))
    bar.close()


def fill_restoration(ts: TestSet, models: PromptModels, opt: Dict[str, Any], use_restoration: bool) -> None:
    """p_r for every image to do: the cache, the set's restoration_file or IRPAD ('' if none)."""
    src = opt['irpad']['source']
    if not use_restoration or src == 'none' or not ts.todo:
        for key, _ in ts.todo:
            ts.restoration[key] = ''
        return
    cache = ts.dir / 'restoration.jsonl'
    cached = {r['key']: r['prompt'] for r in read_jsonl(cache)} if cache.is_file() else {}
    given: Dict[str, str] = {}
    if src == 'file':
        if not ts.block['restoration_file']:
            raise OptionError(f'irpad.source: file needs datasets.{ts.key}.restoration_file (JSONL lines '
                              '{"key": ..., "prompt": ...} or {"key": ..., "labels": [..]})')
        from dalpsr.inference.prompt_spec import model_spec
        spec = model_spec(opt['model'].get('path'))[0]  # labels are written in the model's spec
        if spec is None:
            from dalpsr.data.prompt_labels import PromptSpec
            spec = PromptSpec()
        for r in read_jsonl(ts.block['restoration_file']):
            if 'prompt' in r:
                given[str(r['key'])] = str(r['prompt'])
            elif 'labels' in r:
                given[str(r['key'])] = spec.prompt([int(v) for v in r['labels']])
    need = []
    for key, path in ts.todo:
        if key in cached:
            ts.restoration[key] = cached[key]
        elif src == 'file':
            if key not in given:
                logger.warning(f"[{ts.name}] {key}: no line in {ts.block['restoration_file']} (p_r left empty)")
                ts.notes.setdefault(key, []).append('no restoration prompt')
            ts.restoration[key] = given.get(key, '')
        else:
            need.append((key, path))
    if not need:
        return
    import torch

    from dalpsr.utils.img_io import img2tensor
    pred = models.irpad()
    bar = progress(len(need), f'{ts.name}: IRPAD', opt['test']['progress_bar'])
    for key, path in need:
        img, _ = load_lr(path, opt['test'])
        try:
            with torch.no_grad():
                labels = pred.predict_labels(img2tensor(img)[None])[0].tolist()
            prompt = pred.spec.prompt(labels)
            append_jsonl(cache, {'key': key, 'path': str(path), 'labels': labels, 'prompt': prompt,
                                 'source': str(opt['irpad']['path'])})
        except Exception as err:  # noqa: BLE001 - one image must not stop the run
            logger.warning(f'[{ts.name}] IRPAD failed for {path}: {type(err).__name__}: {err} (p_r left empty)')
            ts.notes.setdefault(key, []).append('IRPAD failed')
            prompt = ''
        ts.restoration[key] = prompt
        bar.update(1)
    bar.close()


