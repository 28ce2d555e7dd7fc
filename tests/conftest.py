"""Test-session settings: one intra-op thread (tiny models on a shared 2-core machine run many
times faster single-threaded, and timings of concurrent tests stop interfering).

Under CI (``CI`` set) the model-zoo extra must be installed: the zoo tests skip without it on a
developer's machine, but in CI a skip would hide a broken install (it did once: the extra was
declared under the wrong TOML table)."""

import importlib.util
import os

import pytest
import torch

torch.set_num_threads(1)

_ZOO = ("torchvision", "timm", "transformers")
if os.environ.get("CI") and any(importlib.util.find_spec(m) is None for m in _ZOO):
    missing = [m for m in _ZOO if importlib.util.find_spec(m) is None]
    raise RuntimeError(
        f"CI runs without the `zoo` extra ({missing} missing): install it with "
        "`bash scripts/setup_env.sh test` (pip install -e '.[test,zoo]')."
    )


@pytest.fixture
def hessian_sketch_calls(monkeypatch):
    """The ``num_sketches`` argument of every call of ``hessian_sketch_diagonal`` (the real estimator
    still runs), in call order: for the tests that its option reaches it from every entry point."""
    import lightning_flatness.functional.estimators.hessian_sketch as module

    seen = []
    real = module.hessian_sketch_diagonal

    def spy(*args, **kwargs):
        seen.append(kwargs.get("num_sketches"))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "hessian_sketch_diagonal", spy)
    return seen
