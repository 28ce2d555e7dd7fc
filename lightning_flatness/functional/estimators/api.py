"""Front door of the Hessian-diagonal estimators: method dispatch and sample groups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from lightning_flatness.functional.parameters import ParameterSelection, select_parameters

__all__ = ["METHODS", "HessianDiagonalEstimate", "hessian_diagonal", "hessian_diagonal_groups"]

LossFn = Callable[[Tensor, Tensor], Tensor]
METHODS = ("exact", "hutchinson", "ggn_hutchinson", "finite_difference")


@dataclass
class HessianDiagonalEstimate:
    """``G`` independent estimates of a Hessian diagonal, one per group of samples.

    Attributes:
        groups: ``{name: (G, *param.shape)}``; entry ``g`` is an unbiased estimate of the diagonal
            of the Hessian of the mean loss over group ``g``'s samples (exact for ``"exact"``).
        group_sizes: ``(G,)`` int64, the number of samples in each group.
        method: the method that produced it.
        num_probes: probes used in total over all groups (0 for ``"exact"``).
    """

    groups: dict[str, Tensor]
    group_sizes: Tensor
    method: str
    num_probes: int

    def mean(self) -> dict[str, Tensor]:
        """Sample-weighted mean over groups: the estimate for the mean loss over all samples."""
        w = self.group_sizes.to(torch.float64)
        w = w / w.sum()
        return {n: torch.tensordot(w.to(g.dtype), g, dims=1) for n, g in self.groups.items()}


def _check_inputs(inputs: Tensor, target: Tensor, num_groups: int) -> None:
    if not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"`num_groups` must be a positive int, got {num_groups!r}.")
    if not isinstance(inputs, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"`inputs` and `target` must be tensors, got {type(inputs).__name__} and "
                        f"{type(target).__name__}; split your batch into (inputs, target) first.")
    if inputs.shape[0] != target.shape[0]:
        raise ValueError(f"`inputs` has {inputs.shape[0]} samples but `target` has {target.shape[0]}; "
                         f"they must match along dim 0.")
    if inputs.shape[0] < num_groups:
        raise ValueError(f"cannot split {inputs.shape[0]} samples into num_groups={num_groups} groups; "
                         f"pass more samples or fewer groups.")


def hessian_diagonal_groups(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    target: Tensor,
    *,
    method: str = "exact",
    num_probes: int = 64,
    num_groups: int = 1,
    generator: Optional[torch.Generator] = None,
    parameters: ParameterSelection = None,
    strict: bool = True,
    relative_step: float = 1e-3,
) -> HessianDiagonalEstimate:
    """Hessian diagonal per group of samples, for error bars that cover probes and data.

    The batch is cut into ``num_groups`` contiguous groups (``torch.tensor_split`` along dim 0);
    each group gets its own estimate from ``num_probes // num_groups`` probes of its own
    (stochastic methods) or exactly. The groups are independent, so their spread measures the
    error of the mean from both the probes and the finite sample (see :class:`NormalizedSharpness`).

    Args and cost: as :func:`hessian_diagonal`; ``num_probes`` must be divisible by ``num_groups``
    for the stochastic methods. The cost of a stochastic method is that of ``num_probes /
    num_groups`` probes over the whole batch, since each probe only visits its group's samples.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}.")
    _check_inputs(inputs, target, num_groups)
    params = select_parameters(model, parameters)
    stochastic = method != "exact"
    if stochastic:
        if not isinstance(num_probes, int) or num_probes < 1 or num_probes % num_groups:
            raise ValueError(f"`num_probes` must be a positive multiple of num_groups={num_groups} for "
                             f"method {method!r}, got {num_probes!r}.")
    probes_per_group = num_probes // num_groups if stochastic else 0
    chunks = list(zip(torch.tensor_split(inputs, num_groups), torch.tensor_split(target, num_groups)))
    estimates: list[dict[str, Tensor]] = []
    for x, y in chunks:
        if method == "exact":
            from lightning_flatness.functional.estimators.exact import exact_hessian_diagonal

            est = exact_hessian_diagonal(model, loss_fn, x, y, params, strict=strict)
        elif method == "hutchinson":
            from lightning_flatness.functional.estimators.hutchinson import hutchinson_hessian_diagonal

            est = hutchinson_hessian_diagonal(model, loss_fn, x, y, params, num_probes=probes_per_group,
                                              generator=generator)
        elif method == "ggn_hutchinson":
            from lightning_flatness.functional.estimators.ggn_hutchinson import ggn_hutchinson_hessian_diagonal

            est = ggn_hutchinson_hessian_diagonal(model, loss_fn, x, y, params, num_probes=probes_per_group,
                                                  generator=generator)
        else:
            from lightning_flatness.functional.estimators.finite_difference import (
                finite_difference_hessian_diagonal,
            )

            est = finite_difference_hessian_diagonal(model, loss_fn, x, y, params, num_probes=probes_per_group,
                                                     generator=generator, relative_step=relative_step)
        estimates.append(est)
    groups = {n: torch.stack([e[n] for e in estimates]) for n in params}
    sizes = torch.tensor([x.shape[0] for x, _ in chunks], dtype=torch.int64)
    return HessianDiagonalEstimate(groups, sizes, method, probes_per_group * num_groups)


def hessian_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    target: Tensor,
    *,
    method: str = "exact",
    num_probes: int = 64,
    generator: Optional[torch.Generator] = None,
    parameters: ParameterSelection = None,
    strict: bool = True,
    relative_step: float = 1e-3,
) -> dict[str, Tensor]:
    """Diagonal of the Hessian of ``loss_fn(model(inputs), target)`` (a batch mean) in the weights.

    Args:
        model: called as ``model(inputs)``; used as it is (its train/eval mode is respected) and
            never modified: parameters, buffers (BatchNorm running statistics) and ``.grad`` are
            left untouched.
        loss_fn: ``(logits, target) -> scalar``, the *mean* of per-sample losses over the batch
            (e.g. ``F.cross_entropy`` or :func:`normalized_softmax_cross_entropy`).
        inputs: ``(N, ...)`` tensor.
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
            weight with ``ndim >= 2`` that requires grad.
        strict: ``"exact"`` only: raise :class:`ExactMethodNotApplicable` (``True``) or warn
            (``False``, returning the Gauss-Newton diagonal) when the model contains an operation for
            which the result would not be the exact diagonal.
        relative_step: ``"finite_difference"`` only: the step ``r`` of each weight tensor relative
            to its root-mean-square entry (Appendix C).

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
        (['0.weight', '2.weight'], torch.Size([8, 4]))
    """
    return hessian_diagonal_groups(
        model, loss_fn, inputs, target, method=method, num_probes=num_probes, num_groups=1,
        generator=generator, parameters=parameters, strict=strict, relative_step=relative_step,
    ).mean()
