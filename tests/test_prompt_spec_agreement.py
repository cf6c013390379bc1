"""The label definition is one decision (issue 18, docs/irpad.md "Label definition"): every
shipped recipe that trains IRPAD or trains DaLPSR's ControlNet on restoration prompts p_r uses
the same PromptSpec, so an IRPAD trained with one recipe predicts the p_r that a ControlNet of
another recipe was trained on (test.py also refuses a mismatch of two exports at run time)."""
from pathlib import Path

import pytest

from dalpsr.data.prompt_labels import PromptSpec
from dalpsr.utils.options import load_options

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / 'options' / 'train'
#: the project's decision: noise degree from the noise measured in each LR
NOISE_SEVERITY = 'measured'


def _specs(path: Path):
    """(where, PromptSpec) of every prompt block of a recipe that labels p_r or IRPAD targets."""
    opt = load_options(str(path))
    model = opt['model']
    out = []
    if model['type'] == 'IRPADModel' and model.get('prompt') is not None:
        out.append(('model.prompt', PromptSpec.from_opt(model['prompt'])))
    for phase, ds in (opt.get('datasets') or {}).items():
        if ds.get('prompt') is not None:
            out.append((f'datasets.{phase}.prompt', PromptSpec.from_opt(ds['prompt'])))
        build = ds.get('build') or {}
        if build.get('prompt') is not None:
            out.append((f'datasets.{phase}.build.prompt', PromptSpec.from_opt(build['prompt'])))
    return out


RECIPES = sorted(p for p in TRAIN.glob('*.yml')
                 if load_options(str(p))['model']['type'] in ('IRPADModel', 'DaLPSRModel'))


def test_the_recipes_are_found():
    names = {p.name for p in RECIPES}
    assert {'train_irpad.yml', 'train_irpad_cpu.yml', 'train_dalpsr_sd21.yml', 'train_dalpsr_tiny.yml'} <= names


@pytest.mark.parametrize('path', RECIPES, ids=lambda p: p.name)
def test_every_irpad_and_dalpsr_recipe_labels_noise_alike(path):
    specs = _specs(path)
    assert specs, f'{path.name} has no prompt block: its labels would silently be the code default'
    reference = PromptSpec.from_opt({'types': ['blur', 'noise', 'jpeg'], 'num_intervals': 4,
                                     'noise_severity': NOISE_SEVERITY})
    for where, spec in specs:
        assert spec.to_opt() == reference.to_opt(), f'{path.name} {where}: {spec.to_opt()}'
