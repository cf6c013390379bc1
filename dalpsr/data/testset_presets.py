"""Synthetic test sets as each paper made them: ``scripts/generate_lq.py --testset --preset NAME``.

Every "DIV2K-Val" of the papers is a different set (../shared/specs/related-methods.md,
"Comparing across papers"). A preset fixes what defines one: crops, count, scale, degradation
settings and the seed, so the set is the same bytes on every machine (generate.json records every
setting, ``preset.json`` the preset's name and sources). The papers' own seeds and crop positions
are not published: the seed here is ours (recorded), so the sets follow each paper's protocol but
are not the authors' files.

==========================  ============================================================  ==============
preset                      what                                                           used by
==========================  ============================================================  ==============
div2k-val-3k-seesr          3,000 random 512 px crops of the 100 DIV2K validation HR       SeeSR, DaLPSR
                            images, LR 128 by SeeSR's training degradation
div2k-val-3k-stablesr       3,000 random 512 px crops, LR 128 by StableSR's settings       StableSR, DeeDSR
div2k-val-2k-sspir          2,000 random 512 px crops, SeeSR's settings (SSP-IR's          SSP-IR
                            training degradation)
div2k-val-100-deplsr        the 100 whole images, Real-ESRGAN x4plus degradation           DePLSR
==========================  ============================================================  ==============

Degradation keys are those of :class:`dalpsr.data.degradations.RealESRGANDegradation`; keys not
listed keep its defaults (Real-ESRGAN x4plus).
"""
from __future__ import annotations

import copy
from typing import Any, Dict

#: SeeSR's training degradation (second-order Real-ESRGAN, lighter ranges); source: the SSP-IR
#: section of ../shared/specs/related-methods.md ("Degradation (SeeSR's settings)").
SEESR_DEGRADATION: Dict[str, Any] = {
    'blur_sigma': [0.2, 3.0], 'blur_sigma2': [0.2, 1.5],
    'noise_range': [1, 15], 'noise_range2': [1, 12],
    'poisson_scale_range': [0.05, 2.0], 'poisson_scale_range2': [0.05, 1.0],
    'jpeg_range': [60, 95], 'jpeg_range2': [60, 100],
    'resize_range': [0.3, 1.5], 'resize_range2': [0.6, 1.2],
    'second_blur_prob': 0.5, 'final_sinc_prob': 0.8,
}

#: StableSR's degradation (DeeDSR's training and test settings); source: the DeeDSR section of
#: ../shared/specs/related-methods.md and StableSR's configs/stableSRdata/test_data.yaml.
STABLESR_DEGRADATION: Dict[str, Any] = {
    'blur_sigma': [0.2, 1.5], 'blur_sigma2': [0.2, 1.0],
    'betag_range': [0.5, 2.0], 'betag_range2': [0.5, 2.0], 'betap_range': [1.0, 1.5], 'betap_range2': [1.0, 1.5],
    'noise_range': [1, 15], 'noise_range2': [1, 12],
    'poisson_scale_range': [0.05, 2.0], 'poisson_scale_range2': [0.05, 1.0],
    'jpeg_range': [60, 95], 'jpeg_range2': [60, 100],
    'resize_range': [0.3, 1.5], 'resize_range2': [0.6, 1.2],
    'second_blur_prob': 0.5, 'final_sinc_prob': 0.8,
}

TESTSET_PRESETS: Dict[str, Dict[str, Any]] = {
    'div2k-val-3k-seesr': {
        'description': "SeeSR's DIV2K-Val (DaLPSR's): 3,000 random 512 px crops of DIV2K_valid_HR, LR 128 by "
                       "SeeSR's training degradation",
        'used_by': ['SeeSR', 'DaLPSR'], 'hr': 'DIV2K_valid_HR (100 images)',
        'num': 3000, 'gt_size': 512, 'scale': 4, 'seed': 0, 'degradation': SEESR_DEGRADATION,
        'source': 'DaLPSR paper IV-A.2 (../shared/seeds/dalpsr-paper.md); degradation: specs/related-methods.md s.1'},
    'div2k-val-3k-stablesr': {
        'description': "StableSR's / DeeDSR's DIV2K-Val: 3,000 random 512 px crops of DIV2K_valid_HR, LR 128 by "
                       "StableSR's degradation settings",
        'used_by': ['StableSR', 'DeeDSR'], 'hr': 'DIV2K_valid_HR (100 images)',
        'num': 3000, 'gt_size': 512, 'scale': 4, 'seed': 0, 'degradation': STABLESR_DEGRADATION,
        'source': 'DeeDSR paper s.4.1 (../shared/seeds/deedsr-paper.txt); degradation: specs/related-methods.md s.2'},
    'div2k-val-2k-sspir': {
        'description': "SSP-IR's DIV2K-Val: 2,000 random 512 px crops of DIV2K_valid_HR, LR 128 by SSP-IR's "
                       "training degradation (SeeSR's settings)",
        'used_by': ['SSP-IR'], 'hr': 'DIV2K_valid_HR (100 images)',
        'num': 2000, 'gt_size': 512, 'scale': 4, 'seed': 0, 'degradation': SEESR_DEGRADATION,
        'source': 'SSP-IR paper s.IV-A (../shared/seeds/ssp-ir-paper.txt); degradation: specs/related-methods.md s.1'},
    'div2k-val-100-deplsr': {
        'description': "DePLSR's DIV2K-val: the 100 whole DIV2K_valid_HR images, Real-ESRGAN x4plus degradation",
        'used_by': ['DePLSR'], 'hr': 'DIV2K_valid_HR (100 images)',
        'num': None, 'gt_size': 0, 'scale': 4, 'seed': 0, 'degradation': {},
        'source': "DePLSR's released x4 test log (specs/related-methods.md s.3, 'Published')"},
}


def testset_preset(name: str) -> Dict[str, Any]:
    """A copy of preset ``name``; an unknown name is a one-line ValueError listing the presets."""
    if name not in TESTSET_PRESETS:
        raise ValueError(f"unknown test-set preset '{name}' (known: {', '.join(TESTSET_PRESETS)})")
    return copy.deepcopy(TESTSET_PRESETS[name])
