"""The sketched Gauss-Newton diagonal on its two paths, with the same draws: the per-layer contractions and,
forced, the per-sample backward passes, for tests that the two agree draw by draw."""

from __future__ import annotations

import warnings

import pytest
import torch

import lightning_flatness.functional.estimators.gauss_newton_sketch as gauss_newton_sketch


def sketch_on_both_paths(model, loss, x, y, params, chunk_size: int, monkeypatch) -> tuple[dict, dict]:
    """``(per_layer, per_sample)`` estimates from generators seeded alike; the per-layer one must not warn
    of a fallback, the per-sample one is forced (``_fast_path_blockers`` patched for the rest of the test)."""

    def estimate():
        generator = torch.Generator().manual_seed(5)
        return gauss_newton_sketch.gauss_newton_sketch_diagonal(
            model, loss, x, y, params, generator=generator, chunk_size=chunk_size
        )

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        per_layer = estimate()
    monkeypatch.setattr(gauss_newton_sketch, "_fast_path_blockers", lambda *args: ["forced"])
    with pytest.warns(UserWarning, match="per-layer contractions do not apply"):
        per_sample = estimate()
    return per_layer, per_sample
