"""Metric backends: the :class:`IQAMetric` interface and its registered implementations (pyiqa
metrics, NIQE with its pristine model, CLIP-I, FID over two folders), built by :func:`build_metric`
from :data:`~dalpsr.metrics.specs.METRIC_SPECS`."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from dalpsr.metrics.specs import METRIC_SPECS, IQAError, _pyiqa_defaults
from dalpsr.metrics.weights import (WeightFile, check_files, niqe_params_file, offline_weights, required_files,
                                    resolve_weights_dir)
from dalpsr.utils.registry import METRIC_REGISTRY


class IQAMetric:
    """A metric as MetricSet uses it.

    Attributes: ``name`` (our name), ``label`` (table header), ``fmt`` (number format),
    ``mode`` ('FR', 'NR' or 'folder'), ``lower_better``, ``batchable`` (same-size images may be
    scored in one call), ``options`` (every option, recorded in summary.json), ``weight_files``.
    ``score(sr, gt)``: (B, 3, H, W) in [0, 1] (gt None for NR) -> list of B floats.
    Folder metrics implement ``score_folders(sr_files, gt_files) -> float`` instead.
    """
    name = ''
    label = ''
    fmt = '.4f'
    mode = 'NR'
    lower_better = False
    batchable = True
    same_size = True  # full-reference metric that needs sr and gt of the same size

    def __init__(self):
        self.options: Dict[str, Any] = {}
        self.weight_files: List[str] = []

    def score(self, sr: torch.Tensor, gt: Optional[torch.Tensor] = None) -> List[float]:
        raise NotImplementedError


def _arch_defaults(arch_type: str) -> Dict[str, Any]:
    """Keyword defaults of a pyiqa arch constructor (recorded so summary.json lists every option)."""
    import inspect
    import pyiqa.archs
    from pyiqa.archs import ARCH_REGISTRY as PYIQA_ARCHS
    try:
        if arch_type not in PYIQA_ARCHS:  # pyiqa 0.1.16 imports arch modules lazily
            pyiqa.archs._lazy_import_arch(arch_type)
        sig = inspect.signature(PYIQA_ARCHS.get(arch_type).__init__)
    except Exception:  # noqa: BLE001 - recording is best effort
        return {}
    return {k: p.default for k, p in sig.parameters.items()
            if k != 'self' and p.default is not inspect.Parameter.empty
            and isinstance(p.default, (bool, int, float, str, type(None), list, tuple))}


@METRIC_REGISTRY.register()
class PyIQAMetric(IQAMetric):
    """A pyiqa metric built offline from the weights folder (see dalpsr.metrics.weights)."""

    def __init__(self, name: str, pyiqa_name: str, options: Optional[Dict[str, Any]] = None,
                 device: str = 'cpu', hub: Optional[Path] = None, label: Optional[str] = None,
                 fmt: str = '.4f'):
        super().__init__()
        self.name, self.pyiqa_name = name, pyiqa_name
        self.label, self.fmt = label or name.upper(), fmt
        cfg = _pyiqa_defaults(pyiqa_name)
        self.mode = cfg.get('metric_mode', 'NR')
        self.lower_better = bool(cfg.get('lower_better', False))
        self.hub = hub or resolve_weights_dir()
        self.device = torch.device(device)
        user = dict(options or {})
        self.options = {**_arch_defaults(cfg['metric_opts']['type']), **cfg['metric_opts'], **user}
        files = required_files(pyiqa_name, self.options, self.hub)
        self.weight_files = [f.path for f in files]
        check_files(name, files, self.hub)
        kwargs = self._create_kwargs(user, files)
        with offline_weights(self.hub):
            import pyiqa
            self.net = pyiqa.create_metric(pyiqa_name, device=self.device, **kwargs)
        self.net.eval()

    def _create_kwargs(self, user: Dict[str, Any], files: List[WeightFile]) -> Dict[str, Any]:
        kwargs = dict(user)
        if self.options.get('type') == 'CLIPIQA':
            # hand pyiqa the checked local file: its own loader would re-download on a hash mismatch
            kwargs['backbone'] = files[0].path
        return kwargs

    def score(self, sr: torch.Tensor, gt: Optional[torch.Tensor] = None) -> List[float]:
        with torch.no_grad():
            if self.mode == 'FR':
                out = self.net(sr.to(self.device), gt.to(self.device))
            else:
                out = self.net(sr.to(self.device))
        return [float(v) for v in torch.as_tensor(out).reshape(-1).cpu()]


@METRIC_REGISTRY.register()
class NIQEMetric(PyIQAMetric):
    """pyiqa's NIQE with its pristine-model file; offline it is derived from basicsr's
    ``niqe_pris_params.npz`` (the same MATLAB pristine model), see docs/metrics.md."""

    def __init__(self, name: str = 'niqe', pyiqa_name: str = 'niqe', options: Optional[Dict[str, Any]] = None,
                 device: str = 'cpu', hub: Optional[Path] = None, label: Optional[str] = 'NIQE',
                 fmt: str = '.4f'):
        options = dict(options or {})
        hub = hub or resolve_weights_dir()
        source = 'options.niqe.pretrained_model_path'
        if not options.get('pretrained_model_path') and options.get('version', 'original') == 'original':
            found = niqe_params_file(hub)
            options['pretrained_model_path'] = found['path']
            source = found['source']
        super().__init__(name, pyiqa_name, options, device, hub, label, fmt)
        self.options['params_source'] = source

    def score(self, sr: torch.Tensor, gt: Optional[torch.Tensor] = None) -> List[float]:
        crop = int(self.options.get('crop_border', 0) or 0)
        h, w = sr.shape[-2] - 2 * crop, sr.shape[-1] - 2 * crop
        if min(h, w) < 96:  # NIQE's patch size: a smaller image has no patch to score
            raise IQAError(f'image {w}x{h} (after crop) is smaller than the 96x96 NIQE patch')
        return super().score(sr, gt)


@METRIC_REGISTRY.register()
class CLIPIMetric(IQAMetric):
    """CLIP-I (image-image CLIP cosine similarity), see dalpsr.metrics.clip_i."""
    mode = 'FR'
    lower_better = False
    same_size = False

    def __init__(self, name: str = 'clip_i', options: Optional[Dict[str, Any]] = None, device: str = 'cpu',
                 hub: Optional[Path] = None, label: str = 'CLIP-I', fmt: str = '.4f', pyiqa_name=None):
        super().__init__()
        from dalpsr.metrics.clip_i import CLIPImageSimilarity
        from dalpsr.utils.options import check_keys
        self.name, self.label, self.fmt = name, label, fmt
        opts = dict(options or {})
        check_keys(opts, ('model', 'pretrained', 'model_config', 'quick_gelu'), f'options.{name}')
        self.net = CLIPImageSimilarity(device=device, hub=hub or resolve_weights_dir(), **opts)
        self.options = dict(self.net.info)
        self.weight_files = [self.net.info['checkpoint']] if self.net.info['checkpoint'] else []

    def score(self, sr: torch.Tensor, gt: Optional[torch.Tensor] = None) -> List[float]:
        return [float(v) for v in self.net(sr, gt).cpu()]


@METRIC_REGISTRY.register()
class FIDMetric(IQAMetric):
    """FID between the SR folder and the GT folder (pyiqa's clean-fid implementation).

    Every readable image of each folder is used (paired or not). Files are handed to pyiqa
    through a temporary folder of links; images that are not plain 8-bit RGB (grayscale, RGBA,
    16-bit) are first converted by dalpsr's read rules and written as 8-bit PNG.
    """
    mode = 'folder'
    lower_better = True
    batchable = False
    CALL_KEYS = ('mode', 'batch_size', 'num_workers')

    def __init__(self, name: str = 'fid', pyiqa_name: str = 'fid', options: Optional[Dict[str, Any]] = None,
                 device: str = 'cpu', hub: Optional[Path] = None, label: str = 'FID', fmt: str = '.2f'):
        super().__init__()
        self.name, self.label, self.fmt = name, label, fmt
        self.hub = hub or resolve_weights_dir()
        self.device = torch.device(device)
        opts = dict(options or {})
        self.call_kwargs = {k: opts.pop(k) for k in list(opts) if k in self.CALL_KEYS}
        cfg = _pyiqa_defaults(pyiqa_name)
        self.options = {**_arch_defaults('FID'), **cfg['metric_opts'], **opts, **self.call_kwargs}
        files = required_files(pyiqa_name, self.options, self.hub)
        self.weight_files = [f.path for f in files]
        check_files(name, files, self.hub)
        with offline_weights(self.hub):
            import pyiqa
            self.net = pyiqa.create_metric(pyiqa_name, device=self.device, **opts)

    def score_folders(self, sr_images: Sequence[Tuple[str, bool]], gt_images: Sequence[Tuple[str, bool]]) -> float:
        """``*_images``: (path, plain) for each readable image; plain = 8-bit 3-channel file."""
        from dalpsr.utils.img_io import read_image, write_image
        if len(sr_images) < 2 or len(gt_images) < 2:
            raise IQAError(f"fid needs at least 2 readable images per folder (SR {len(sr_images)}, "
                           f"GT {len(gt_images)})")
        with tempfile.TemporaryDirectory(prefix='dalpsr_fid_') as tmp:
            dirs = []
            for side, images in (('sr', sr_images), ('gt', gt_images)):
                d = Path(tmp) / side
                d.mkdir()
                for i, (path, plain) in enumerate(images):
                    stem = f'{i:07d}_{Path(path).stem}'
                    if plain:
                        dst = d / f'{stem}{Path(path).suffix.lower()}'
                        try:
                            dst.symlink_to(os.path.abspath(path))
                        except OSError:
                            shutil.copyfile(path, dst)
                    else:
                        write_image(d / f'{stem}.png', read_image(path))
                dirs.append(str(d))
            with torch.no_grad():
                return float(self.net(dirs[0], dirs[1], verbose=False, **self.call_kwargs))


def build_metric(name: str, device: str = 'cpu', hub: Optional[Path] = None,
                 options: Optional[Dict[str, Any]] = None, crop_border: int = 0) -> IQAMetric:
    """Build metric ``name`` (canonical, see :func:`expand_metric_names`)."""
    hub = hub or resolve_weights_dir()
    options = dict(options or {})
    spec = METRIC_SPECS.get(name)
    if spec is None and name in METRIC_REGISTRY:  # a user metric registered from `imports:`
        return METRIC_REGISTRY.get(name)(name=name, options=options, device=device, hub=hub)
    if spec is None:
        spec = dict(type='PyIQAMetric', pyiqa_name=name, label=name.upper(), fmt='.4f', defaults={})
    opts = dict(spec['defaults'])
    if spec.get('crop') and crop_border:
        opts['crop_border'] = int(crop_border)
    opts.update(options)
    cls = METRIC_REGISTRY.get(spec['type'])
    if spec['type'] == 'CLIPIMetric':
        return cls(name=name, options=opts, device=device, hub=hub, label=spec['label'], fmt=spec['fmt'])
    return cls(name=name, pyiqa_name=spec['pyiqa_name'], options=opts, device=device, hub=hub,
               label=spec['label'], fmt=spec['fmt'])

