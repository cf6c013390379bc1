"""DePLSR options: the reference documents every key and trains as is; the CPU and paper recipes
hold the published settings and build (paper networks on the meta device)."""
import inspect
import re
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _documented(text, key):
    lines = [ln for ln in text.splitlines() if re.match(rf'\s*#?\s*{re.escape(key)}:', ln)]
    return bool(lines) and any('#' in ln.split(f'{key}:', 1)[1] for ln in lines)


def _params(fn, drop=()):
    return [n for n, p in inspect.signature(fn).parameters.items()
            if n not in ('self',) + tuple(drop) and not n.startswith('_') and p.kind is not p.VAR_KEYWORD]


def test_reference_documents_every_deplsr_key():
    from dalpsr.archs.dat_arch import DAT
    from dalpsr.archs.realdat_arch import RealDAT
    from dalpsr.archs.srclip_arch import SRCLIP, SRCLIPLite
    from dalpsr.data.deplsr_datasets import DegradedPairDataset, SRCLIPCaptionDataset
    from dalpsr.data.deplsr_degradation import DePLSRDegradation
    from dalpsr.losses.siglip_loss import SigLIPLoss
    from dalpsr.models.realdat_model import RealDATModel
    from dalpsr.models.srclip_model import SRCLIPModel
    from dalpsr.restorers.realdat import RealDATRestorer
    text = (REPO / 'options' / 'reference' / 'deplsr.yml').read_text()
    keys = set(RealDATModel.KEYS) | set(SRCLIPModel.KEYS) | {'content', 'degradation', 'fine'}
    for fn in (DAT, RealDAT, SRCLIP, SRCLIPLite, SigLIPLoss, DegradedPairDataset, SRCLIPCaptionDataset,
               DePLSRDegradation, RealDATRestorer):
        keys |= set(_params(fn))
    assert {'fusion_residual', 'same_text_positive', 'chain', 'tile_overlap', 'caption_file'} <= keys
    missing = sorted(k for k in keys if not _documented(text, k))
    assert not missing, f'options/reference/deplsr.yml does not document {missing}'


def test_reference_trains_as_is(tmp_path):
    from dalpsr.train import train
    from dalpsr.utils.options import load_options
    opt = load_options(str(REPO / 'options' / 'reference' / 'deplsr.yml'), overrides=[
        f'datasets.train.cache_file={tmp_path}/p.npz', 'train.total_iter=4', 'train.progress_bar=false',
        'train.tensorboard=false'])
    opt['path'] = {'experiments_root': str(tmp_path)}
    opt['_args'] = {'resume': 'auto', 'force': False}
    res = train(opt)
    assert res['step'] == 4 and (res['export'] / 'realdat.json').is_file()


def test_recipes_hold_the_published_settings():
    from dalpsr.archs.realdat_arch import RealDAT
    from dalpsr.archs.dat_arch import count_parameters
    from dalpsr.utils.options import load_options
    real = load_options(str(REPO / 'options' / 'train' / 'train_realdat_x4.yml'))
    net = dict(real['model']['network'])
    assert net.pop('type') == 'RealDAT'
    with torch.device('meta'):
        assert count_parameters(RealDAT(**net)) == 18_061_131
    t = real['train']
    assert t['optimizer'] == {'type': 'Adam', 'lr': 2.0e-4, 'betas': [0.9, 0.99], 'weight_decay': 0.0}
    assert t['scheduler']['milestones'] == [250000, 400000, 450000, 475000] and t['total_iter'] == 500000
    clip = load_options(str(REPO / 'options' / 'train' / 'train_srclip_vitb32.yml'))
    n = clip['model']['network']
    assert n['type'] == 'SRCLIP' and n['model_name'] == 'ViT-B-32' and 'laion2B-s34B-b79K' in n['pretrained']
    assert clip['model']['weights'] == {'content': 0.2, 'degradation': 0.3, 'fine': 0.5}
    assert clip['train']['optimizer']['lr'] == 2.0e-5 and clip['train']['optimizer']['weight_decay'] == 0.2
    # the CPU baseline differs from the CPU RealDAT only by the conditioning (same data, steps, seed)
    a = load_options(str(REPO / 'options' / 'train' / 'train_realdat_cpu.yml'))
    b = load_options(str(REPO / 'options' / 'train' / 'train_dat_cpu.yml'))
    assert a['datasets'] == b['datasets'] and a['train'] == b['train'] and a['seed'] == b['seed']
    assert a['model']['network'] == b['model']['network'] and b['model']['conditioning'] == 'none'
