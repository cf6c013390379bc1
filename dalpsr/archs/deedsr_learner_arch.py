"""DeeDSR stage 1: the degradation learner (a BasicBlock ResNet trained with MoCo v2).

The network stage 2 loads (related-methods.md section 2; the authors' code, not the paper's
"ResNet50")::

    LR [B, 3, h, w] in [0, 1]
      -> conv7x7 s2 (3 -> stem) + norm + ReLU + max-pool 3x3 s2
      -> 4 stages of BasicBlocks ([3, 4, 6, 3]), widths [128, 256, 512, 1024], strides [1, 2, 2, 2]
      -> global average pool -> d [B, widths[-1]]        (d = 1024 at full scale)

``forward(x)`` returns d; ``forward_features(x)`` also returns the last feature map as tokens
``[B, h'w', C]``. ``MoCoHead`` is the MLP projection of MoCo v2 (``d -> d -> dim``), used in
stage 1 only and discarded afterwards.

Normalisation (``norm``): ``'bn'`` (the code's BatchNorm), ``'gn'`` (GroupNorm, 32 groups or
fewer: no batch statistics, so no information leaks between the samples of a batch; the
documented single-process alternative to Shuffle-BN), with ``bn_splits`` > 1 the BatchNorm
computes its training statistics over ``bn_splits`` separate groups of the batch (as on
``bn_splits`` GPUs; the single-process Shuffle-BN of the official MoCo CIFAR demo, see
:class:`SplitBatchNorm2d`). Checkpoints of ``'bn'`` with or without splits are interchangeable.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dalpsr.utils.registry import ARCH_REGISTRY

#: The published learner (authors' code): BasicBlock [3, 4, 6, 3], widths 128..1024, stem 64.
FULL_LAYERS = (3, 4, 6, 3)
FULL_WIDTHS = (128, 256, 512, 1024)
FULL_STEM = 64
NORMS = ('bn', 'gn')


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from ``splits`` equal groups of the batch.

    In training, ``x [B, C, H, W]`` is viewed as ``[B/splits, C*splits, H, W]`` so group ``j``
    (samples ``j, j + splits, j + 2 splits, ...``) is normalised with its own mean/variance (like
    one GPU of a ``splits``-GPU run); running statistics are the average over the groups. In eval mode (and
    with ``splits == 1``) it is a plain BatchNorm2d, and the parameters/buffers have the same names
    and shapes, so weights load into ``nn.BatchNorm2d`` unchanged. ``B`` must be divisible by
    ``splits``.
    """

    def __init__(self, num_features: int, splits: int = 1, **kw):
        super().__init__(num_features, **kw)
        self.splits = int(splits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.splits
        if not self.training or g == 1:
            return super().forward(x)
        b, c, h, w = x.shape
        if b % g:
            raise ValueError(f'batch {b} is not divisible by bn_splits {g}')
        rm = self.running_mean.repeat(g)
        rv = self.running_var.repeat(g)
        out = F.batch_norm(x.reshape(b // g, c * g, h, w), rm, rv, self.weight.repeat(g), self.bias.repeat(g),
                           True, self.momentum if self.momentum is not None else 0.1, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(rm.view(g, c).mean(0))
            self.running_var.copy_(rv.view(g, c).mean(0))
            self.num_batches_tracked += 1
        return out.view(b, c, h, w)


def make_norm(kind: str, channels: int, bn_splits: int = 1) -> nn.Module:
    if kind == 'bn':
        return SplitBatchNorm2d(channels, bn_splits) if bn_splits > 1 else nn.BatchNorm2d(channels)
    if kind == 'gn':
        import math
        return nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class BasicBlock(nn.Module):
    """conv3x3(stride) - norm - ReLU - conv3x3 - norm, + identity (1x1 conv + norm when the
    shape changes), ReLU. Convolutions without bias (torchvision layout)."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, bn_splits: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = make_norm(norm, cout, bn_splits)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = make_norm(norm, cout, bn_splits)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            make_norm(norm, cout, bn_splits))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        idt = x if self.downsample is None else self.downsample(x)
        return F.relu(out + idt, inplace=True)


@ARCH_REGISTRY.register()
class DegradationResNet(nn.Module):
    """The DeeDSR degradation learner: LR ``[B, 3, h, w]`` in [0, 1] -> d ``[B, widths[-1]]``.

    Args:
        layers: BasicBlocks per stage (code: [3, 4, 6, 3]).
        widths: channels per stage (code: [128, 256, 512, 1024]; smaller for CPU recipes).
        stem: channels of the 7x7 stem convolution (code: 64).
        norm: 'bn' | 'gn' (module doc). bn_splits: >1 = split-batch BN in training.
        in_range: 'zero_one' (inputs in [0, 1], the code's convention) or 'minus_one_one'
            (inputs are mapped from [0, 1] to [-1, 1] first).
        stem_stride, stem_pool: the stem's stride (code: 2) and its 3x3 s2 max-pool (code: on).
            The code's stem shrinks a 64^2 patch 4x before the first block; small CPU patches
            (32^2) keep their pixel-level cues (noise, JPEG blocks, edge sharpness) with
            ``stem_stride: 1, stem_pool: false``.
        highpass: > 0 feeds ``highpass * (x - box3x3(x))`` (reflect borders) instead of the RGB
            values: no colour and no low-frequency content, the cues that most easily tell two
            patches of one LR from patches of other LRs without being degradations (code: 0,
            RGB as is).
    """

    def __init__(self, layers: Sequence[int] = FULL_LAYERS, widths: Sequence[int] = FULL_WIDTHS,
                 stem: int = FULL_STEM, norm: str = 'bn', bn_splits: int = 1, in_range: str = 'zero_one',
                 stem_stride: int = 2, stem_pool: bool = True, highpass: float = 0.0):
        super().__init__()
        layers, widths = [int(v) for v in layers], [int(v) for v in widths]
        if len(layers) != len(widths) or not layers or min(layers) < 1 or min(widths) < 1:
            raise ValueError(f'layers {layers} and widths {widths} must be equally long lists of positive ints')
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if in_range not in ('zero_one', 'minus_one_one'):
            raise ValueError(f"in_range must be 'zero_one' or 'minus_one_one', got {in_range!r}")
        if int(stem_stride) not in (1, 2) or float(highpass) < 0:
            raise ValueError(f'stem_stride must be 1 or 2 and highpass >= 0, got {stem_stride}, {highpass}')
        self.config = dict(layers=layers, widths=widths, stem=int(stem), norm=norm, bn_splits=int(bn_splits),
                           in_range=in_range, stem_stride=int(stem_stride), stem_pool=bool(stem_pool),
                           highpass=float(highpass))
        self.in_range = in_range
        self.highpass = float(highpass)
        self.dim = widths[-1]
        self.conv1 = nn.Conv2d(3, int(stem), 7, int(stem_stride), 3, bias=False)
        self.bn1 = make_norm(norm, int(stem), int(bn_splits))
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem_pool else nn.Identity()
        stages: List[nn.Module] = []
        cin = int(stem)
        for i, (n, w) in enumerate(zip(layers, widths)):
            blocks = [BasicBlock(cin, w, 1 if i == 0 else 2, norm, int(bn_splits))]
            blocks += [BasicBlock(w, w, 1, norm, int(bn_splits)) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.layers = nn.ModuleList(stages)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (tokens ``[B, h'w', C]`` of the last stage, d ``[B, C]``)."""
        if self.in_range == 'minus_one_one':
            x = x * 2 - 1
        if self.highpass > 0:
            x = self.highpass * (x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode='reflect'), 3, stride=1))
        h = self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))
        for stage in self.layers:
            h = stage(h)
        return h.flatten(2).transpose(1, 2), h.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[1]


