"""The comparison harness: every method on the same test sets, one metric set, speed and memory,
beside the published numbers (``scripts/compare.py``; guide: docs/compare.md).

==============  ===========================================================================
module          what it owns
==============  ===========================================================================
options         compare options (methods = test options files + overrides, sets, metrics, figure)
harness         ``compare(opt)``: cells method x set through test.py's core, scored by the metric
                code of scripts/iqa.py, done state per cell, the folder rule
published       options/compare/published.yml: checks, the published rows beside ours
table           table.md / table.csv / table.json
figure          crops of LR, each method and HR side by side (also scripts/plot_sr_crops.py)
testsets        the test-set protocols of the papers from what a user downloads (prepare_testsets.py)
==============  ===========================================================================
"""
