"""dalpsr: degradation-aware, diffusion-based real-world image super-resolution.

Sub-packages (each fills a registry when imported; heavy libraries are imported lazily):

- ``dalpsr.data``     degradation pipeline, prompt labels, datasets, loaders
- ``dalpsr.archs``    networks (IRPAD, RAM tagger, ControlNet/SD parts)
- ``dalpsr.models``   thin training wrappers used by ``dalpsr/train.py``
- ``dalpsr.losses``   losses
- ``dalpsr.metrics``  image-quality metrics (pyiqa based), shared by scripts/iqa.py and test.py
- ``dalpsr.utils``    registries, options, logging, image IO, basicsr compatibility
"""
__version__ = '0.1.0'