class MoCoHead(nn.Module):
    """MoCo v2 projection: Linear(d, d) - ReLU - Linear(d, dim). Stage 1 only."""

    def __init__(self, in_dim: int, dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, int(dim)))

    def forward(self, x):
        return self.net(x)


class MoCoEncoder(nn.Module):
    """Encoder + projection head: patch ``[B, 3, p, p]`` -> unnormalised embedding ``[B, dim]``."""

    def __init__(self, encoder: DegradationResNet, head_dim: int = 128):
        super().__init__()
        self.encoder = encoder
        self.head = MoCoHead(encoder.dim, head_dim)

    def forward(self, x):
        return self.head(self.encoder(x))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


LEARNER_WEIGHTS = 'degradation_learner.pth'
LEARNER_CONFIG = 'degradation_learner.json'


def save_degradation_learner(out_dir, encoder: DegradationResNet, meta=None) -> None:
    """Write ``<out_dir>/degradation_learner.pth`` (state dict) and ``.json`` (architecture +
    ``meta``), each through a temporary file and a rename."""
    import json
    import os
    from pathlib import Path
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(encoder.config)
    cfg['bn_splits'] = 1  # split-batch BN is a training-time choice; the weights are plain BN
    tmp = out / f'.{LEARNER_WEIGHTS}.tmp'
    torch.save({k: v.detach().cpu() for k, v in encoder.state_dict().items()}, tmp)
    os.replace(tmp, out / LEARNER_WEIGHTS)
    tmpj = out / f'.{LEARNER_CONFIG}.tmp'
    tmpj.write_text(json.dumps({'arch': cfg, 'meta': dict(meta or {})}, indent=2) + '\n')
    os.replace(tmpj, out / LEARNER_CONFIG)


def load_degradation_learner(path, device='cpu') -> DegradationResNet:
    """Load a learner written by :func:`save_degradation_learner` (a folder, or the folder of a
    stage-1 experiment whose ``export/`` holds it), frozen and in eval mode. A missing file is a
    one-line :class:`FileNotFoundError` naming it."""
    import json
    from pathlib import Path
    p = Path(path)
    if (p / 'export' / LEARNER_CONFIG).is_file():
        p = p / 'export'
    for name in (LEARNER_CONFIG, LEARNER_WEIGHTS):
        if not (p / name).is_file():
            raise FileNotFoundError(f'missing {p / name} (the stage-1 DeeDSR degradation learner: train it with '
                                    f'options/train/train_deedsr_stage1.yml and point at its export/ folder)')
    cfg = json.loads((p / LEARNER_CONFIG).read_text())['arch']
    net = DegradationResNet(**cfg)
    net.load_state_dict(torch.load(p / LEARNER_WEIGHTS, map_location='cpu'))
    net.requires_grad_(False)
    return net.eval().to(device)
