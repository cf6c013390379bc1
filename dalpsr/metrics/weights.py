"""Where IQA weight files live, which files each metric needs, and a no-download guard.

**The weights folder** plays the role of ``$TORCH_HOME/hub`` (pyiqa's own cache layout), chosen as:

1. the ``weights_dir`` argument / ``--weights-dir`` option, else
2. the environment variable ``DALPSR_IQA_WEIGHTS``, else
3. ``torch.hub.get_dir()`` (``$TORCH_HOME/hub``, by default ``~/.cache/torch/hub``), so an
   existing pyiqa cache is used as is.

Inside it, files go where pyiqa 0.1.16 / torchvision / open_clip look for them::

    <weights>/pyiqa/<url basename>         pyiqa checkpoints (LPIPS_v0.1_alex-df73285e.pth, ...)
    <weights>/checkpoints/<url basename>   torchvision backbones (alexnet-owt-7be5be79.pth, ...)
    <weights>/clip/RN50.pt                 OpenAI CLIP backbone of CLIPIQA
    <weights>/open_clip/<url basename>     open_clip checkpoints for CLIP-I (or the HF cache)
    <weights>/dalpsr/                      files dalpsr derives itself (NIQE parameters from basicsr)

**No downloads, ever.** :func:`required_files` lists the files a metric needs; metrics check
them before being built and fail alone with one line naming the missing file, where to put it
and the URL it comes from (:class:`MissingWeightsError`). As a second line of defence
:func:`offline_weights` (used around every metric construction) points torch.hub and pyiqa's
cache at the weights folder, turns the Hugging Face hub offline and replaces the download
functions of torch.hub and pyiqa by one that raises :class:`MissingWeightsError`, so an
unforeseen download cannot hang.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union
from urllib.parse import urlparse

#: Environment variable that selects the weights folder (see module doc).
ENV_WEIGHTS = 'DALPSR_IQA_WEIGHTS'

#: URL of a pyiqa checkpoint (its Hugging Face mirror, as pyiqa 0.1.16 builds it).
PYIQA_HF_BASE = 'https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main'

_LOCK = threading.RLock()


class MissingWeightsError(RuntimeError):
    """A metric's weight file is absent; ``str(err)`` is one line naming it and where to put it."""


@dataclass(frozen=True)
class WeightFile:
    """One file a metric needs: ``path`` (absolute, where it must be) and ``url`` (its source)."""
    path: str
    url: str

    @property
    def basename(self) -> str:
        return os.path.basename(urlparse(self.url).path) if self.url else os.path.basename(self.path)

    def exists(self) -> bool:
        return os.path.isfile(self.path)


