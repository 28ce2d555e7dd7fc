"""Test-session settings: one intra-op thread (tiny models on a shared 2-core machine run many
times faster single-threaded, and timings of concurrent tests stop interfering).

Under CI (``CI`` set) the model-zoo extra must be installed: the zoo tests skip without it on a
developer's machine, but in CI a skip would hide a broken install (it did once: the extra was
declared under the wrong TOML table)."""

import importlib.util
import os

import torch

torch.set_num_threads(1)

_ZOO = ("torchvision", "timm", "transformers")
if os.environ.get("CI") and any(importlib.util.find_spec(m) is None for m in _ZOO):
    missing = [m for m in _ZOO if importlib.util.find_spec(m) is None]
    raise RuntimeError(
        f"CI runs without the `zoo` extra ({missing} missing): install it with "
        "`bash scripts/setup_env.sh test` (pip install -e '.[test,zoo]')."
    )
