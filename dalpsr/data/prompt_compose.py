"""Compose the text condition of DaLPSR from its parts (C8), identically at training and sampling.

Parts (paper III-C, III-D):

- ``caption``: the semantic prompt p_s (LLaVA description of the LR image; '' when absent)
- ``restoration``: the restoration prompt p_r, e.g. "Deblur with sigma 0.5~0.75, Denoise with
  sigma 0.25~0.5, Dejpeg with sigma 0~0.25" (recorded labels at training, IRPAD at test)
- ``added``: a fixed ``added_prompt`` (e.g. SeeSR's "clean, high-resolution, 8k"; '' = none)

Options (``model.prompt`` in a train YAML, recorded in the export's ``dalpsr.json``)::

    prompt:
      order: [restoration, caption, added]  # parts in prompt order (any subset, no repeats)
      separator: '. '                       # between non-empty parts
      use_caption: true                     # false: the paper's "w/o MLLM" ablation
      use_restoration: true                 # false: the paper's "w/o IRPAD" ablation
      added_prompt: ''                      # appended as the 'added' part when non-empty
      caption_dropout: 0.0                  # training only: P(drop p_s) per sample
      restoration_dropout: 0.0              # training only: P(drop p_r) per sample
      empty_dropout: 0.1                    # training only: P(whole prompt -> '') per sample (CFG null text)

Why restoration first by default: an LLaVA caption often exceeds CLIP's 77 tokens; anything
past the text encoder's chunk limit is dropped, and the short restoration prompt (~35 tokens)
must never be the part that is lost. Empty parts are skipped (no dangling separators).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

PARTS = ('caption', 'restoration', 'added')


@dataclass
class PromptComposer:
    """See the module docstring for every field. ``compose`` is deterministic; ``sample_drops``
    draws the training-time dropout from a given numpy Generator."""
    order: Sequence[str] = ('restoration', 'caption', 'added')
    separator: str = '. '
    use_caption: bool = True
    use_restoration: bool = True
    added_prompt: str = ''
    caption_dropout: float = 0.0
    restoration_dropout: float = 0.0
    empty_dropout: float = 0.1

    def __post_init__(self):
        self.order = tuple(self.order)
        bad = [p for p in self.order if p not in PARTS]
        if bad or len(set(self.order)) != len(self.order):
            raise ValueError(f"prompt.order must list distinct parts from {list(PARTS)}, got {list(self.order)}")
        for key in ('caption_dropout', 'restoration_dropout', 'empty_dropout'):
            v = float(getattr(self, key))
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"prompt.{key} must be in [0, 1], got {v}")
            setattr(self, key, v)
        if not isinstance(self.separator, str):
            raise ValueError("prompt.separator must be a string")
        self.added_prompt = str(self.added_prompt or '')

    @classmethod
    def from_opt(cls, opt: Optional[Dict[str, Any]] = None) -> 'PromptComposer':
        """From an options block (None -> defaults). Unknown keys raise ``OptionError``."""
        from dalpsr.utils.options import check_keys
        if opt is None:
            return cls()
        if isinstance(opt, PromptComposer):
            return opt
        check_keys(opt, cls.__dataclass_fields__, 'model.prompt block')
        return cls(**opt)

    def to_opt(self) -> Dict[str, Any]:
        d = asdict(self)
        d['order'] = list(self.order)
        return d

    def parts(self, caption: str, restoration_prompt: str, drop: Sequence[str] = ()) -> List[str]:
        """The non-empty parts in ``order`` after the ablation switches and ``drop``."""
        values = {'caption': caption if self.use_caption else '',
                  'restoration': restoration_prompt if self.use_restoration else '',
                  'added': self.added_prompt}
        out = []
        for name in self.order:
            if name in drop:
                continue
            text = (values[name] or '').strip()
            if text:
                out.append(text)
        return out

    def compose(self, caption: str, restoration_prompt: str, drop: Sequence[str] = ()) -> str:
        """The prompt string; ``drop`` lists parts to leave out ('empty' -> '')."""
        if 'empty' in drop:
            return ''
        sep = self.separator
        parts = self.parts(caption, restoration_prompt, drop)
        if sep.strip():  # avoid "description.. Deblur": a part ending in the separator's mark
            mark = sep.strip()
            parts = [p[:-len(mark)].rstrip() if p.endswith(mark) and i < len(parts) - 1 else p
                     for i, p in enumerate(parts)]
        return sep.join(parts)

    def sample_drops(self, rng: np.random.Generator) -> List[str]:
        """Training-time dropout for one sample: a subset of ['empty', 'caption', 'restoration'].
        Always draws the same number of values from ``rng`` (3)."""
        u = rng.random(3)
        drops = []
        if u[0] < self.empty_dropout:
            drops.append('empty')
        if u[1] < self.caption_dropout:
            drops.append('caption')
        if u[2] < self.restoration_dropout:
            drops.append('restoration')
        return drops


def compose_prompt(caption: str, restoration_prompt: str, cfg: Optional[Dict[str, Any]] = None,
                   drop: Sequence[str] = ()) -> str:
    """``PromptComposer.from_opt(cfg).compose(caption, restoration_prompt, drop)`` (C8)."""
    return PromptComposer.from_opt(cfg).compose(caption, restoration_prompt, drop)


__all__ = ['PromptComposer', 'compose_prompt', 'PARTS']
