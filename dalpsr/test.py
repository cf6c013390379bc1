#!/usr/bin/env python
"""DaLPSR inference over test sets (paper IV-B): LR folders of any size -> SR images + metrics.

Run::

    python dalpsr/test.py -opt options/test/test_dalpsr_sd21.yml [--set sampler.num_steps=20] [--force]

In Python (tests): ``from dalpsr.test import test; test(opt)`` with ``opt`` from
``dalpsr.utils.options.load_options(path, is_train=False)`` (or a plain dict).

Options: options/reference/test.yml documents every key; guide: docs/inference.md.

What happens, per run ``results/<name>/`` (``path.results_root``):

1. Each test set (``datasets.<set>``: ``dataroot_lq``, optional ``dataroot_gt``,
   ``caption_file``, ``restoration_file``) is scanned; every LR file is checked against the
   input rules below. A file that breaks a rule is recorded (``status`` skipped/failed and a
   one-line ``message``) and never stops the other images.
2. Semantic prompts p_s: from the set's ``caption_file`` (C6 JSONL, by key or SHA-1), else
   computed by the ``captioner`` (none | ram | llava | ram+llava) and cached in
   ``<set>/captions.jsonl`` (resumable). Models are built only if an image needs them.
3. Restoration prompts p_r: IRPAD on the LR (``irpad.source: irpad``), the set's
   ``restoration_file`` (``file``) or none; cached in ``<set>/restoration.jsonl``.
4. Sampling (dalpsr.pipelines.DaLPSRSampler) with the prompt composed as at training
   (``dalpsr.json``'s prompt options, ``sampler.added_prompt``), one seed per image derived
   from ``seed`` and the image key (results do not depend on batch composition or order).
5. ``<set>/<key>.png`` written atomically; one JSON line per image in ``<set>/records.jsonl``
   (status, message, prompt, seed, seconds, peak memory, metrics); ``<set>/summary.json`` and
   ``results/<name>/summary.json`` (means, counts, options). With GT, the metrics of
   ``metrics.names`` are computed on the fly (dalpsr.metrics.iqa.MetricSet).

A rerun with the same options skips finished images (output file + ok record). An existing
``results/<name>`` made with different options is refused (naming the changed keys), or
archived with a timestamp with ``--force``; it is never overwritten silently.

Input rules (LR files; ``test.*`` options):

==================  =========================================================================
input               rule
==================  =========================================================================
not an image name   ignored (suffix not in dalpsr.utils.misc.IMG_EXTENSIONS), counted in the log
corrupt / not image status failed, message names the file and the decoder's complaint
grayscale           replicated to RGB (output is RGB)               note ``gray->rgb``
gray+alpha / RGBA   composited onto white (alpha dropped)           note ``alpha->white``
16-bit              scaled to [0,1] at full precision, output 8-bit note ``16bit->8bit output``
tiny                short side < ``test.min_size`` (16): status skipped
huge                h*w > ``test.max_lr_pixels`` (2048*2048): skipped, or with
                    ``test.huge: resize`` downscaled (area) to fit, note ``resized HxW->hxw``
same stem twice     (a.png, a.jpg) the later file's key becomes ``a_jpg``
==================  =========================================================================
"""
from __future__ import annotations

import os
import sys

if __name__ == '__main__' and not __package__:  # run as a plain script: import the package, not siblings
    _here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or '.') == _here:
        sys.path.pop(0)
    _root = os.path.dirname(_here)
    if _root not in sys.path:
        sys.path.insert(0, _root)

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Dict, List, Optional, Tuple  # noqa: E402

import numpy as np  # noqa: E402

from dalpsr.utils.misc import (append_jsonl, atomic_write_json, atomic_write_text, get_time_str,  # noqa: E402
                               mkdir_and_rename, read_jsonl, scan_images)
from dalpsr.utils.options import OptionError, check_keys, dump_options, load_options  # noqa: E402

logger = logging.getLogger('dalpsr')

#: Defaults of every block test.py reads (each key is documented in options/reference/test.yml).
TEST_DEFAULTS: Dict[str, Any] = {
    'seed': 0,
    'path': {'results_root': 'results'},
    'model': {'path': None, 'sd': None, 'device': 'auto', 'dtype': 'auto', 'vae_dtype': None,
              'vae_fp32_fallback': True, 'channels_last': False, 'compile': False, 'max_chunks': None},
    'sampler': {'start': 'lr', 'start_step': 999, 'scheduler': 'ddpm', 'num_steps': 50, 'guidance_scale': 5.5,
                'negative_prompt': 'dotted, noise, blur, lowres, smooth',
                'added_prompt': 'clean, high-resolution, 8k', 'conditioning_scale': 1.0,
                'noise_guidance_steps': 1, 'scheduler_overrides': None, 'color_fix': 'adain', 'prompt': None,
                'tile': None, 'batch_size': 1},
    'irpad': {'source': 'irpad', 'path': 'pretrained_models/irpad', 'device': None},
    'captioner': {'mode': 'none', 'tagger': 'ram', 'tagger_opts': None, 'llava_opts': None,
                  'instruction': None, 'instruction_no_tags': None, 'batch_size': 4, 'device': None,
                  'dtype': 'auto', 'free_after_use': True},
    'metrics': {'names': ['psnr', 'ssim'], 'crop_border': 4, 'device': 'auto', 'weights_dir': None,
                'options': None},
    'test': {'min_size': 16, 'max_lr_pixels': 2048 * 2048, 'huge': 'skip', 'recursive': False, 'ext': 'png',
             'progress_bar': True, 'gt_modcrop': True},
}
DATASET_KEYS = ('name', 'dataroot_lq', 'dataroot_gt', 'caption_file', 'restoration_file')
TOP_KEYS = ('name', 'seed', 'path', 'model', 'sampler', 'irpad', 'captioner', 'metrics', 'test', 'datasets',
            'imports', 'manual_seed', 'is_train')
