"""The README's first command runs end to end (tiny settings) and prints consistent numbers."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import quickstart  # noqa: E402


def test_quickstart_totals_are_sums_of_finite_per_layer_values(capsys):
    result = quickstart.main(["--epochs", "1", "--num-samples", "64", "--num-groups", "4"])
    out = capsys.readouterr().out
    assert "exact (hessian)" in out and "total" in out
    for measure, tensors in (("normalized", 4), ("matrix_normalized", 4), ("hessian_trace", 8)):
        layers = [v for k, v in result.items() if k.startswith(measure + "/")]
        assert len(layers) == tensors  # 4 weights, and their biases in the trace (eq. 5)
        torch.testing.assert_close(result[measure], torch.stack(layers).sum())
    weights_only = [v for k, v in result.items() if k.startswith("hessian_trace/") and k.endswith(".weight")]
    torch.testing.assert_close(result["hessian_trace_weights"], torch.stack(weights_only).sum())
    assert torch.isfinite(result["normalized_stderr"]) and result["normalized_stderr"] > 0
    assert int(result["num_samples"]) == 64
