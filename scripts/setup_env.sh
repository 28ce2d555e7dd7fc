#!/usr/bin/env bash
# Create .venv (once) and install lightning_flatness with the given extra ("test" or "examples").
# "examples": a CPU build of torch (2.13.0, from this machine's disk) so that no multi-GB CUDA build is pulled in.
# "test": also the model zoo (torchvision, timm, transformers), BackPACK (the benchmarks' baseline), the linters and the documentation tools. The only torchvision wheel that imports beside a
# CPU-usable torch here is 0.29.1 with torch 2.14.1 (a CUDA build that runs on the CPU; both from local disk);
# torch 2.13.0's CPU wheel has no matching torchvision. On a machine with a GPU, install the torch and torchvision
# builds you want before running this script: an importable pair is kept.
set -euo pipefail
extra="${1:-test}"
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
extras="$extra"
if [ "$extra" = "test" ]; then
    extras="test,zoo,lint,docs,baselines"
    python -c "import torch, torchvision" 2>/dev/null || python -m pip install -q torch==2.14.1 torchvision==0.29.1
else
    python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
fi
python -m pip install -q -e ".[${extras}]"
