"""``method="auto"``: which Hessian-diagonal estimator to use for a model and loss, and why.

The rule is a cost model with one accuracy constraint: the result must estimate the Hessian
diagonal (not only its Gauss-Newton part) whenever that can be afforded, and must say so when not.

1. **Is the Hessian diagonal the Gauss-Newton diagonal?** One recorded forward pass on two samples
   (no backward) lists every operation that makes the network nonlinear in an individual weight
   (:func:`~.exact.exact_hessian_diagonal`'s allowlist). If there is none, ``diag(H) = diag(GGN)``.
2. **How many output directions per sample?** ``D`` = logits per sample (``T * V`` for sequence
   outputs). The exact Gauss-Newton diagonal costs about ``D`` backward columns; the Monte-Carlo
   one (:mod:`.gauss_newton_mc`) a few, whatever ``D``.
3. **How much work per sample?** The exact method squares about ``D`` per-sample gradients of every
   selected weight: ``W D`` entries per sample for ``W`` weights, memory-bound. From
   ``W D >= sketch_min_work`` (:data:`SKETCH_MIN_WORK`) on, and while ``D <= max_exact_outputs``, the
   sketched Gauss-Newton diagonal (:mod:`.gauss_newton_sketch`: the exact factors of each sample's loss
   Hessian mixed into 1-2 columns) replaces the exact one: on a CIFAR ResNet-18 (``W D = 1.1e8``) it
   costs a fraction of ``"exact"`` at about its accuracy on the same samples. Below it the exact
   diagonal costs little and has no estimator noise, which matters most on small models measured on
   few samples (there the sketch's error was larger than the exact method's).
4. **Above** ``max_exact_outputs`` **outputs**: for cross-entropy and eq. 20 on ``(N, K)`` logits the
   sketch mixes the *exact* factors of the loss Hessian in their structured form
   (:func:`~lightning_flatness.functional.loss_hessian_factors.loss_hessian_structure`, ``O(N K)``), at
   a backward cost independent of ``K``; on tiny 1,000-class networks against the exact Gauss-Newton
   diagonal it was far closer than the Monte-Carlo estimator under both losses, and cheaper. Other
   losses and sequence outputs keep the Monte-Carlo estimator. Measured:
   ``benchmarks/results/bench_resnet18_cost.md``, ``bench_zoo_sketch_resnet.md`` and
   ``bench_resnet18_1000.md``.

Then, for a network piecewise linear in each weight: when ``D <= max_exact_outputs``,
``"gauss_newton_sketch"`` for big networks (``W D >= sketch_min_work``) and ``"exact"`` (zero variance)
for the others; else ``"gauss_newton_sketch"`` for a loss with a structured Hessian and the Monte-Carlo
Gauss-Newton diagonal ``"gauss_newton_mc"`` for any other. The sampled ones *are*
unbiased Hessian-diagonal estimates there.

5. **Any other network** (GELU, LayerNorm, attention, hardswish, tanh, squeeze-excitation): the
   sketched Hessian diagonal ``"hessian_sketch"`` (:mod:`.hessian_sketch`) where its node rules cover
   every nonlinear operation and no selected weight is used twice with its uses coupled (a tied LM head, a
   shared layer; an encoder-decoder's token table looked up twice is not) (checked on a second recorded
   forward pass of the two samples, with attention in explicit ops): the Gauss-Newton part as above (the
   loss's exact factors where ``"exact"`` would be chosen, else sketched) plus random columns of each
   operation's own curvature, unbiased for the Hessian diagonal, first derivatives only. Measured
   against brute force on the model zoo in ``benchmarks/results/bench_hessian_sketch.md``. Where it
   does not apply (a tied LM head, whose Hessian ``"hessian_sketch"`` measures on request but more
   noisily; a weight reparametrized nonlinearly other than by weight standardization or normalization;
   fused attention with dropout), the
   **Gauss-Newton** diagonal by the rules above (``"gauss_newton_sketch"``, ``"gauss_newton"`` or
   ``"gauss_newton_mc"``), reported as such: Hutchinson probes of the residual
   ``H - GGN`` in parameter space (``"ggn_hutchinson"``) biased normalized sharpness more than the
   residual itself changes it (``benchmarks/results/bench_zoo_residual.md``).

Cost of the choice: one forward pass on two samples (two recorded ones for other networks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from lightning_flatness.functional.estimators.registry import ESTIMATORS
from lightning_flatness.functional.loss_forms import standard_loss
from lightning_flatness.functional.loss_hessian_factors import has_loss_hessian_structure
from lightning_flatness.functional.measurement_context import in_measurement_context
from lightning_flatness.functional.model_io import (
    inputs_batch_size,
    logits_without_gradient,
    select_samples,
)
from lightning_flatness.functional.parameters import ParameterSelection, select_parameters

__all__ = ["MAX_EXACT_OUTPUTS", "SKETCH_MIN_WORK", "MethodChoice", "choose_method", "gauss_newton_blockers"]

#: Largest number of outputs per sample for which ``"auto"`` pays the exact Gauss-Newton diagonal
#: (about one backward column per output) rather than sampling it: the Monte-Carlo estimator costs 3
#: columns for cross-entropy and 16 for eq. 20 by default, and adds variance, so exact is kept while
#: it costs at most about twice that.
MAX_EXACT_OUTPUTS = 32

#: Per-sample work of the exact method, ``selected weights x outputs per sample`` (entries of squared
#: per-sample gradients), from which ``"auto"`` takes the sketched Gauss-Newton diagonal
#: (``"gauss_newton_sketch"``) instead of the exact one (up to ``MAX_EXACT_OUTPUTS`` outputs).
#: ``2**22`` (4.2e6) puts the CIFAR ResNet-18 (1.1e8 at 10 classes) and WRN-16-4 (2.7e7) on the
#: sketch, and the paper's MNIST-1D models (2.5e5 and less) and every tiny zoo model (below 1e6) on the
#: exact estimators, whose accuracy on them is measured in ``benchmarks/RESULTS.md``.
SKETCH_MIN_WORK = 2**22


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
    return _outputs(model, inputs)[0]


def _outputs(model: Any, inputs: Any) -> tuple[int, int]:
    """``(D, logits.ndim)`` of ``model`` on ``inputs`` (one forward pass, no gradient)."""
    logits = logits_without_gradient(model, inputs)
    return (int(logits[0].numel()) if logits.ndim > 0 else 1), logits.ndim


def gauss_newton_blockers(
    model: nn.Module, loss_fn: Callable, inputs: Any, target: Tensor, params: dict[str, nn.Parameter]
) -> list[str]:
    """Why the Hessian diagonal of this model differs from its Gauss-Newton diagonal (empty: it does
    not): operations off the exact method's allowlist, weights used twice, train-mode randomness.

    One recorded forward pass, no backward.
    """
    from lightning_flatness.functional.estimators.recorder import _autograd_inputs, _record_forward

    with torch.inference_mode(False), torch.enable_grad():
        x, _ = _autograd_inputs(inputs, target)
        forward = _record_forward(model, x, params, "choose_method")
    return list(forward.issues)


@in_measurement_context
def choose_method(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    target: Tensor,
    *,
    parameters: ParameterSelection = None,
    max_exact_outputs: int = MAX_EXACT_OUTPUTS,
    sketch_min_work: int = SKETCH_MIN_WORK,
) -> MethodChoice:
    """Pick the estimator for ``method="auto"`` (module docstring: the rule and its reasoning).

    Args:
        model, loss_fn, inputs, target: as for :func:`~.api.hessian_diagonal`; two samples of
            ``inputs`` are used.
        parameters: the selection to be measured.
        max_exact_outputs: above this many outputs per sample the Gauss-Newton part is sketched from the
            structured loss Hessian (cross-entropy, eq. 20) or sampled (other losses).
        sketch_min_work: from this many ``selected weights x outputs per sample`` on, the sketched
            Gauss-Newton diagonal is used (:data:`SKETCH_MIN_WORK`).

    Returns:
        :class:`MethodChoice` with the method, what it estimates, and the reason in one sentence.
    """
    loss_fn = standard_loss(loss_fn)
    params = select_parameters(model, parameters)
    n = inputs_batch_size(inputs)
    few = select_samples(inputs, slice(0, min(n, 2)), n)
    d, ndim = _outputs(model, few)
    work = d * sum(p.numel() for p in params.values())
    many = d > max_exact_outputs
    structured = many and has_loss_hessian_structure(loss_fn, ndim)
    sampled = many and not structured
    sketched = (work >= sketch_min_work and not many) or structured
    try:
        blockers = gauss_newton_blockers(model, loss_fn, few, target[: min(n, 2)], params)
    except (
        ValueError,
        TypeError,
        RuntimeError,
    ) as err:  # a model the recorder cannot run: no exactness claim
        blockers = [f"the exactness check could not run ({type(err).__name__}: {err})"]
    if structured:
        cost = (
            f"{d} outputs per sample: the Gauss-Newton part is sketched from the exact structured factors "
            f"of the loss Hessian (a few backward columns instead of about {d})"
        )
    elif sketched:
        cost = (
            f"{d} outputs per sample x {work // d} weights = {work:.3g} >= {sketch_min_work:.3g} squared "
            "per-sample gradient entries per sample for the exact Gauss-Newton part: it is sketched "
            "(1-2 mixed backward columns per sample)"
        )
    else:
        cost = f"{d} outputs per sample: " + (
            f"the Gauss-Newton part is sampled (a few backward columns instead of about {d})"
            if sampled
            else f"about {d} backward columns for the Gauss-Newton part"
        )
    if not blockers:
        method = "gauss_newton_sketch" if sketched else "gauss_newton_mc" if sampled else "exact"
        return MethodChoice(
            method,
            "hessian",
            "the network is piecewise linear in each weight, so the "
            f"Hessian diagonal is its Gauss-Newton diagonal; {cost}",
        )
    why = "; ".join(blockers[:2])
    from lightning_flatness.functional.estimators.hessian_sketch import hessian_sketch_applies

    try:
        sketch_blockers, ops = hessian_sketch_applies(model, few, target[: min(n, 2)], params)
    except (ValueError, TypeError, RuntimeError) as err:
        sketch_blockers, ops = [f"its check could not run ({type(err).__name__}: {err})"], []
    if not sketch_blockers:
        return MethodChoice(
            "hessian_sketch",
            "hessian",
            f"the network is not linear in each weight ({', '.join(ops) or why}), so its Hessian diagonal "
            "differs from the Gauss-Newton diagonal; the sketched Hessian diagonal adds the curvature "
            "of those operations to the sketched Gauss-Newton part, unbiased for the Hessian diagonal, "
            "at a few backward columns per sample whatever the number of outputs",
        )
    method = "gauss_newton_sketch" if sketched else "gauss_newton_mc" if sampled else "gauss_newton"
    return MethodChoice(
        method,
        "gauss_newton",
        f"the network is not linear in each weight ({why}), so its "
        "Hessian diagonal differs from the Gauss-Newton diagonal, and the sketched Hessian diagonal "
        f"does not apply ({sketch_blockers[0]}); Hutchinson probes of the difference bias the "
        "normalized measures more than the difference itself on the model zoo, so the Gauss-Newton "
        f"diagonal is measured (method='ggn_hutchinson' adds the probed residual); {cost}",
    )
