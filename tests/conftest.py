"""Shared test setup: offline hub, small real images from installed packages."""
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread by default: the tiny models gain little from more, and on a shared machine
# oversubscribed threads made them up to 30x slower. DALPSR_TEST_THREADS=N overrides.
torch.set_num_threads(max(1, int(os.environ.get('DALPSR_TEST_THREADS', '1'))))

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='session')
def repo_root():
    return REPO_ROOT


@pytest.fixture(scope='session')
def sample_paths():
    """{'train': [...], 'val': [...]} paths of photographs shipped in installed packages."""
    from dalpsr.data.sample_images import sample_image_paths
    return {'train': sample_image_paths('train'), 'val': sample_image_paths('val')}


@pytest.fixture
def hr_folder(tmp_path, sample_paths):
    """A folder with 3 real RGB photographs (copied), usable as an HR training folder."""
    import shutil
    d = tmp_path / 'hr'
    d.mkdir()
    for p in sample_paths['train'][:3]:
        shutil.copyfile(p, d / p.name)
    return d


@pytest.fixture
def rng():
    return np.random.default_rng(0)
