"""Adversarial inputs for the eq. 17 solver, shared by ``tests/test_solver_stress.py`` (small sizes,
checked against scipy) and ``benchmarks/bench_solver.py --stress`` (timed at layer sizes).

Every case is a ``(weight, hessian_diagonal)`` pair in float64. Synthetic cases: log-normal
curvature with sigma 1-3 (heavy tails over many orders of magnitude), isolated zeros (unstructured
pruning of W, exact zeros of h), clipped zeros (40% and 90% negative curvature), dead rows and
columns (no curvature / pruned channels: unattained infima), depthwise ``(C, 1, k, k)`` shapes,
wide and skinny matrices. Estimated cases: Hutchinson and finite-difference diagonals of a small
random MLP (noisy, with negative entries), as the library's estimators produce them.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64

# (rows, cols) of the matrix cases, the conv case, the depthwise case and the MLP width per size
SIZES = {
    "small": {
        "matrix": (9, 13),
        "conv": (6, 4, 3, 3),
        "depthwise": (8, 1, 3, 3),
        "wide": (3, 40),
        "skinny": (40, 3),
        "mlp": (6, 12, 10, 4),
        "samples": 32,
    },
    "layer": {
        "matrix": (512, 512),
        "conv": (256, 256, 3, 3),
        "depthwise": (1024, 1, 5, 5),
        "wide": (64, 8192),
        "skinny": (8192, 64),
        "mlp": (64, 512, 512, 10),
        "samples": 256,
    },
}


def _lognormal(shape, sigma, g):
    return torch.exp(sigma * torch.randn(shape, generator=g, dtype=F64))


def _he(shape, g):
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=g, dtype=F64) * math.sqrt(2.0 / fan_in)


def synthetic_cases(size: str = "small", seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The synthetic adversarial cases at ``size`` (``"small"`` or ``"layer"``)."""
    s = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    mat = s["matrix"]
    cases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for sigma in (1.0, 2.0, 3.0):
        cases[f"lognormal_sigma{sigma:g}"] = (_he(mat, g), _lognormal(mat, sigma, g))
    cases["lognormal_sigma3_conv"] = (_he(s["conv"], g), _lognormal(s["conv"], 3.0, g))
    w, h = _he(mat, g), _lognormal(mat, 3.0, g)
    w[torch.rand(mat, generator=g) < 0.3] = 0.0  # unstructured pruning
    h[torch.rand(mat, generator=g) < 0.1] = 0.0
    cases["isolated_zeros"] = (w, h)
    for frac in (0.4, 0.9):
        w, h = _he(mat, g), _lognormal(mat, 3.0, g)
        h[torch.rand(mat, generator=g) < frac] *= -1.0
        cases[f"clipped_{int(frac * 100)}pct"] = (w, h)
    w, h = _he(mat, g), _lognormal(mat, 3.0, g)
    dead_rows = torch.rand(mat[0], generator=g) < 0.1
    dead_rows[0] = True
    pruned_cols = torch.rand(mat[1], generator=g) < 0.1
    pruned_cols[-1] = True
    h[dead_rows] = 0.0
    w[:, pruned_cols] = 0.0
    cases["dead_rows_and_columns"] = (w, h)
    cases["depthwise"] = (_he(s["depthwise"], g), _lognormal(s["depthwise"], 3.0, g))
    cases["wide"] = (_he(s["wide"], g), _lognormal(s["wide"], 3.0, g))
    cases["skinny"] = (_he(s["skinny"], g), _lognormal(s["skinny"], 3.0, g))
    return cases


def estimated_cases(size: str = "small", seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Hutchinson (4 probes) and finite-difference (4 probes) diagonals of a random ReLU MLP's
    hidden weight: noisy, with negative entries, as the library's estimators produce them."""
    from lightning_flatness.functional import hessian_diagonal, normalized_softmax_cross_entropy

    s = SIZES[size]
    torch.manual_seed(seed)
    widths = s["mlp"]
    layers: list[torch.nn.Module] = []
    for i in range(len(widths) - 1):
        layers += [torch.nn.Linear(widths[i], widths[i + 1]), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1]).double()
    x = torch.randn(s["samples"], widths[0], dtype=F64)
    y = torch.randint(0, widths[-1], (s["samples"],))
    name = "2.weight"  # the hidden (widths[1] -> widths[2]) weight
    weight = dict(model.named_parameters())[name].detach()
    cases = {}
    for method in ("hutchinson", "finite_difference"):
        gen = torch.Generator().manual_seed(seed + 1)
        est = hessian_diagonal(
            model, normalized_softmax_cross_entropy, x, y, method=method, num_probes=4, generator=gen
        )
        cases[f"{method}_estimate"] = (weight.clone(), est[name].detach().to(F64))
    return cases


def stress_cases(size: str = "small", seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """All stress cases: synthetic and estimated."""
    return {**synthetic_cases(size, seed), **estimated_cases(size, seed)}
