"""Paired bootstrap intervals: is system a better than system b on the *same* eval samples?"""
from __future__ import annotations

from typing import Dict

import torch

__all__ = ['paired_bootstrap_diff']


def paired_bootstrap_diff(a: torch.Tensor, b: torch.Tensor, num: int = 2000, seed: int = 0,
                          level: float = 0.95) -> Dict[str, torch.Tensor]:
    """Mean of ``a - b`` over the samples (dim 0) and its percentile interval from ``num``
    resamples of the samples with replacement.

    ``a``, ``b``: per-sample scores of two systems on the same samples, [N] or [N, T] (T columns
    scored independently: accuracy per type, PSNR per image ...). Returns ``{'diff', 'lo', 'hi'}``,
    each [] or [T]; an interval above 0 says a beats b beyond the sampling of the eval set.
    """
    if a.shape != b.shape or a.dim() not in (1, 2) or len(a) == 0:
        raise ValueError(f'paired_bootstrap_diff: need two equal [N] or [N, T] tensors, got {tuple(a.shape)} and '
                         f'{tuple(b.shape)}')
    g = torch.Generator().manual_seed(int(seed))
    diff = a.double() - b.double()
    idx = torch.randint(0, len(diff), (int(num), len(diff)), generator=g)
    boot = diff[idx].mean(1)                                           # [num] or [num, T]
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(boot, q, dim=0)
    return {'diff': diff.mean(0), 'lo': lo, 'hi': hi}
