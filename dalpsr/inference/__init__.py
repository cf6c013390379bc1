"""Inference over test sets, the same for every method (dalpsr/test.py is its command line).

==============  ===========================================================================
module          what it owns
==============  ===========================================================================
options         test options: defaults, checks, the method (a restorer of
                RESTORER_REGISTRY) and the blocks it reads, fingerprint, per-image seeds
inputs          LR files under the input rules (gray/RGBA/16-bit/corrupt/tiny/huge), keys, GT
prompts         caption (p_s) and restoration-prompt (p_r) caches and the models making them
results         result folders (one rule: dalpsr.utils.experiment), a set's records, summaries
runner          ``test(opt)``: sets -> prompts -> batches -> restorer -> outputs + records
sharded         the run under ``accelerate launch``: units per process, part files merged
==============  ===========================================================================

A method plugs in as a registered :class:`dalpsr.restorers.base.Restorer`; diffusion methods
build their restorer on :class:`dalpsr.pipelines.loop.DenoisingLoop`.
"""
from dalpsr.inference.options import TEST_DEFAULTS, image_seed, resolve_test_opt  # noqa: F401
from dalpsr.inference.runner import test  # noqa: F401