def resolve_weights_dir(weights_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The weights folder: argument, else ``$DALPSR_IQA_WEIGHTS``, else ``torch.hub.get_dir()``."""
    if weights_dir:
        return Path(weights_dir).expanduser().absolute()
    env = os.environ.get(ENV_WEIGHTS)
    if env:
        return Path(env).expanduser().absolute()
    import torch.hub
    return Path(torch.hub.get_dir()).expanduser().absolute()


def _basename(url: str) -> str:
    return os.path.basename(urlparse(url).path)


def pyiqa_file(hub: Path, url: str) -> WeightFile:
    return WeightFile(str(hub / 'pyiqa' / _basename(url)), url)


def torchvision_file(hub: Path, weights_enum_member) -> WeightFile:
    url = weights_enum_member.url
    return WeightFile(str(hub / 'checkpoints' / _basename(url)), url)


def required_files(pyiqa_name: str, opts: Dict[str, Any], hub: Path) -> List[WeightFile]:
    """Weight files pyiqa 0.1.16 loads to build metric ``pyiqa_name`` with options ``opts``.

    ``opts`` are the merged pyiqa metric options (pyiqa defaults updated with the user's).
    Metrics not listed here return ``[]``; if they still try a download, :func:`offline_weights`
    turns it into a :class:`MissingWeightsError`.
    """
    from torchvision import models as tvm
    arch = opts.get('type')
    files: List[WeightFile] = []
    if arch == 'LPIPS':
        from pyiqa.archs.lpips_arch import default_model_urls
        net, version = opts.get('net', 'alex'), str(opts.get('version', '0.1'))
        backbone = {'alex': tvm.AlexNet_Weights.IMAGENET1K_V1, 'vgg': tvm.VGG16_Weights.IMAGENET1K_V1,
                    'vgg16': tvm.VGG16_Weights.IMAGENET1K_V1,
                    'squeeze': tvm.SqueezeNet1_1_Weights.IMAGENET1K_V1}.get(net)
        # pyiqa's alexnet/vgg16 load ImageNet weights whatever pnet_rand says; squeezenet obeys it
        if backbone is not None and not (net == 'squeeze' and opts.get('pnet_rand', False)):
            files.append(torchvision_file(hub, backbone))
        if opts.get('pretrained_model_path'):
            files.append(WeightFile(str(opts['pretrained_model_path']), ''))
        elif opts.get('pretrained', True) and opts.get('lpips', True):
            files.append(pyiqa_file(hub, default_model_urls[f'{version}_{net}']))
    elif arch == 'DISTS':
        from pyiqa.archs.dists_arch import default_model_urls
        files.append(torchvision_file(hub, tvm.VGG16_Weights.IMAGENET1K_V1))
        if opts.get('pretrained_model_path'):
            files.append(WeightFile(str(opts['pretrained_model_path']), ''))
        elif opts.get('pretrained', True):
            files.append(pyiqa_file(hub, default_model_urls['url']))
    elif arch == 'MUSIQ':
        from pyiqa.archs.musiq_arch import default_model_urls
        if opts.get('pretrained_model_path'):
            files.append(WeightFile(str(opts['pretrained_model_path']), ''))
        elif opts.get('pretrained', True):
            key = 'ava' if isinstance(opts.get('pretrained', True), bool) else opts['pretrained']
            files.append(pyiqa_file(hub, default_model_urls[key]))
    elif arch == 'MANIQA':
        from pyiqa.archs.maniqa_arch import default_model_urls
        if opts.get('pretrained_model_path'):
            files.append(WeightFile(str(opts['pretrained_model_path']), ''))
        elif opts.get('pretrained', True):
            files.append(pyiqa_file(hub, default_model_urls[opts.get('train_dataset', 'pipal')]))
    elif arch == 'CLIPIQA':
        from pyiqa.archs.clip_model import _MODELS
        backbone = opts.get('backbone', 'RN50')
        if backbone in _MODELS:
            files.append(WeightFile(str(hub / 'clip' / _basename(_MODELS[backbone])), _MODELS[backbone]))
        else:
            files.append(WeightFile(str(backbone), ''))
        model_type = opts.get('model_type', 'clipiqa')
        if opts.get('pretrained', True) and 'clipiqa+' in model_type:
            from pyiqa.archs.clipiqa_arch import default_model_urls
            key = 'clipiqa+' if (model_type == 'clipiqa+' and backbone == 'RN50') else model_type
            if key in default_model_urls:
                files.append(pyiqa_file(hub, default_model_urls[key]))
    elif arch == 'BRISQUE':
        from pyiqa.archs.brisque_arch import default_model_urls
        if opts.get('pretrained_model_path'):
            files.append(WeightFile(str(opts['pretrained_model_path']), ''))
        else:
            key = 'url' if opts.get('version', 'original') == 'original' else 'brisque_matlab'
            files.append(pyiqa_file(hub, default_model_urls[key]))
    elif arch == 'FID':
        if opts.get('backbone', 'inceptionv3') == 'inceptionv3':
            from pyiqa.archs.inception import FID_WEIGHTS_URL
            files.append(pyiqa_file(hub, FID_WEIGHTS_URL))
    elif arch == 'NIQE' and opts.get('pretrained_model_path'):
        files.append(WeightFile(str(opts['pretrained_model_path']), ''))
    return files


def missing_message(metric: str, missing: List[WeightFile], hub: Path) -> str:
    """One line: which files are missing, where they go and where they come from."""
    parts = []
    for f in missing:
        if f.url:
            parts.append(f"{f.path} (get {f.basename} from {f.url})")
        else:
            parts.append(f"{f.path} (a local file given in the options)")
    what = 'weight file missing' if len(missing) == 1 else f'{len(missing)} weight files missing'
    return (f"{metric}: {what}: {'; '.join(parts)} -- weights folder {hub} "
            f"(--weights-dir / ${ENV_WEIGHTS}; see docs/metrics.md)")


def check_files(metric: str, files: List[WeightFile], hub: Path) -> None:
    """Raise :class:`MissingWeightsError` (one line) if any of ``files`` is absent."""
    missing = [f for f in files if not f.exists()]
    if missing:
        raise MissingWeightsError(missing_message(metric, missing, hub))


def _refuse_download(url, dst, *args, **kwargs):
    raise MissingWeightsError(f"weight file missing: {dst} (get {_basename(str(url))} from {url}); "
                              "dalpsr never downloads metric weights (see docs/metrics.md)")


class _NoPretrainedTimm:
    """Stand-in for the ``timm`` module inside pyiqa's MANIQA arch: builds the ViT without
    fetching ImageNet weights, which the MANIQA checkpoint (loaded strictly) overwrites anyway."""

    def __init__(self, timm_module):
        self._timm = timm_module

    def create_model(self, *args, **kwargs):
        kwargs['pretrained'] = False
        return self._timm.create_model(*args, **kwargs)

    def __getattr__(self, item):
        return getattr(self._timm, item)


@contextmanager
def offline_weights(hub: Path) -> Iterator[None]:
    """Build metrics inside this block: caches point into ``hub``; downloads raise.

    Restores torch.hub's folder, pyiqa's cache folder, the download functions and the Hugging
    Face offline flag on exit. Not re-entrant across threads (a lock serialises users).
    """
    import torch.hub
    import huggingface_hub.constants as hf_constants
    import pyiqa.utils.download_util as pyiqa_dl
    import pyiqa.archs.maniqa_arch as maniqa_arch
    with _LOCK:
        saved = (getattr(torch.hub, '_hub_dir', None), pyiqa_dl.DEFAULT_CACHE_DIR,
                 torch.hub.download_url_to_file, pyiqa_dl.download_url_to_file,
                 hf_constants.HF_HUB_OFFLINE, maniqa_arch.timm)
        torch.hub.set_dir(str(hub))
        pyiqa_dl.DEFAULT_CACHE_DIR = str(hub / 'pyiqa')
        torch.hub.download_url_to_file = _refuse_download
        pyiqa_dl.download_url_to_file = _refuse_download
        hf_constants.HF_HUB_OFFLINE = True
        maniqa_arch.timm = _NoPretrainedTimm(saved[5])
        try:
            yield
        finally:
            torch.hub._hub_dir = saved[0]
            pyiqa_dl.DEFAULT_CACHE_DIR = saved[1]
            torch.hub.download_url_to_file = saved[2]
            pyiqa_dl.download_url_to_file = saved[3]
            hf_constants.HF_HUB_OFFLINE = saved[4]
            maniqa_arch.timm = saved[5]


# ---- NIQE pristine parameters ---------------------------------------------------------------

def niqe_params_file(hub: Path) -> Dict[str, str]:
    """A NIQE parameter file pyiqa can read: the official one if present, else one derived
    from basicsr's ``niqe_pris_params.npz`` (same pristine model) and cached under
    ``<weights>/dalpsr/`` (or a temporary folder if the weights folder is read-only).

    Returns ``{'path': ..., 'source': 'official niqe_modelparameters.mat' | 'basicsr ...'}``.
    """
    from pyiqa.archs.niqe_arch import default_model_urls
    official = pyiqa_file(hub, default_model_urls['url'])
    if official.exists():
        return {'path': official.path, 'source': 'official niqe_modelparameters.mat (pyiqa cache)'}
    import numpy as np
    import scipy.io
    from dalpsr.utils.basicsr_compat import import_basicsr
    from dalpsr.utils.misc import atomic_path
    npz = Path(import_basicsr('metrics').__file__).parent / 'niqe_pris_params.npz'
    if not npz.is_file():
        raise MissingWeightsError(f"niqe: neither {official.path} (get {official.basename} from "
                                  f"{official.url}) nor basicsr's {npz} exists")
    data = np.load(npz)
    candidates = [hub / 'dalpsr']
    import tempfile
    candidates.append(Path(tempfile.gettempdir()) / f'dalpsr_iqa_{os.getuid() if hasattr(os, "getuid") else 0}')
    for folder in candidates:
        target = folder / 'niqe_pris_params_from_basicsr.mat'
        if target.is_file():
            return {'path': str(target), 'source': f'basicsr {npz.name} (converted, cached)'}
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                scipy.io.savemat(str(tmp), {'mu_prisparam': data['mu_pris_param'],
                                            'cov_prisparam': data['cov_pris_param']})
            return {'path': str(target), 'source': f'basicsr {npz.name} (converted)'}
        except OSError:
            continue
    raise MissingWeightsError(f"niqe: could not write the NIQE parameter file under {candidates[0]}")