IRPAD_SOURCES = ('irpad', 'file', 'none')
#: Keys left out of the options fingerprint (they do not change the pixels of an output).
NON_OUTPUT_KEYS = {'model': ('device', 'compile'), 'sampler': ('batch_size',), 'irpad': ('device',),
                   'captioner': ('device', 'batch_size', 'free_after_use'), 'test': ('progress_bar',)}
RUN_FILE = 'run.json'
RECORDS = 'records.jsonl'


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------
def _merge(defaults: Dict[str, Any], block: Optional[Dict[str, Any]], where: str) -> Dict[str, Any]:
    out = copy.deepcopy(defaults)
    if block is None:
        return out
    if not isinstance(block, dict):
        raise OptionError(f'{where} must be a mapping, got {type(block).__name__}')
    check_keys(block, defaults, where)
    out.update(copy.deepcopy(block))
    return out


def resolve_test_opt(opt: Dict[str, Any]) -> Dict[str, Any]:
    """Fill defaults, check every key and value; returns a new dict (``opt`` is not changed)."""
    src = opt.get('_source', 'the options')
    check_keys(opt, TOP_KEYS, f'top level of {src} (test.py)')
    if not opt.get('name'):
        raise OptionError(f"missing required key 'name' in {src}")
    res: Dict[str, Any] = {'name': str(opt['name']), '_source': src, 'imports': list(opt.get('imports') or [])}
    seed = opt.get('seed', 0)
    if not isinstance(seed, int):
        raise OptionError(f"'seed' must be an integer in {src}, got {seed!r}")
    res['seed'] = seed
    for block in ('path', 'model', 'sampler', 'irpad', 'captioner', 'metrics', 'test'):
        res[block] = _merge(TEST_DEFAULTS[block], opt.get(block), f'{block} block of {src}')
    m, s, ir, cap, te = res['model'], res['sampler'], res['irpad'], res['captioner'], res['test']
    if not m['path']:
        raise OptionError(f"missing required key 'model.path' in {src} (a DaLPSR export folder: controlnet/ + "
                          'dalpsr.json)')
    modes = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')
    if not isinstance(m['compile'], bool) and m['compile'] not in modes:
        raise OptionError(f"model.compile must be true, false or one of {', '.join(modes)} in {src}, "
                          f"got {m['compile']!r}")
    from dalpsr.pipelines.sampler import START_MODES
    from dalpsr.utils.color_fix import COLOR_FIX_MODES
    if s['start'] not in START_MODES:
        raise OptionError(f"sampler.start must be one of {', '.join(START_MODES)} in {src}, got {s['start']!r}")
    if s['color_fix'] not in COLOR_FIX_MODES:
        raise OptionError(f"sampler.color_fix must be one of {', '.join(COLOR_FIX_MODES)} in {src}, "
                          f"got {s['color_fix']!r}")
    for key, lo in (('num_steps', 1), ('batch_size', 1), ('start_step', 0), ('noise_guidance_steps', 0)):
        if not isinstance(s[key], int) or s[key] < lo:
            raise OptionError(f'sampler.{key} must be an integer >= {lo} in {src}, got {s[key]!r}')
    for key in ('guidance_scale', 'conditioning_scale'):
        if not isinstance(s[key], (int, float)) or isinstance(s[key], bool):
            raise OptionError(f'sampler.{key} must be a number in {src}, got {s[key]!r}')
    try:
        from dalpsr.pipelines.sampler import TileOptions
        TileOptions.from_opt(s['tile'])
    except ValueError as err:
        raise OptionError(f'sampler.tile in {src}: {err}') from None
    from dalpsr.pipelines.schedulers import SCHEDULERS, canonical_name
    if canonical_name(str(s['scheduler'])) not in SCHEDULERS:
        raise OptionError(f"sampler.scheduler in {src}: unknown '{s['scheduler']}' (use one of "
                          f"{', '.join(SCHEDULERS)})")
    if ir['source'] not in IRPAD_SOURCES:
        raise OptionError(f"irpad.source must be one of {', '.join(IRPAD_SOURCES)} in {src}, got {ir['source']!r}")
    if ir['source'] == 'irpad' and not ir['path']:
        raise OptionError(f"irpad.source: irpad needs irpad.path (an IRPAD export folder) in {src}")
    from dalpsr.captioning.pipeline import CAPTIONER_MODES
    if cap['mode'] not in CAPTIONER_MODES:
        raise OptionError(f"captioner.mode must be one of {', '.join(CAPTIONER_MODES)} in {src}, "
                          f"got {cap['mode']!r}")
    if te['huge'] not in ('skip', 'resize'):
        raise OptionError(f"test.huge must be 'skip' or 'resize' in {src}, got {te['huge']!r}")
    for key in ('min_size', 'max_lr_pixels'):
        if not isinstance(te[key], int) or te[key] < 1:
            raise OptionError(f'test.{key} must be an integer >= 1 in {src}, got {te[key]!r}')
    te['ext'] = str(te['ext']).lower().lstrip('.')
    if te['ext'] not in ('png', 'jpg', 'jpeg', 'bmp', 'tif', 'tiff', 'webp'):
        raise OptionError(f"test.ext must be an image format (png, jpg, bmp, tif, webp) in {src}, got {te['ext']!r}")
    mt = res['metrics']
    if isinstance(mt['names'], str):
        mt['names'] = [mt['names']]
    mt['names'] = list(mt['names'] or [])
    sets = opt.get('datasets')
    if not isinstance(sets, dict) or not sets:
        raise OptionError(f"missing required block 'datasets' in {src} (one or more test sets: "
                          '{set_name: {dataroot_lq: folder, dataroot_gt: optional}})')
    res['datasets'] = {}
    for key, block in sets.items():
        where = f'datasets.{key} in {src}'
        if not isinstance(block, dict):
            raise OptionError(f'{where} must be a mapping')
        check_keys(block, DATASET_KEYS, where)
        if not block.get('dataroot_lq'):
            raise OptionError(f"missing required key 'dataroot_lq' in {where}")
        d = {k: block.get(k) for k in DATASET_KEYS}
        d['name'] = str(d['name'] or key)
        if not d['name'] or '/' in d['name'] or d['name'] in ('.', '..'):
            raise OptionError(f'{where}: name {d["name"]!r} is not a folder name')
        res['datasets'][key] = d
    names = [d['name'] for d in res['datasets'].values()]
    if len(set(names)) != len(names):
        raise OptionError(f'two test sets share an output name in {src}: {names}')
    return res


