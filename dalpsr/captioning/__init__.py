"""Semantic prior of DaLPSR: image tags (RAM or open_clip), LLaVA descriptions, caption files.

Heavy libraries (transformers, open_clip) are imported only when a backend is built.
See docs/captioning.md.
"""
from dalpsr.captioning.captions import (DEFAULT_INSTRUCTION, DEFAULT_INSTRUCTION_NO_TAGS, FIELDS, file_sha1,
                                        format_instruction, latest_records, load_captions, make_record,
                                        read_caption_records)
from dalpsr.captioning.pipeline import CAPTIONER_MODES, CaptionPipeline
from dalpsr.captioning.taggers import CLIPTagger, RAMTaggerBackend, build_tagger

__all__ = ['DEFAULT_INSTRUCTION', 'DEFAULT_INSTRUCTION_NO_TAGS', 'FIELDS', 'file_sha1', 'format_instruction',
           'latest_records', 'load_captions', 'make_record', 'read_caption_records', 'CAPTIONER_MODES',
           'CaptionPipeline', 'CLIPTagger', 'RAMTaggerBackend', 'build_tagger']
