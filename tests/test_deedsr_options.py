"""DeeDSR options files: options/reference/deedsr.yml documents every key of the two models, the
dataset and the restorer (with the code's defaults); the paper recipes hold the published settings;
every DeeDSR recipe uses documented keys only."""
import inspect
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
REF = REPO / 'options' / 'reference' / 'deedsr.yml'
RECIPES = ['train/train_deedsr_stage1.yml', 'train/train_deedsr_stage1_cpu.yml', 'train/train_deedsr_stage1_tiny.yml',
           'train/train_deedsr_stage2_sd21.yml', 'train/train_deedsr_stage2_tiny.yml',
           'test/test_deedsr_sd21.yml', 'test/test_deedsr_tiny.yml']


def _docs():
    return list(yaml.safe_load_all(REF.read_text()))


def _keys(d, prefix=''):
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= _keys(v, prefix + k + '.')
    return out


def test_reference_documents_every_key_with_the_defaults():
    from dalpsr.archs.sd_components import SD_KEYS
    from dalpsr.data.deedsr_dataset import DeeDSRDataset
    from dalpsr.models import deedsr_model, deedsr_moco_model
    from dalpsr.restorers import deedsr as restorer
    s1, s2, inf = _docs()
    m1 = dict(s1['model'])
    assert m1.pop('type') == 'MoCoDegradationModel'
    assert set(m1) == set(deedsr_moco_model.DEFAULTS)
    assert set(m1['network']) == set(deedsr_moco_model.NETWORK_KEYS)
    for k, v in deedsr_moco_model.DEFAULTS.items():
        if k != 'network':
            assert m1[k] == v, k
    extra = set(inspect.signature(DeeDSRDataset.__init__).parameters) - {'self', 'args', 'kwargs'}
    assert extra <= set(s1['datasets']['train'])
    m2 = dict(s2['model'])
    assert m2.pop('type') == 'DeeDSRModel'
    assert set(m2) == set(deedsr_model.DEFAULTS)
    assert m2['adapter'] == deedsr_model.ADAPTER_DEFAULTS
    assert set(m2['sd']) == set(SD_KEYS)
    for k in ('spade_hidden', 'scale', 'gradient_checkpointing', 'frozen_dtype', 'latent_sample', 'val'):
        assert m2[k] == deedsr_model.DEFAULTS[k], k
    assert inf['method']['type'] == 'DeeDSR'
    assert set(inf['model']) == set(restorer.MODEL_DEFAULTS)
    assert set(inf['sampler']) == set(restorer.LOOP_KEYS)
    for k, v in restorer.SAMPLER_DEFAULTS.items():
        assert inf['sampler'][k] == v, k
    # each key commented where it first appears
    seen = set()
    for line in REF.read_text().splitlines():
        s = line.split('#')[0]
        if ':' in s and not line.lstrip().startswith(('#', '-', '---')):
            key = s.strip().split(':')[0]
            if key and key not in seen and not s.strip().startswith('{'):
                seen.add(key)
                containers = ('name', 'datasets', 'train', 'model', 'sampler')  # loop keys: train.yml
                assert '#' in line or key in containers, line


def test_recipes_use_documented_keys_only():
    documented = set()
    for d in _docs():
        documented |= _keys({k: d[k] for k in ('model', 'sampler') if k in d})
        for ds in (d.get('datasets') or {}).values():
            documented |= _keys(ds, 'datasets.')
    from dalpsr.data.triplet_dataset import TripletDataset
    documented |= {f'datasets.{k}' for k in inspect.signature(TripletDataset.__init__).parameters}
    documented |= {'datasets.batch_size', 'datasets.num_workers', 'model.device', 'datasets.degradation',
                   'datasets.prompt'}
    for rel in RECIPES:
        opt = yaml.safe_load((REPO / 'options' / rel).read_text())
        keys = _keys({k: opt[k] for k in ('model', 'sampler') if k in opt})
        for ds in (opt.get('datasets') or {}).values():
            if 'type' in ds:
                keys |= {k for k in _keys(ds, 'datasets.') if not k.startswith(('datasets.degradation.',
                                                                                  'datasets.prompt.'))}
        assert keys <= documented, (rel, sorted(keys - documented))


def test_paper_recipes_hold_the_published_settings():
    s1 = yaml.safe_load((REPO / 'options/train/train_deedsr_stage1.yml').read_text())
    net = s1['model']['network']
    assert (net['layers'], net['widths'], net['stem']) == ([3, 4, 6, 3], [128, 256, 512, 1024], 64)
    assert (s1['model']['momentum'], s1['model']['temperature']) == (0.999, 0.07)
    t = s1['train']
    assert t['optimizer'] == {'type': 'SGD', 'lr': 0.03, 'momentum': 0.9, 'weight_decay': 1.0e-4}
    assert t['scheduler']['gamma'] == 0.1 and len(t['scheduler']['milestones']) == 2
    assert s1['datasets']['train']['gt_size'] // s1['datasets']['train']['scale'] == 128
    assert s1['datasets']['train']['patch_size'] == 64
    assert s1['model']['queue_size'] % (t['batch_size'] * 4) == 0
    s2 = yaml.safe_load((REPO / 'options/train/train_deedsr_stage2_sd21.yml').read_text())
    t2 = s2['train']
    assert t2['batch_size'] * 4 * t2['grad_accum'] == 128 and t2['total_iter'] == 65840
    assert t2['optimizer']['lr'] == 1.0e-5 and s2['datasets']['train']['gt_size'] == 512
    from dalpsr.models.deedsr_model import ADAPTER_DEFAULTS
    assert s2['model']['adapter'] == ADAPTER_DEFAULTS
    for s in (s1, s2):
        d = s['datasets']['train']
        assert d['no_degradation_prob'] == 0.01
        assert (d['degradation']['blur_sigma'], d['degradation']['noise_range'], d['degradation']['jpeg_range'],
                d['degradation']['second_blur_prob']) == ([0.2, 1.5], [1, 15], [60, 95], 0.5)
    assert s1['datasets']['train']['degradation'] == s2['datasets']['train']['degradation']
    # the StableSR settings are accepted by the degradation
    from dalpsr.data.deedsr_dataset import DeeDSRDataset
    d = dict(s2['datasets']['train'])
    for k in ('type', 'batch_size', 'num_workers'):
        d.pop(k)
    d['dataroot_gt'] = 'sample:train'
    item = DeeDSRDataset(**dict(d, gt_size=64))[0]
    assert item['lq'].shape == (3, 16, 16)
    t = yaml.safe_load((REPO / 'options/test/test_deedsr_sd21.yml').read_text())['sampler']
    assert (t['scheduler'], t['num_steps'], t['eta'], t['start'], t['guidance_scale']) == \
        ('ddim', 50, 1.0, 'noise_guidance', 1.0)
    assert (t['tile']['latent_size'] * 8, (t['tile']['latent_size'] - t['tile']['latent_overlap']) * 8) == (1024, 800)
