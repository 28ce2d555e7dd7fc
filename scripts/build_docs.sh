#!/usr/bin/env bash
# Build the documentation site (Sphinx, docs/conf.py) with warnings as errors; HTML in docs/_build/html.
# Needs the `docs` extra (sphinx, myst-parser, furo).
#
#   bash scripts/build_docs.sh
#   PYTHON=/path/to/python bash scripts/build_docs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
# The worktree's package, not an installed copy, is what autodoc documents.
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -m sphinx -E -W --keep-going -b html -q docs docs/_build/html
echo "docs built: docs/_build/html/index.html"
