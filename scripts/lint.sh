#!/usr/bin/env bash
# Lint as CI does: ruff (lint rules and format check) over the repository, mypy over the functional core.
# Configuration: [tool.ruff] and [tool.mypy] in pyproject.toml. Needs the `lint` extra (ruff, mypy).
#
#   bash scripts/lint.sh                 # all three, exits non-zero if any reports a finding
#   PYTHON=/path/to/python bash scripts/lint.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
status=0
echo "== ruff check"
"$PYTHON" -m ruff check . || status=1
echo "== ruff format --check"
"$PYTHON" -m ruff format --check . || status=1
echo "== mypy lightning_flatness/functional"
"$PYTHON" -m mypy lightning_flatness/functional || status=1
exit $status
