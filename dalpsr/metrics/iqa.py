"""The paper metric set on top of pyiqa: per-image metrics, folder evaluation, result files.

Metric names (case-insensitive; aliases in brackets) and what they are:

=========  ================================================  ====  =====================
name       pyiqa metric and default options                  mode  direction
=========  ================================================  ====  =====================
psnr       ``psnr``, Y of YCbCr (test_y_channel, ycbcr)       FR    higher is better
ssim       ``ssim``, Y of YCbCr (test_y_channel, ycbcr)       FR    higher is better
lpips      ``lpips`` (AlexNet, v0.1; input [0, 1])           FR    lower is better
dists      ``dists``                                         FR    lower is better
fid        ``fid`` (clean-fid, InceptionV3), SR vs GT folder folder lower is better
niqe       ``niqe`` (Y of YIQ, pristine model of basicsr)    NR    lower is better
musiq      ``musiq`` (KonIQ-10k checkpoint)                  NR    higher is better
maniqa     ``maniqa-pipal`` [maniqa-pipal]                   NR    higher is better
clipiqa    ``clipiqa`` (not clipiqa+)                        NR    higher is better
brisque    ``brisque``                                       NR    lower is better
clip_i     open_clip image-image cosine [clip-i, clipi]      FR    higher is better
=========  ================================================  ====  =====================

Any other pyiqa metric name is accepted with pyiqa's defaults. Presets: ``default`` (psnr ssim
lpips dists fid niqe musiq maniqa clipiqa), ``dalpsr`` (the DaLPSR table: lpips fid maniqa musiq
clipiqa), ``all`` (every row above).

Python API (interface 5)::

    ms = MetricSet(['psnr', 'lpips', 'musiq'], device='cuda', weights_dir=None, crop_border=4)
    ms.compute(sr, gt)     # sr, gt: (1, 3, H, W) in [0, 1] -> {'psnr': 27.1, 'lpips': 0.21, ...}
    summary = evaluate_folders('results/x', 'datasets/gt', metrics=['psnr', 'fid'], out_dir='out/x')

Metrics whose weights are missing are reported once (one line) and skipped; the others run.

This module is the public entry point; the code lives by concern in :mod:`~dalpsr.metrics.specs`
(names, presets, defaults), :mod:`~dalpsr.metrics.backends` (the metric classes),
:mod:`~dalpsr.metrics.metric_set` (:class:`MetricSet`) and :mod:`~dalpsr.metrics.folder_eval`
(:func:`evaluate_folders` and the result files).
"""
from dalpsr.metrics.backends import (CLIPIMetric, FIDMetric, IQAMetric, NIQEMetric, PyIQAMetric,  # noqa: F401
                                     build_metric)
from dalpsr.metrics.folder_eval import (LOG_FILE, OUTPUT_FILES, PARTIAL_FILE, evaluate_folders,  # noqa: F401
                                        markdown_table)
from dalpsr.metrics.metric_set import MetricSet  # noqa: F401
from dalpsr.metrics.specs import (ALIASES, LOGGER_NAME, METRIC_SPECS, PRESETS, IQAError,  # noqa: F401
                                  expand_metric_names)

__all__ = ['ALIASES', 'CLIPIMetric', 'FIDMetric', 'IQAError', 'IQAMetric', 'LOGGER_NAME', 'LOG_FILE', 'METRIC_SPECS',
           'MetricSet', 'NIQEMetric', 'OUTPUT_FILES', 'PARTIAL_FILE', 'PRESETS', 'PyIQAMetric', 'build_metric',
           'evaluate_folders', 'expand_metric_names', 'markdown_table']