def fingerprint_payload(opt: Dict[str, Any], meta: Dict[str, Any]) -> Dict[str, Any]:
    """The options that change output pixels, plus the model's dalpsr.json."""
    out: Dict[str, Any] = {'seed': opt['seed'], 'dalpsr_json': meta}
    for block in ('model', 'sampler', 'irpad', 'captioner', 'test'):
        out[block] = {k: v for k, v in opt[block].items() if k not in NON_OUTPUT_KEYS.get(block, ())}
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def _changed_keys(a: Any, b: Any, prefix: str = '') -> List[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _changed_keys(a.get(k), b.get(k), f'{prefix}.{k}' if prefix else str(k))
        return out
    return [] if a == b else [prefix or '<root>']


def image_seed(seed: int, key: str) -> int:
    """Seed of one image: depends only on the run ``seed`` and the image key (31 bits)."""
    h = hashlib.sha256(f'{int(seed)}/{key}'.encode('utf-8')).digest()
    return int.from_bytes(h[:4], 'big') & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
class InputRejected(Exception):
    """An LR file that breaks an input rule; ``status`` is 'skipped' or 'failed'."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def _header_size(path: Path) -> Optional[Tuple[int, int]]:
    """(h, w) from the file header without decoding the pixels (None if PIL cannot tell)."""
    try:
        from PIL import Image
        Image.MAX_IMAGE_PIXELS = None
        with Image.open(path) as im:
            w, h = im.size
        return int(h), int(w)
    except Exception:  # noqa: BLE001 - the decoder below gives the real message
        return None


def _quiet_decode(data: np.ndarray):
    """cv2.imdecode without OpenCV's own stderr lines for broken files (our message names the file)."""
    import cv2
    log = getattr(getattr(cv2, 'utils', None), 'logging', None)
    level = log.getLogLevel() if log is not None else None
    if log is not None:
        log.setLogLevel(log.LOG_LEVEL_SILENT)
    try:
        return cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    finally:
        if log is not None:
            log.setLogLevel(level)


def load_lr(path: Path, rules: Dict[str, Any]) -> Tuple[np.ndarray, List[str]]:
    """Read an LR file with the input rules (module doc) -> (RGB float32 HxWx3 in [0,1], notes).

    Raises :class:`InputRejected` (status + one-line message) for corrupt/tiny/huge inputs.
    """
    import cv2

    from dalpsr.utils.img_io import ImageReadError, to_rgb_float
    max_px, min_size = int(rules['max_lr_pixels']), int(rules['min_size'])
    hw = _header_size(path)
    if hw is not None and hw[0] * hw[1] > max_px and rules['huge'] == 'skip':
        raise InputRejected('skipped', f'{path}: {hw[0]}x{hw[1]} LR exceeds test.max_lr_pixels={max_px} '
                                       '(skipped; set test.huge: resize to downscale it, or raise the limit)')
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as err:
        raise InputRejected('failed', f'{path}: unreadable ({err.strerror or err})') from None
    if data.size == 0:
        raise InputRejected('failed', f'{path}: empty file')
    raw = _quiet_decode(data)
    if raw is None:
        raise InputRejected('failed', f'{path}: not a readable image (corrupt, truncated or not an image)')
    notes = []
    ch = 1 if raw.ndim == 2 else raw.shape[2]
    if ch in (1, 2):
        notes.append('gray->rgb')
    if ch in (2, 4):
        notes.append('alpha->white')
    if raw.dtype == np.uint16:
        notes.append('16bit->8bit output')
    elif raw.dtype in (np.float32, np.float64):
        notes.append('float->clipped [0,1]')
    try:
        img = to_rgb_float(raw, str(path))
    except ImageReadError as err:
        raise InputRejected('failed', str(err)) from None
    h, w = img.shape[:2]
    if min(h, w) < min_size:
        raise InputRejected('skipped', f'{path}: {h}x{w} LR is smaller than test.min_size={min_size} px on its '
                                       'short side (skipped)')
    if h * w > max_px:
        if rules['huge'] == 'skip':
            raise InputRejected('skipped', f'{path}: {h}x{w} LR exceeds test.max_lr_pixels={max_px} (skipped; set '
                                           'test.huge: resize to downscale it, or raise the limit)')
        f = math.sqrt(max_px / (h * w))
        nh, nw = max(min_size, int(h * f)), max(min_size, int(w * f))
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
        notes.append(f'resized {h}x{w}->{nh}x{nw}')
    return np.ascontiguousarray(img, dtype=np.float32), notes


def list_set_images(root: Path, recursive: bool) -> Tuple[List[Tuple[str, Path]], int]:
    """-> ([(key, path)], number of ignored non-image files). Key: path relative to ``root``
    without suffix (posix); a repeated key (a.png + a.jpg) becomes ``a_jpg`` for the later file."""
    paths = scan_images(root, recursive=recursive)
    it = root.rglob('*') if recursive else root.iterdir()
    known = set(paths)
    others = sum(1 for p in it if p.is_file() and not p.name.startswith('.') and p not in known)
    out, seen = [], set()
    for p in paths:
        key = p.relative_to(root).with_suffix('').as_posix()
        if key in seen:
            key = f'{key}_{p.suffix.lstrip(".").lower()}'
            n = 2
            while key in seen:
                key, n = f'{key}{n}', n + 1
        seen.add(key)
        out.append((key, p))
    return out, others


def gt_index(gt_root: Optional[str], recursive: bool) -> Dict[str, Path]:
    """GT key -> path; keys lose common suffixes (``_HR``, ``_x4``, ... see dalpsr.metrics.pairing)."""
    if not gt_root:
        return {}
    from dalpsr.metrics.pairing import DEFAULT_STRIP_SUFFIXES, strip_key
    root = Path(gt_root)
    out: Dict[str, Path] = {}
    for p in scan_images(root, recursive=recursive):
        rel = p.relative_to(root).with_suffix('')
        key = (rel.parent / strip_key(rel.name, DEFAULT_STRIP_SUFFIXES)).as_posix()
        out.setdefault(key, p)
    return out


def _gt_key(key: str) -> str:
    from dalpsr.metrics.pairing import DEFAULT_STRIP_SUFFIXES, strip_key
    parent, _, name = key.rpartition('/')
    name = strip_key(name, DEFAULT_STRIP_SUFFIXES)
    return f'{parent}/{name}' if parent else name


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def _device(name: Optional[str]) -> str:
    from dalpsr.utils.misc import resolve_device
    try:
        return resolve_device('auto' if name is None else name)
    except ValueError as err:
        raise OptionError(str(err)) from None


def _model_dtype(name: str, device: str) -> str:
    if name in (None, 'auto'):
        return 'fp16' if device.startswith('cuda') else 'fp32'
    return str(name)


def prepare_results(opt: Dict[str, Any], payload: Dict[str, Any], force: bool) -> Path:
    """Create or reuse ``results/<name>``: same fingerprint -> reuse (resume); different or
    unknown -> refuse, or archive with a timestamp when ``force``."""
    out = Path(opt['path']['results_root']) / opt['name']
    run_file = out / RUN_FILE
    if out.exists() and any(out.iterdir()):
        old = None
        if run_file.is_file():
            try:
                old = json.loads(run_file.read_text(encoding='utf-8')).get('fingerprint')
            except (OSError, ValueError):
                old = None
        if old != payload:
            if not force:
                if old is None:
                    why = f'it holds no {RUN_FILE} (not a dalpsr test.py result folder)'
                else:
                    changed = _changed_keys(old, payload)
                    why = f"it was made with different options ({', '.join(changed[:6])}" \
                          f"{', ...' if len(changed) > 6 else ''})"
                raise FileExistsError(f'{out} exists and {why}; refusing to mix results. Use --force to archive it '
                                      'with a timestamp, or choose another name')
            mkdir_and_rename(out, rename=True)
    out.mkdir(parents=True, exist_ok=True)
    if not run_file.is_file() or json.loads(run_file.read_text(encoding='utf-8')).get('fingerprint') != payload:
        atomic_write_json(run_file, {'fingerprint': payload, 'created': get_time_str()})
    return out


class _Models:
    """Builds the captioner / IRPAD / sampler on first use (and frees them on request)."""

    def __init__(self, opt: Dict[str, Any], meta: Dict[str, Any], device: str):
        self.opt, self.meta, self.device = opt, meta, device
        self._captioner = self._irpad = self._sampler = None

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

    def sampler(self):
        if self._sampler is None:
            self._sampler = build_sampler(self.opt, self.meta, self.device)
        return self._sampler

    def free(self, which: str) -> None:
        setattr(self, f'_{which}', None)
        gc.collect()
        try:
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass


def build_sampler(opt: Dict[str, Any], meta: Dict[str, Any], device: str):
    """SD parts (``model.sd`` over the source in dalpsr.json; trained UNet/text encoder of the
    export when listed in ``trained_parts``) + the exported ControlNet -> DaLPSRSampler."""
    from dalpsr.archs.controlnet_arch import get_controlnet_class
    from dalpsr.archs.sd_components import load_sd_components
    from dalpsr.pipelines.sampler import DaLPSRSampler
    m = opt['model']
    model_dir = Path(m['path'])
    dtype = _model_dtype(m['dtype'], device)
    sd_cfg = dict(meta.get('sd') or {})
    sd_cfg.update(m['sd'] or {})
    if not sd_cfg.get('pretrained'):
        raise OptionError(f"{model_dir}/dalpsr.json names no SD source; set model.sd.pretrained")
    for part, sub in (meta.get('trained_parts') or {}).items():
        if part in ('unet', 'text_encoder') and part not in (m['sd'] or {}):
            sd_cfg[part] = str(model_dir / sub)
    sd_cfg.setdefault('dtype', 'fp32' if dtype == 'fp32' else dtype)
    comps = load_sd_components(sd_cfg)
    from dalpsr.pipelines.sampler import parse_dtype
    controlnet = get_controlnet_class().from_pretrained(str(model_dir / 'controlnet'), torch_dtype=parse_dtype(dtype))
    max_chunks = m['max_chunks'] or int((meta.get('text') or {}).get('max_chunks', 3))
    sampler = DaLPSRSampler(comps, controlnet, condition_mode=meta.get('condition_mode'),
                            scale=int(meta.get('scale', 4)), device=device, dtype=dtype, vae_dtype=m['vae_dtype'],
                            vae_fp32_fallback=bool(m['vae_fp32_fallback']), channels_last=bool(m['channels_last']),
                            compile=m['compile'], max_chunks=max_chunks, logger=logger)
    logger.info(f'sampler: SD {sd_cfg.get("pretrained")} + ControlNet {model_dir} ({sampler.condition_mode} '
                f'condition), device {device}, {dtype}')
    return sampler


def _peak_memory(device: str) -> Tuple[float, str]:
    """(MiB, kind): CUDA peak allocated since the last reset, else the process's peak RSS."""
    import torch
    if device.startswith('cuda') and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20, 'cuda_max_allocated'
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 'process_peak_rss'
    except ImportError:  # pragma: no cover - not on Linux
        return float('nan'), 'unknown'


class _TestSet:
    """State of one test set: its images, records and caches."""

    def __init__(self, key: str, block: Dict[str, Any], out_root: Path, opt: Dict[str, Any]):
        self.key, self.block, self.opt = key, block, opt
        self.name = block['name']
        self.dir = out_root / self.name
        lq = Path(block['dataroot_lq'])
        if not lq.is_dir():
            raise FileNotFoundError(f"datasets.{key}.dataroot_lq: folder not found: {lq}")
        if block['dataroot_gt'] and not Path(block['dataroot_gt']).is_dir():
            raise FileNotFoundError(f"datasets.{key}.dataroot_gt: folder not found: {block['dataroot_gt']}")
        for k in ('caption_file', 'restoration_file'):
            if block[k] and not Path(block[k]).is_file():
                raise FileNotFoundError(f'datasets.{key}.{k}: file not found: {block[k]}')
        recursive = bool(opt['test']['recursive'])
        self.images, self.ignored = list_set_images(lq, recursive)
        self.gt = gt_index(block['dataroot_gt'], recursive)
        self.dir.mkdir(parents=True, exist_ok=True)
        set_file = self.dir / 'set.json'
        desc = {k: (str(v) if v is not None else None) for k, v in block.items()}
        if set_file.is_file():
            old = json.loads(set_file.read_text(encoding='utf-8'))
            if {k: old.get(k) for k in ('dataroot_lq', 'caption_file', 'restoration_file')} != \
                    {k: desc[k] for k in ('dataroot_lq', 'caption_file', 'restoration_file')}:
                raise FileExistsError(f'{self.dir} holds results of other inputs ({old}); refusing to mix them. '
                                      'Use --force to archive the run folder, or give the set another name')
        atomic_write_json(set_file, desc)
        self.records_file = self.dir / RECORDS
        self.records: Dict[str, Dict[str, Any]] = {}
        if self.records_file.is_file():
            for r in read_jsonl(self.records_file):
                self.records[r['key']] = r
        ext = opt['test']['ext']
        self.todo: List[Tuple[str, Path]] = []
        self.resumed = 0
        for k, p in self.images:
            r = self.records.get(k)
            if r is not None and r.get('status') == 'ok' and (self.dir / f'{k}.{ext}').is_file():
                self.resumed += 1
            else:
                self.todo.append((k, p))
        self.captions: Dict[str, str] = {}
        self.restoration: Dict[str, str] = {}
        self.notes: Dict[str, List[str]] = {}

    def output_path(self, key: str) -> Path:
        return self.dir / f"{key}.{self.opt['test']['ext']}"

    def record(self, rec: Dict[str, Any]) -> None:
        append_jsonl(self.records_file, rec)
        self.records[rec['key']] = rec


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit='img', dynamic_ncols=True, disable=not enabled or total == 0)


