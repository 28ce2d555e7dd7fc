#!/usr/bin/env bash
# Build the sdist and the wheel, check their metadata, install the wheel into a fresh virtual
# environment and import it there: what a user gets from `pip install lightning_flatness`.
#
#   bash scripts/check_package.sh            # uses .venv/bin/python (needs the `test` extra: build, twine)
#   PYTHON=/path/to/python bash scripts/check_package.sh
#
# Offline: the build runs without isolation (the venv's setuptools), and the fresh venv installs the
# wheel with --no-deps and sees the dependencies (torch, Lightning, ...) through a .pth line pointing at
# the main venv's site-packages, so nothing is downloaded. The main venv's own .pth files (e.g. an
# editable install of this repository) are not processed, so the import must come from the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "== build (sdist + wheel) into $work/dist"
"$PYTHON" -m build --no-isolation --outdir "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
ls -l "$work/dist"

echo "== twine check --strict"
"$PYTHON" -m twine check --strict "$work"/dist/*

wheel="$(ls "$work"/dist/*.whl)"
echo "== wheel contents"
"$PYTHON" - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
required = ["lightning_flatness/__init__.py", "lightning_flatness/py.typed", "lightning_flatness/callback.py",
            "lightning_flatness/functional/__init__.py", "lightning_flatness/logger_media/__init__.py"]
missing = [n for n in required if n not in names]
stray = [n for n in names if n.split("/")[0] in ("tests", "benchmarks", "examples", "docs", "scripts")]
assert not missing, f"the wheel lacks {missing}"
assert not stray, f"the wheel ships files outside the package: {stray[:5]}"
print(f"{len(names)} files, py.typed included, nothing outside lightning_flatness/")
PY

echo "== install into a fresh venv (no downloads) and import"
base="$("$PYTHON" -c 'import sys; print(sys.base_prefix)')/bin/python3"
"$base" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --no-deps --no-index "$wheel"
site_main="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
site_fresh="$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$site_main" > "$site_fresh/_main_venv_dependencies.pth"
cd "$work"  # not the repository: `import lightning_flatness` must not find the source tree
"$work/venv/bin/python" - "$site_fresh" <<'PY'
import importlib.metadata as md
import pathlib
import sys

import lightning_flatness
from lightning_flatness import NormalizedSharpness, SharpnessMonitor, functional  # noqa: F401
from lightning_flatness.lightning_namespace import SharpnessMonitor as LightningSharpnessMonitor  # noqa: F401

where = pathlib.Path(lightning_flatness.__file__).resolve()
assert where.is_relative_to(pathlib.Path(sys.argv[1]).resolve()), f"imported from {where}, not from the wheel"
assert md.version("lightning_flatness") == lightning_flatness.__version__, "version not single-sourced"
assert (where.parent / "py.typed").is_file()
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
diag = functional.hessian_diagonal(model, functional.normalized_softmax_cross_entropy, x, y, method="exact")
assert set(diag) == {"0.weight", "0.bias", "2.weight", "2.bias"} and all(bool(torch.isfinite(d).all()) for d in diag.values())
print(f"lightning_flatness {lightning_flatness.__version__} imported from {where.parent}; exact diagonal OK")
PY
echo "== package OK"
