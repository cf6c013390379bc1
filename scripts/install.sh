#!/usr/bin/env bash
# Create ./venv with the pinned requirements and dalpsr installed in editable mode.
# Idempotent: a venv whose stamp matches requirements.txt + setup.py is reused.
# Usage: bash scripts/install.sh            (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=venv/.dalpsr-installed
WANT=$(cat requirements.txt setup.py | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  echo "venv is up to date (delete venv/ to rebuild)"; exit 0
fi
"$PY" -c 'import sys; assert sys.version_info[:2] >= (3, 10), "Python >= 3.10 needed (3.11 tested)"'
[ -d venv ] || "$PY" -m venv venv
. venv/bin/activate
# basicsr builds from source and needs torch at build time: --no-build-isolation, which in
# turn needs setuptools >= 70.1 (and < 81: pyiqa's CLIP metrics need pkg_resources).
pip install -q "setuptools>=70.1,<81" wheel
pip install -q --no-build-isolation -r requirements.txt
pip install -q --no-build-isolation --no-deps -e .
echo "$WANT" > "$STAMP"
echo "venv ready: . venv/bin/activate"