def _reject(ts: _TestSet, key: str, path: Path, err: InputRejected) -> None:
    logger.warning(f'[{ts.name}] {err.status}: {err}')
    ts.record({'key': key, 'lr_path': str(path), 'status': err.status, 'message': str(err), 'time': get_time_str()})


def _check_inputs(ts: _TestSet, rules: Dict[str, Any]) -> None:
    """Apply the input rules to every image still to do; rejected ones are recorded and dropped."""
    keep = []
    for key, path in ts.todo:
        try:
            img, notes = load_lr(path, rules)
        except InputRejected as err:
            _reject(ts, key, path, err)
            continue
        ts.notes[key] = notes
        keep.append((key, path))
    ts.todo = keep


def _captions(ts: _TestSet, models: _Models, opt: Dict[str, Any], use_caption: bool) -> None:
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
    bar = _progress(len(need), f'{ts.name}: captions', opt['test']['progress_bar'])
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


def _restoration(ts: _TestSet, models: _Models, opt: Dict[str, Any], use_restoration: bool) -> None:
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
    bar = _progress(len(need), f'{ts.name}: IRPAD', opt['test']['progress_bar'])
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


def _read_gt(path: Path, sr_hw: Tuple[int, int], modcrop: bool) -> Tuple[Optional[np.ndarray], Optional[str]]:
    from dalpsr.utils.img_io import ImageReadError, read_image
    try:
        gt = read_image(path)
    except ImageReadError as err:
        return None, f'GT unreadable: {err}'
    h, w = sr_hw
    if gt.shape[:2] != (h, w):
        if modcrop and h <= gt.shape[0] < h + 8 and w <= gt.shape[1] < w + 8:
            gt = gt[:h, :w]
        else:
            return None, f'GT {gt.shape[0]}x{gt.shape[1]} does not match SR {h}x{w}; full-reference metrics skipped'
    return gt, None


