"""``method="auto"``: which Hessian-diagonal estimator to use for a model and loss, and why.

The rule is a cost model with one accuracy constraint: the result must estimate the Hessian
diagonal (not only its Gauss-Newton part) whenever that can be afforded, and must say so when not.

1. **Is the Hessian diagonal the Gauss-Newton diagonal?** One recorded forward pass on two samples
   (no backward) lists every operation that makes the network nonlinear in an individual weight
   (:func:`~.exact.exact_hessian_diagonal`'s allowlist). If there is none, ``diag(H) = diag(GGN)``.
2. **How many output directions per sample?** ``D`` = logits per sample (``T * V`` for sequence
   outputs). The exact Gauss-Newton diagonal costs about ``D`` backward columns; the Monte-Carlo
   one (:mod:`.gauss_newton_mc`) a few, whatever ``D``.

Then, for a network piecewise linear in each weight: ``"exact"`` when ``D <= max_exact_outputs``
(zero variance), else the Monte-Carlo Gauss-Newton diagonal ``"gauss_newton_mc"``, which *is* an
unbiased Hessian-diagonal estimate there. For any other network the **Gauss-Newton** diagonal, by
the same ``D`` rule (``"gauss_newton"`` or ``"gauss_newton_mc"``), reported as such: the Hessian
diagonal would need Hutchinson probes of the residual ``H - GGN`` (``"ggn_hutchinson"``), and on the
model zoo their noise biased normalized sharpness more than the residual itself changes it
(``benchmarks/results/bench_zoo_residual.md``). Gauss-Newton estimators need first
derivatives only, so they also run through fused attention and ops without a double backward.
Cost of the choice: one forward pass on two samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from lightning_flatness.functional.estimators.registry import ESTIMATORS
from lightning_flatness.functional.model_io import inputs_batch_size, select_samples
from lightning_flatness.functional.parameters import ParameterSelection, select_parameters

__all__ = ["MAX_EXACT_OUTPUTS", "MethodChoice", "choose_method", "gauss_newton_blockers"]

#: Largest number of outputs per sample for which ``"auto"`` pays the exact Gauss-Newton diagonal
#: (about one backward column per output) rather than sampling it: the Monte-Carlo estimator costs 3
#: columns for cross-entropy and 16 for eq. 20 by default, and adds variance, so exact is kept while
#: it costs at most about twice that.
MAX_EXACT_OUTPUTS = 32


@dataclass(frozen=True)
class MethodChoice:
    """An estimator choice: ``method`` (a registered name), ``quantity`` (what its expectation is:
    ``"hessian"`` or ``"gauss_newton"``) and ``reason`` (one sentence, for logs)."""

    method: str
    quantity: str
    reason: str

    @classmethod
    def named(cls, method: str) -> MethodChoice:
        """The choice of a method named by the user."""
        if method not in ESTIMATORS:
            raise ValueError(f"unknown method {method!r}; choose 'auto' or one of {tuple(ESTIMATORS)}.")
        return cls(method, ESTIMATORS[method].quantity, f"method={method!r} was requested")

    @property
    def label(self) -> str:
        """``"<method> (<quantity>)"``, e.g. ``"exact (hessian)"``."""
        return f"{self.method} ({self.quantity.replace('_', '-')})"


def outputs_per_sample(model: Any, loss_fn: Callable, inputs: Any) -> int:
    """``D``: logits per sample of ``model`` on ``inputs`` (one forward pass, no gradient)."""
    from lightning_flatness.functional.model_io import call_model

    with torch.no_grad():
        logits = call_model(model, inputs)
    return int(logits[0].numel()) if logits.ndim > 0 else 1


def gauss_newton_blockers(
    model: nn.Module, loss_fn: Callable, inputs: Any, target: Tensor, params: dict[str, nn.Parameter]
) -> list[str]:
    """Why the Hessian diagonal of this model differs from its Gauss-Newton diagonal (empty: it does
    not): operations off the exact method's allowlist, weights used twice, train-mode randomness.

    One recorded forward pass, no backward.
    """
    from lightning_flatness.functional.estimators.exact import _autograd_inputs, _record_forward

    with torch.inference_mode(False), torch.enable_grad():
        x, _ = _autograd_inputs(inputs, target)
        forward = _record_forward(model, x, params, "choose_method")
    return list(forward.issues)


def choose_method(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    target: Tensor,
    *,
    parameters: ParameterSelection = None,
    max_exact_outputs: int = MAX_EXACT_OUTPUTS,
) -> MethodChoice:
    """Pick the estimator for ``method="auto"`` (module docstring: the rule and its reasoning).

    Args:
        model, loss_fn, inputs, target: as for :func:`~.api.hessian_diagonal`; two samples of
            ``inputs`` are used.
        parameters: the selection to be measured.
        max_exact_outputs: above this many outputs per sample the Gauss-Newton part is sampled.

    Returns:
        :class:`MethodChoice` with the method, what it estimates, and the reason in one sentence.
    """
    params = select_parameters(model, parameters)
    n = inputs_batch_size(inputs)
    few = select_samples(inputs, slice(0, min(n, 2)), n)
    d = outputs_per_sample(model, loss_fn, few)
    sampled = d > max_exact_outputs
    try:
        blockers = gauss_newton_blockers(model, loss_fn, few, target[: min(n, 2)], params)
    except (
        ValueError,
        TypeError,
        RuntimeError,
    ) as err:  # a model the recorder cannot run: no exactness claim
        blockers = [f"the exactness check could not run ({type(err).__name__}: {err})"]
    cost = f"{d} outputs per sample: " + (
        f"the Gauss-Newton part is sampled (a few backward columns instead of about {d})"
        if sampled
        else f"about {d} backward columns for the Gauss-Newton part"
    )
    if not blockers:
        method = "gauss_newton_mc" if sampled else "exact"
        return MethodChoice(
            method,
            "hessian",
            "the network is piecewise linear in each weight, so the "
            f"Hessian diagonal is its Gauss-Newton diagonal; {cost}",
        )
    why = "; ".join(blockers[:2])
    method = "gauss_newton_mc" if sampled else "gauss_newton"
    return MethodChoice(
        method,
        "gauss_newton",
        f"the network is not linear in each weight ({why}), so its "
        "Hessian diagonal differs from the Gauss-Newton diagonal; Hutchinson probes of the "
        "difference bias the normalized measures more than the difference itself on the model "
        f"zoo, so the Gauss-Newton diagonal is measured (method='ggn_hutchinson' adds the "
        f"probed residual); {cost}",
    )
