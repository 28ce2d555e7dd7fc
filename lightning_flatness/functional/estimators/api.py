"""Front door of the Hessian-diagonal estimators: method dispatch and sample groups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from lightning_flatness.functional.estimators.registry import ESTIMATORS, EstimatorSpec
from lightning_flatness.functional.loss_forms import loss_for_outputs, needs_outputs, standard_loss
from lightning_flatness.functional.measurement_context import in_measurement_context
from lightning_flatness.functional.model_io import (
    TokenLoss,
    inputs_batch_size,
    outputs_of_first_samples,
    split_samples,
)
from lightning_flatness.functional.parameters import ParameterSelection, select_parameters

__all__ = [
    "METHODS",
    "HessianDiagonalEstimate",
    "estimator_spec",
    "hessian_diagonal",
    "hessian_diagonal_groups",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
#: The built-in methods (see :data:`~.registry.ESTIMATORS` for every registered one).
METHODS = tuple(ESTIMATORS)


@dataclass
class HessianDiagonalEstimate:
    """``G`` independent estimates of a Hessian diagonal, one per group of samples.

    Attributes:
        groups: ``{name: (G, *param.shape)}``; entry ``g`` is an unbiased estimate of the diagonal
            of the Hessian of the mean loss over group ``g``'s samples (exact for ``"exact"``).
        group_sizes: ``(G,)`` int64, the weight of each group in the mean: its number of samples, or
            of valid tokens when the loss is a :class:`~lightning_flatness.functional.model_io.TokenLoss`.
        method: the method that produced it.
        num_probes: probes used in total over all groups (0 for ``"exact"``).
        one_pass: whether the groups came from one pass over the batch (the estimator's
            :attr:`~.registry.EstimatorSpec.groups_target`) rather than one estimate per group.
        one_pass_samples: with ``one_pass``, the most samples of this model that one pass takes
            (:attr:`~.registry.OnePassGroups.max_samples`); else None.
    """

    groups: dict[str, Tensor]
    group_sizes: Tensor
    method: str
    num_probes: int
    one_pass: bool = False
    one_pass_samples: Optional[int] = None

    def mean(self) -> dict[str, Tensor]:
        """Sample-weighted mean over groups: the estimate for the mean loss over all samples."""
        w = self.group_sizes.to(torch.float64)
        w = w / w.sum()
        return {n: torch.tensordot(w.to(g.dtype), g, dims=1) for n, g in self.groups.items()}


def _check_inputs(inputs: Any, target: Tensor, num_groups: int) -> int:
    if not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"`num_groups` must be a positive int, got {num_groups!r}.")
    if not isinstance(target, Tensor):
        raise TypeError(
            f"`target` must be a tensor, got {type(target).__name__}; split your batch into "
            "(inputs, target) first."
        )
    n = inputs_batch_size(inputs)
    if target.ndim == 0 or target.shape[0] != n:
        raise ValueError(
            f"`inputs` has {n} samples but `target` has shape {tuple(target.shape)}; they must "
            "match along dim 0."
        )
    if n < num_groups:
        raise ValueError(
            f"cannot split {n} samples into num_groups={num_groups} groups; "
            f"pass more samples or fewer groups."
        )
    return n


def _group_weight(loss_fn: LossFn, target: Tensor) -> int:
    """The weight of a group in the pooled mean: its samples, or its valid tokens for a :class:`TokenLoss`."""
    if isinstance(loss_fn, TokenLoss):
        return int(loss_fn.num_tokens(target).sum())
    return int(target.shape[0])


def estimator_spec(method: str) -> EstimatorSpec:
    """The registered :class:`EstimatorSpec` of ``method`` (a clear error for unknown names)."""
    try:
        return ESTIMATORS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; choose one of {tuple(ESTIMATORS)}.") from None


def _settled_loss(model: nn.Module, loss_fn: LossFn, inputs: Any) -> LossFn:
    """``loss_fn`` in the form the estimators know (:mod:`~lightning_flatness.functional.loss_forms`);
    for ``F.nll_loss``, checked on the outputs of two samples (one extra forward pass without gradient)."""
    if not needs_outputs(loss_fn):
        return standard_loss(loss_fn)
    return loss_for_outputs(loss_fn, outputs_of_first_samples(model, inputs))


@in_measurement_context
def hessian_diagonal_groups(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    target: Tensor,
    *,
    method: str = "exact",
    num_probes: int = 64,
    num_groups: int = 1,
    generator: Optional[torch.Generator] = None,
    parameters: ParameterSelection = None,
    strict: bool = True,
    relative_step: float = 1e-3,
    num_mc_samples: Optional[int] = None,
    num_sketches: Optional[int] = None,
    one_pass: bool = True,
) -> HessianDiagonalEstimate:
    """Hessian diagonal per group of samples, for error bars that cover probes and data.

    The batch is cut into ``num_groups`` contiguous groups (``torch.tensor_split`` along dim 0 of
    every input tensor); each group gets its own estimate from ``num_probes // num_groups`` probes of
    its own (probe-based methods), ``num_mc_samples`` Monte-Carlo draws per sample (Monte-Carlo
    Gauss-Newton) or exactly. The groups are independent, so their spread measures the error of
    the mean from both the probes and the finite sample (see :class:`NormalizedSharpness`).

    The method is looked up in :data:`~.registry.ESTIMATORS`.

    Args and cost: as :func:`hessian_diagonal`; ``num_probes`` must be divisible by ``num_groups``
    for the probe-based methods. Their cost is that of ``num_probes / num_groups`` probes over the
    whole batch, since each probe only visits its group's samples. With ``one_pass`` (default) an
    estimator that has a one-pass function for several groups (``EstimatorSpec.groups_target``: the exact
    method, :mod:`.exact_groups`) estimates them in one pass over the batch where it applies, at about the
    cost of one estimate of the batch; ``one_pass=False`` estimates group by group.
    """
    spec = estimator_spec(method)
    _check_inputs(inputs, target, num_groups)
    loss_fn = _settled_loss(model, loss_fn, inputs)
    params = select_parameters(model, parameters)
    if spec.splits_probes and (not isinstance(num_probes, int) or num_probes < 1 or num_probes % num_groups):
        raise ValueError(
            f"`num_probes` must be a positive multiple of num_groups={num_groups} for "
            f"method {method!r}, got {num_probes!r}."
        )
    if (
        "num_mc_samples" in spec.options
        and num_mc_samples is not None
        and (not isinstance(num_mc_samples, int) or num_mc_samples < 1)
    ):
        raise ValueError(
            f"`num_mc_samples` must be a positive int for method {method!r}, got {num_mc_samples!r}."
        )
    if (
        "num_sketches" in spec.options
        and num_sketches is not None
        and (not isinstance(num_sketches, int) or isinstance(num_sketches, bool) or num_sketches < 1)
    ):
        raise ValueError(
            f"`num_sketches` must be a positive int for method {method!r}, got {num_sketches!r}."
        )
    probes_per_group = num_probes // num_groups if spec.splits_probes else 0
    available = {
        "num_probes": probes_per_group,
        "generator": generator,
        "strict": strict,
        "relative_step": relative_step,
        "num_mc_samples": num_mc_samples,
        "num_sketches": num_sketches,
    }
    options = {k: available[k] for k in spec.options}
    grouped = spec.load_groups() if num_groups > 1 and one_pass else None
    if grouped is not None:  # the groups from one pass over the batch, where the estimator has one
        passed = grouped(model, loss_fn, inputs, target, params, num_groups)
        if passed is not None:
            parts = torch.tensor_split(target, num_groups)
            sizes = torch.tensor([_group_weight(loss_fn, y) for y in parts], dtype=torch.int64)
            return HessianDiagonalEstimate(
                passed.groups, sizes, method, 0, one_pass=True, one_pass_samples=passed.max_samples
            )
    function = spec.load()
    if num_groups == 1:  # the whole batch, no split
        chunks = [(inputs, target)]
    else:
        chunks = list(zip(split_samples(inputs, num_groups), torch.tensor_split(target, num_groups)))
    estimates = [function(model, loss_fn, x, y, params, **options) for x, y in chunks]
    if len(estimates) == 1:  # a view, no copy
        groups = {n: estimates[0][n].unsqueeze(0) for n in params}
    else:
        groups = {n: torch.stack([e[n] for e in estimates]) for n in params}
    sizes = torch.tensor([_group_weight(loss_fn, y) for _, y in chunks], dtype=torch.int64)
    return HessianDiagonalEstimate(groups, sizes, method, probes_per_group * num_groups)


def hessian_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    target: Tensor,
    *,
    method: str = "exact",
    num_probes: int = 64,
    generator: Optional[torch.Generator] = None,
    parameters: ParameterSelection = None,
    strict: bool = True,
    relative_step: float = 1e-3,
    num_mc_samples: Optional[int] = None,
    num_sketches: Optional[int] = None,
) -> dict[str, Tensor]:
    """Diagonal of the Hessian of ``loss_fn(model(inputs), target)`` (a batch mean) in the weights.

    Args:
        model: called on ``inputs`` by :func:`~lightning_flatness.functional.model_io.call_model`
            (``model(x)``, ``model(*inputs)`` or ``model(**inputs)``; the logits are the output, its
            ``"logits"`` entry or its first entry); used as it is (its train/eval mode is respected) and
            never modified: parameters, buffers (BatchNorm running statistics) and ``.grad`` are
            left untouched.
        loss_fn: ``(logits, target) -> scalar``, the *mean* of per-sample losses over the batch
            (e.g. ``F.cross_entropy`` or :func:`normalized_softmax_cross_entropy`), or a
            :class:`~lightning_flatness.functional.model_io.TokenLoss` for ``(N, T, V)`` outputs.
        inputs: a ``(N, ...)`` tensor, or a tuple or dict of tensors with samples along dim 0.
        target: ``(N, ...)`` tensor.
        method: ``"exact"`` (zero variance; cost about ``K`` backward passes for ``K`` outputs;
            networks linear in each individual weight only, see :mod:`.exact`; raises
            :class:`ExactMethodNotApplicable` elsewhere), ``"ggn_hutchinson"`` (any model with a
            mean-of-per-sample-losses loss: the exact Gauss-Newton diagonal plus Hutchinson probes of
            the residual ``H - GGN``; unbiased, per-entry variance ``sum_{j != i} R_ij^2 /
            num_probes`` with ``R = H - GGN``, small near a minimum, and zero where ``"exact"``
            applies; cost that of ``"exact"`` plus ``num_probes`` Hessian-vector products, see
            :mod:`.ggn_hutchinson`), ``"hutchinson"`` (unbiased, variance ``sum_{j != i} H_ij^2 /
            num_probes``; cost ``num_probes`` Hessian-vector products, each about 2 gradient
            evaluations) or ``"finite_difference"`` (Algorithm 1, eq. 61; cost ``2 * num_probes``
            gradient evaluations; biased by O(r^2) and by kinks of ReLU networks). The measures of
            eq. 13 and 17 are nonlinear in the diagonal, so probe noise biases them upwards: prefer
            ``"exact"``, then ``"ggn_hutchinson"``.
        num_probes: probes for the stochastic methods (``"ggn_hutchinson"``: probes of the residual).
        generator: source of the probes (stochastic methods); the global RNG is never used when
            one is given.
        parameters: which tensors to differentiate (see :func:`select_parameters`); default every
            weight with ``ndim >= 2`` that requires grad (except additive offsets) and the biases and
            normalization parameters beside them; ``"all"`` for every parameter.
        strict: ``"exact"`` only: raise :class:`ExactMethodNotApplicable` (``True``) or warn
            (``False``, returning the Gauss-Newton diagonal) when the model contains an operation for
            which the result would not be the exact diagonal.
        relative_step: ``"finite_difference"`` only: the step ``r`` of each weight tensor relative
            to its root-mean-square entry (Appendix C).
        num_mc_samples: Monte-Carlo Gauss-Newton only: draws per sample (``None``: the loss's
            default, see :mod:`.gauss_newton_mc`).
        num_sketches: ``"gauss_newton_sketch"`` and ``"hessian_sketch"`` only: independent sketches
            (``None``: the estimator's default; the cost grows linearly, the noise falls like its
            square root).

    Returns:
        ``{name: diag}`` keyed as in ``model.named_parameters()``, each with the parameter's shape
        and dtype. Entries may be negative (no clipping here).

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> diag = hessian_diagonal(model, F.cross_entropy, x, y, method="exact")
        >>> sorted(diag), diag["0.weight"].shape
        (['0.bias', '0.weight', '2.bias', '2.weight'], torch.Size([8, 4]))
    """
    estimate = hessian_diagonal_groups(
        model,
        loss_fn,
        inputs,
        target,
        method=method,
        num_probes=num_probes,
        num_groups=1,
        generator=generator,
        parameters=parameters,
        strict=strict,
        relative_step=relative_step,
        num_mc_samples=num_mc_samples,
        num_sketches=num_sketches,
    )
    return {n: g[0] for n, g in estimate.groups.items()}  # one group: its estimate (= .mean(), no copy)