def _sample_set(ts: _TestSet, models: _Models, opt: Dict[str, Any], composer, metric_set, device: str) -> None:
    import torch

    from dalpsr.utils.img_io import img2tensor, tensor2img, write_image
    s = opt['sampler']
    if not ts.todo:
        return
    sampler = models.sampler()
    bar = _progress(len(ts.todo), f'{ts.name}: SR', opt['test']['progress_bar'])
    todo = list(ts.todo)
    i = 0
    while i < len(todo):
        # a batch: consecutive images of one LR size (the sampler needs one size per call)
        batch = []
        while i < len(todo) and len(batch) < s['batch_size']:
            key, path = todo[i]
            try:
                img, notes = load_lr(path, opt['test'])
            except InputRejected as err:  # changed on disk since the check
                _reject(ts, key, path, err)
                i += 1
                bar.update(1)
                continue
            if batch and img.shape != batch[0][2].shape:
                break
            batch.append((key, path, img))
            i += 1
        if not batch:
            continue
        keys = [b[0] for b in batch]
        prompts = [composer.compose(ts.captions.get(k, ''), ts.restoration.get(k, '')) for k in keys]
        seeds = [image_seed(opt['seed'], k) for k in keys]
        lq = torch.stack([img2tensor(b[2]) for b in batch])
        if device.startswith('cuda'):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            sr = sampler(lq, prompts, negative_prompt=s['negative_prompt'] or '', num_steps=s['num_steps'],
                         guidance_scale=float(s['guidance_scale']), scheduler=s['scheduler'], start=s['start'],
                         start_step=s['start_step'], conditioning_scale=float(s['conditioning_scale']), seed=seeds,
                         tile=s['tile'], color_fix=s['color_fix'], noise_guidance_steps=s['noise_guidance_steps'],
                         scheduler_overrides=s['scheduler_overrides'])
            if device.startswith('cuda'):
                torch.cuda.synchronize()
            err_msg = None
        except Exception as err:  # noqa: BLE001 - e.g. out of memory on one huge image
            err_msg = f'{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ""}'
            sr = None
            if device.startswith('cuda'):
                torch.cuda.empty_cache()
        dt = (time.perf_counter() - t0) / len(batch)
        mem, mem_kind = _peak_memory(device)
        for j, (key, path, img) in enumerate(batch):
            rec = {'key': key, 'lr_path': str(path), 'lr_size': list(img.shape[:2]), 'seed': seeds[j],
                   'prompt': prompts[j], 'caption': ts.captions.get(key, ''),
                   'restoration_prompt': ts.restoration.get(key, ''), 'notes': ts.notes.get(key, []),
                   'seconds': round(dt, 4), 'batch': len(batch), 'peak_mem_mb': round(mem, 1),
                   'peak_mem_kind': mem_kind, 'device': device, 'time': get_time_str()}
            if sr is not None:  # network evaluations of the batch (> steps when the latent was tiled)
                rec['unet_calls'] = int(sampler.last_stats.get('unet_calls', 0))
                if sampler.last_stats.get('vae_fp32_fallback'):
                    rec['notes'] = rec['notes'] + ['VAE recomputed in fp32 (non-finite in low precision)']
            if sr is None:
                rec.update(status='failed', message=f'{path}: sampling failed: {err_msg}')
                logger.warning(f'[{ts.name}] {rec["message"]}')
                ts.record(rec)
                continue
            out = sr[j]
            out_path = ts.output_path(key)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            write_image(out_path, tensor2img(out))
            rec.update(status='ok', message='', output=str(out_path), sr_size=list(out.shape[-2:]))
            gt_path = ts.gt.get(_gt_key(key))
            if metric_set is not None:
                gt = None
                if gt_path is not None:
                    rec['gt_path'] = str(gt_path)
                    gt, why = _read_gt(gt_path, tuple(out.shape[-2:]), bool(opt['test']['gt_modcrop']))
                    if why:
                        rec['notes'] = rec['notes'] + [why]
                        logger.warning(f'[{ts.name}] {key}: {why}')
                elif ts.block['dataroot_gt']:
                    rec['notes'] = rec['notes'] + ['no GT with this key']
                # the saved (8-bit) image is what is scored, as scripts/iqa.py would
                from dalpsr.utils.img_io import read_image
                saved = img2tensor(read_image(out_path))[None]
                rec['metrics'] = metric_set.compute(saved, img2tensor(gt)[None] if gt is not None else None)
            ts.record(rec)
        bar.update(len(batch))
        bar.set_postfix_str(f'{dt:.2f} s/img')
    bar.close()


