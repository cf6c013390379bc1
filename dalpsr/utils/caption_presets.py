"""Named caption settings of the methods dalpsr hosts, for ``scripts/caption.py --preset NAME``.

A preset sets defaults of ``scripts/caption.py`` options (keys = option names with underscores);
flags given on the command line and keys of an ``-opt`` file override it.

``sspir``: SSP-IR's explicit text prior (spec ../shared/specs/related-methods.md section 1): LLaVA-1.5
alone (no tags) answering *"Describe the image in a very detailed manner if we remove the
degradation artifacts from the image."*, up to 512 new tokens. The authors sample with temperature
0.2 / top_p 0.7; the captioner here decodes greedily (the low-temperature limit). Caption the GT
(HR) folder for training, as the authors' code does; at test time test.py captions the LR inputs.
Long captions are encoded in up to 4 chunks of 75 tokens (``model.text.max_chunks: 4``).
"""
from __future__ import annotations

from typing import Any, Dict

SSPIR_INSTRUCTION = ('Describe the image in a very detailed manner if we remove the degradation artifacts '
                     'from the image.')

PRESETS: Dict[str, Dict[str, Any]] = {
    'sspir': {'captioner': 'llava', 'instruction': SSPIR_INSTRUCTION, 'instruction_no_tags': SSPIR_INSTRUCTION,
              'max_new_tokens': 512},
}


def preset_defaults(name: str) -> Dict[str, Any]:
    """The option defaults of preset ``name`` (``KeyError`` naming the known presets)."""
    if name not in PRESETS:
        raise KeyError(f"unknown caption preset '{name}' (known: {', '.join(sorted(PRESETS))})")
    return dict(PRESETS[name])
