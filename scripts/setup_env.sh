#!/usr/bin/env bash
# Create .venv (once) and install lightning_flatness with the given extra ("test" or "examples").
# A CPU build of torch is installed first so that no multi-GB CUDA build is pulled in; on a machine
# with a GPU, install the torch build you want before running this script.
set -euo pipefail
extra="${1:-test}"
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[${extra}]"