def summarize_set(ts: _TestSet, metric_info: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Counts, mean metrics, timing and memory over the latest record of every image of the set."""
    keys = [k for k, _ in ts.images]
    recs = [ts.records[k] for k in keys if k in ts.records]
    ok = [r for r in recs if r.get('status') == 'ok']
    metrics: Dict[str, Any] = {}
    for r in ok:
        for name, v in (r.get('metrics') or {}).items():
            metrics.setdefault(name, []).append(float(v))
    secs = [r['seconds'] for r in ok if r.get('seconds') is not None]
    mems = [r['peak_mem_mb'] for r in ok if r.get('peak_mem_mb') is not None and math.isfinite(r['peak_mem_mb'])]
    return {
        'set': ts.name, 'dataroot_lq': ts.block['dataroot_lq'], 'dataroot_gt': ts.block['dataroot_gt'],
        'images': len(keys), 'ok': len(ok),
        'skipped': sum(r.get('status') == 'skipped' for r in recs),
        'failed': sum(r.get('status') == 'failed' for r in recs),
        'not_done': len(keys) - len(recs), 'resumed': ts.resumed, 'ignored_non_image_files': ts.ignored,
        'metrics': {k: {'mean': float(np.mean(v)), 'std': float(np.std(v)), 'count': len(v)}
                    for k, v in metrics.items()},
        'metric_info': metric_info or {},
        'seconds_per_image': {'mean': float(np.mean(secs)), 'max': float(np.max(secs))} if secs else None,
        'peak_mem_mb_max': float(np.max(mems)) if mems else None,
        'problems': [{'key': r['key'], 'status': r['status'], 'message': r.get('message', '')}
                     for r in recs if r.get('status') != 'ok'],
    }


def _versions() -> Dict[str, str]:
    out = {}
    for mod in ('torch', 'diffusers', 'transformers', 'pyiqa'):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = 'missing'
    return out


def test(opt: Dict[str, Any], force: Optional[bool] = None) -> Dict[str, Any]:
    """Run every test set of ``opt`` (see module doc). Returns ``{'dir': Path, 'sets': {name:
    summary}}``. Raises OptionError / FileNotFoundError / FileExistsError with one-line messages."""
    from dalpsr.utils.logger import get_root_logger
    if force is None:
        force = bool((opt.get('_args') or {}).get('force', False))
    opt = resolve_test_opt(opt)
    if opt['imports']:
        from dalpsr.train import import_plugins
        import_plugins(opt)
    from dalpsr.pipelines.sampler import load_model_meta
    meta = load_model_meta(str(opt['model']['path']))
    payload = fingerprint_payload(opt, meta)
    # check the inputs exist before touching the results folder
    for key, block in opt['datasets'].items():
        if not Path(block['dataroot_lq']).is_dir():
            raise FileNotFoundError(f"datasets.{key}.dataroot_lq: folder not found: {block['dataroot_lq']}")
    out = prepare_results(opt, payload, force)
    get_root_logger('dalpsr')
    handler = logging.FileHandler(out / 'test.log', mode='a', encoding='utf-8')
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s: %(message)s'))
    logger.addHandler(handler)
    try:
        return _run(opt, meta, payload, out)
    finally:
        logger.removeHandler(handler)
        handler.close()


def _run(opt: Dict[str, Any], meta: Dict[str, Any], payload: Dict[str, Any], out: Path) -> Dict[str, Any]:
    atomic_write_text(out / 'options.yml', dump_options(opt))
    device = _device(opt['model']['device'])
    import torch
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    note = meta.get('note')
    logger.info(f"test {opt['name']} -> {out} (device {device}){' [' + note + ']' if note else ''}")

    from dalpsr.data.prompt_compose import PromptComposer
    pcfg = dict(meta.get('prompt') or {})
    pcfg.update(opt['sampler']['prompt'] or {})
    if opt['sampler']['added_prompt'] is not None:
        pcfg['added_prompt'] = opt['sampler']['added_prompt']
    composer = PromptComposer.from_opt(pcfg)
    if composer.use_restoration and opt['irpad']['source'] == 'none':
        logger.warning('the model was trained with restoration prompts but irpad.source is none: p_r stays empty')

    sets = [_TestSet(k, b, out, opt) for k, b in opt['datasets'].items()]
    for ts in sets:
        logger.info(f'[{ts.name}] {len(ts.images)} images ({ts.resumed} already done, {len(ts.todo)} to do'
                    f"{f', {ts.ignored} non-image files ignored' if ts.ignored else ''})")
        _check_inputs(ts, opt['test'])
    models = _Models(opt, meta, device)
    # stage by model so only one large model needs to be resident at a time
    for ts in sets:
        _captions(ts, models, opt, composer.use_caption)
    if opt['captioner']['free_after_use']:
        models.free('captioner')
    for ts in sets:
        _restoration(ts, models, opt, composer.use_restoration)
    models.free('irpad')
    metric_set, metric_info = None, None
    if opt['metrics']['names'] and any(ts.gt and ts.todo for ts in sets):
        from dalpsr.metrics.iqa import MetricSet
        mt = opt['metrics']
        metric_set = MetricSet(mt['names'], device=_device(mt['device']), weights_dir=mt['weights_dir'],
                               crop_border=int(mt['crop_border']), seed=opt['seed'], options=mt['options'],
                               logger=logger)
        metric_info = metric_set.describe()
    results = {}
    for ts in sets:
        _sample_set(ts, models, opt, composer, metric_set, device)
        info = metric_info
        if info is None and (ts.dir / 'summary.json').is_file():  # nothing scored now: keep the earlier record
            info = json.loads((ts.dir / 'summary.json').read_text(encoding='utf-8')).get('metric_info')
        summary = summarize_set(ts, info)
        summary.update(versions=_versions(), options=payload, finished=get_time_str())
        atomic_write_json(ts.dir / 'summary.json', summary)
        results[ts.name] = summary
        means = ', '.join(f"{k} {v['mean']:.4f}" for k, v in summary['metrics'].items())
        sec = summary['seconds_per_image']
        timing = f"; {sec['mean']:.2f} s/img" if sec else ''
        logger.info(f"[{ts.name}] ok {summary['ok']}/{summary['images']} (skipped {summary['skipped']}, failed "
                    f"{summary['failed']}){'; ' + means if means else ''}{timing}")
    atomic_write_json(out / 'summary.json', {'name': opt['name'], 'sets': results, 'finished': get_time_str()})
    return {'dir': out, 'sets': results}


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='DaLPSR inference over test sets (docs/inference.md)')
    p.add_argument('-opt', '--opt', required=True, help='options YAML (options/reference/test.yml documents every key)')
    p.add_argument('--set', action='append', default=[], metavar='KEY.SUB=VALUE',
                   help='override an option (repeatable), e.g. --set sampler.num_steps=20')
    p.add_argument('--force', action='store_true',
                   help='archive an existing results/<name> made with other options (renamed with a timestamp)')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Command line: one-line errors for bad options, missing files or a refused folder."""
    args = build_arg_parser().parse_args(argv)
    try:
        opt = load_options(args.opt, args.set, is_train=False)
        test(opt, force=args.force)
    except (OptionError, FileExistsError, FileNotFoundError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
