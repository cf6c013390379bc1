"""The restoration prompt spec shared by the IRPAD export and the DaLPSR export (issue 13.7).

IRPAD writes p_r in its ``PromptSpec`` (``irpad.json['prompt']``); the DaLPSR model learned p_r in
the spec recorded in ``dalpsr.json['restoration_prompt_spec']``. test.py refuses, in one line
naming both, an IRPAD whose spec differs (other types, intervals, noise severity, templates or
separator): its prompts would be ones the model never saw. Older exports that record no spec
are taken as the default ``PromptSpec()`` (logged); ``restoration_prompt_spec: null`` (a model
trained without p_r) is not checked.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from dalpsr.data.prompt_labels import PromptSpec
from dalpsr.utils.options import OptionError

logger = logging.getLogger('dalpsr')

#: key of the spec in dalpsr.json (DaLPSRModel.export_meta)
MODEL_SPEC_KEY = 'restoration_prompt_spec'


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    if not path.is_file():
        return None
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def model_spec(model_dir) -> Tuple[Optional[PromptSpec], bool, bool]:
    """``(spec, found, recorded)`` of a DaLPSR export folder: ``found`` False when it has no
    dalpsr.json; ``recorded`` False for an older export (default spec assumed); spec None when
    the model was trained without restoration prompts."""
    meta = _read_json(Path(str(model_dir)) / 'dalpsr.json') if model_dir else None
    if meta is None:
        return None, False, False
    if MODEL_SPEC_KEY not in meta:
        return PromptSpec(), True, False
    value = meta[MODEL_SPEC_KEY]
    return (None if value is None else PromptSpec.from_opt(value)), True, True


def irpad_spec(irpad_path) -> Tuple[Optional[PromptSpec], bool]:
    """``(spec, recorded)`` of an IRPAD export folder (or its irpad.json / irpad.safetensors);
    spec None when there is no irpad.json (loading it reports that)."""
    p = Path(str(irpad_path))
    meta = _read_json(p / 'irpad.json' if p.is_dir() else p.with_name('irpad.json'))
    if meta is None:
        return None, False
    return PromptSpec.from_opt(meta.get('prompt') or None), 'prompt' in meta


def check_irpad_matches_model(opt: Dict[str, Any], src: str = 'the options') -> None:
    """Raise OptionError (one line) when ``irpad.source: irpad`` and the IRPAD export's spec
    differs from the DaLPSR export's (``model.path``). Nothing to compare (no dalpsr.json, no
    irpad.json, a model without p_r): no check."""
    if (opt.get('irpad') or {}).get('source') != 'irpad':
        return
    mdir, ipath = (opt.get('model') or {}).get('path'), opt['irpad'].get('path')
    mspec, found, mrec = model_spec(mdir)
    ispec, irec = irpad_spec(ipath) if ipath else (None, False)
    if not found or mspec is None or ispec is None:
        return
    for what, rec in ((f'{mdir}/dalpsr.json', mrec), (f'IRPAD export {ipath}', irec)):
        if not rec:
            logger.info(f'{what} records no restoration prompt spec (an older export): the default spec is assumed')
    if ispec.to_opt() != mspec.to_opt():
        raise OptionError(f"irpad.path in {src}: the IRPAD export {ipath} writes restoration prompts as "
                          f"[{ispec.summary()}]{'' if irec else ' (not recorded: default)'} but the DaLPSR export "
                          f"{mdir} was trained on [{mspec.summary()}]{'' if mrec else ' (not recorded: default)'}; "
                          'use an IRPAD trained with the same prompt spec')


__all__ = ['check_irpad_matches_model', 'model_spec', 'irpad_spec', 'MODEL_SPEC_KEY']
