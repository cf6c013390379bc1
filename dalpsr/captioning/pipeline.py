"""Tagger + LLaVA, as DaLPSR uses them (paper Fig. 4): tags -> instruction -> description."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from dalpsr.captioning.captions import DEFAULT_INSTRUCTION, DEFAULT_INSTRUCTION_NO_TAGS, format_instruction
from dalpsr.captioning.taggers import Images, build_tagger

#: ``none``: empty descriptions; ``ram``: the tags (comma-separated) are the description (the
#: tagger may be RAM or CLIP: ``tagger``); ``llava``: LLaVA without tags; ``ram+llava``: tags
#: fill the instruction that LLaVA answers (the paper's setting).
CAPTIONER_MODES = ('none', 'ram', 'llava', 'ram+llava')


class CaptionPipeline:
    """``pipeline(images) -> [{'tags': [...], 'description': str, 'instruction': str}, ...]``.

    Args:
        captioner: one of :data:`CAPTIONER_MODES`.
        tagger: 'ram' | 'clip' (used by the 'ram' and 'ram+llava' modes).
        tagger_opts / llava_opts: constructor kwargs of the backends (paths, thresholds, decoding).
        instruction: template with ``{tags}``; instruction_no_tags: used when there are no tags.
        tagger_obj / llava_obj: ready backends (skip construction; used by tests and notebooks).
    """

    def __init__(self, captioner: str = 'ram+llava', tagger: str = 'ram', tagger_opts: Optional[dict] = None,
                 llava_opts: Optional[dict] = None, instruction: str = DEFAULT_INSTRUCTION,
                 instruction_no_tags: str = DEFAULT_INSTRUCTION_NO_TAGS, device='cpu', dtype: str = 'auto',
                 tagger_obj=None, llava_obj=None):
        if captioner not in CAPTIONER_MODES:
            raise ValueError(f"captioner must be one of {'|'.join(CAPTIONER_MODES)}, got {captioner!r}")
        self.mode, self.instruction, self.instruction_no_tags = captioner, instruction, instruction_no_tags
        self.tagger = self.llava = None
        if captioner in ('ram', 'ram+llava'):
            self.tagger = tagger_obj or build_tagger(tagger, device=device, dtype=dtype, **(tagger_opts or {}))
        if captioner in ('llava', 'ram+llava'):
            if llava_obj is None:
                from dalpsr.captioning.llava import LlavaCaptioner
                llava_obj = LlavaCaptioner(device=device, dtype=dtype, **(llava_opts or {}))
            self.llava = llava_obj

    @property
    def models(self) -> Dict[str, Any]:
        return {'captioner': self.mode,
                'tagger': getattr(self.tagger, 'model_id', None),
                'llava': getattr(self.llava, 'model_id', None)}

    def __call__(self, images: Images) -> List[dict]:
        n = len(images)
        tags = self.tagger(images) if self.tagger is not None else [[] for _ in range(n)]
        if self.llava is None:
            desc = [', '.join(t) for t in tags] if self.mode == 'ram' else [''] * n
            return [{'tags': t, 'description': d, 'instruction': ''} for t, d in zip(tags, desc)]
        ins = [format_instruction(self.instruction, t, self.instruction_no_tags) for t in tags]
        desc = self.llava(images, ins)
        return [{'tags': t, 'description': d, 'instruction': i} for t, d, i in zip(tags, desc, ins)]
