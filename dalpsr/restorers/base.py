"""The contract between a method's inference and ``dalpsr/test.py``.

test.py owns everything that is the same for every method: options, input reading and rules
(gray / RGBA / 16-bit conversion, corrupt files skipped), caption and restoration-prompt caches,
result folders and records, per-image seeds, batching by LR size, resumability, atomic writes,
timing, peak memory and metrics on the fly. A method supplies one registered ``Restorer``::

    restorer = RESTORER_REGISTRY.build(opt['method'], where, device=device)
    sr = restorer.restore(lq, seeds=seeds, captions=captions, restoration=restoration)

``lq`` is float32 ``[B, 3, h, w]`` in [0, 1] on the CPU (all images of a batch have one size);
the result is float32 ``[B, 3, h*scale, w*scale]`` in [0, 1] on the CPU. ``seeds`` holds one
int per image (an image's result may depend only on its seed, its inputs and the settings, never
on which images share its batch). ``captions`` / ``restoration`` hold one string per image
(``''`` when the method does not ask for them through ``needs``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from dalpsr.utils.registry import RESTORER_REGISTRY


class Restorer:
    """Subclass, register with ``@RESTORER_REGISTRY.register()`` and implement ``restore``.

    Attributes:
        scale: the SR factor.
        needs: which prompts test.py must prepare before ``restore`` is called: a subset of
            ``('caption', 'restoration')`` (semantic caption / IRPAD restoration prompt).
        last_stats: filled by every ``restore`` call; test.py copies it into each image's record:
            numbers (e.g. ``{'encode_s': .., 'denoise_s': .., 'decode_s': .., 'unet_calls': ..}``;
            times of the batch, divided by the batch size), ``notes`` (a list of strings added
            to every image's notes) and ``per_image`` (a list of B dicts merged into the records
            of the images, e.g. ``{'prompt': ...}``).
        option_blocks: top-level blocks of the test options this restorer reads, from
            ``('model', 'sampler')``; test.py resolves each with its defaults and passes it to the
            constructor as a keyword argument of the same name (and refuses a block given for a
            method that does not read it). The constructor also gets ``device`` (a resolved name).
    """

    scale: int = 4
    needs: Tuple[str, ...] = ()
    option_blocks: Tuple[str, ...] = ()

    @classmethod
    def check_options(cls, opt: Dict[str, Any], src: str) -> None:
        """Check the resolved test options before anything is loaded; raise
        ``dalpsr.utils.options.OptionError`` with one line naming the key and ``src``."""

    def __init__(self) -> None:
        self.last_stats: Dict[str, Any] = {}

    def restore(self, lq: torch.Tensor, *, seeds: Sequence[int], captions: Sequence[str] = (),
                restoration: Sequence[str] = ()) -> torch.Tensor:
        """``lq`` float32 [B,3,h,w] in [0,1] (CPU) -> float32 [B,3,h*scale,w*scale] in [0,1] (CPU)."""
        raise NotImplementedError

    def describe(self) -> Dict[str, Any]:
        """What identifies this restorer's results (weights, settings): written to the results
        folder's fingerprint, so a rerun with other weights or settings is not mixed in."""
        return {'type': type(self).__name__, 'scale': self.scale}


@RESTORER_REGISTRY.register()
class Bicubic(Restorer):
    """Bicubic upsampling (PyTorch, antialias off, clamped): the baseline row of every table."""

    def __init__(self, scale: int = 4, device: str = 'cpu') -> None:  # noqa: ARG002 - device: uniform signature
        super().__init__()
        if int(scale) < 1:
            raise ValueError(f'scale must be >= 1, got {scale}')
        self.scale = int(scale)

    @torch.no_grad()
    def restore(self, lq: torch.Tensor, *, seeds: Sequence[int], captions: Sequence[str] = (),
                restoration: Sequence[str] = ()) -> torch.Tensor:
        out = F.interpolate(lq.float(), scale_factor=self.scale, mode='bicubic', align_corners=False)
        self.last_stats = {}
        return out.clamp(0, 1)


def as_list(x: Any, n: int, what: str) -> List[Any]:
    """One value for every image, or a sequence of exactly ``n`` values."""
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        return [x] * n
    if len(x) != n:
        raise ValueError(f'{what}: expected {n} values (one per image), got {len(x)}')
    return list(x)
