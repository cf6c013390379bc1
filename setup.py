"""Install dalpsr (dependencies are pinned in requirements.txt; install those first)."""
import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, 'requirements.txt')) as f:
    requirements = [ln.strip() for ln in f if ln.strip() and not ln.startswith('#')]

setup(
    name='dalpsr',
    version='0.1.0',
    description='Degradation-aware, diffusion-based real-world image super-resolution (DaLPSR and related systems)',
    long_description=open(os.path.join(here, 'README.md'), encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['dalpsr', 'dalpsr.*']),
    # data files read at run time (architecture configs, the RAM checkpoint layout, tag vocabulary)
    package_data={'dalpsr': ['archs/*.json', 'archs/configs/*.json', 'captioning/*.txt']},
    python_requires='>=3.10',
    install_requires=requirements,
    license='Apache-2.0',
)
