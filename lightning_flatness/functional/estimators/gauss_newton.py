r"""The exact generalized Gauss-Newton diagonal of any model: ``method="gauss_newton"``.

With logits :math:`f_n`, per-sample losses :math:`\ell_n` and the mean loss
:math:`L = \frac1N \sum_n \ell_n(f_n)`, the Hessian splits as
:math:`H = \underbrace{J^\top \Lambda J}_{\mathrm{GGN}} + R`, :math:`\Lambda = \nabla^2_f L`
(block-diagonal), :math:`R = \sum_{n,c} \partial_{f_{nc}} L\, \nabla^2_w f_{nc}` (see :mod:`.exact`).
This estimator returns :math:`\operatorname{diag}(J^\top \Lambda J)` exactly, for any network: the
same computation as ``method="exact"`` without its check that :math:`\operatorname{diag}(R) = 0`.

**What it measures.** The Gauss-Newton diagonal, not the Hessian's, wherever the network is not
piecewise linear in each weight (attention, LayerNorm, GELU, tanh, hardswish, ...): the result is
logged as a ``gauss_newton`` quantity. The GGN is positive semi-definite for convex losses in the
logits (cross-entropy), transforms like the Hessian under function-preserving rescalings (``J``
scales like the inverse weight), so eq. 13 and 17 computed from it keep their invariance. On the
model zoo the residual :math:`R` changes normalized sharpness noticeably, but Hutchinson probes of
:math:`R` (``method="ggn_hutchinson"``) overstated it by more than that at 16 probes: the probe noise
turns into upward bias through the clipping and square roots of eq. 17 (measured:
``benchmarks/results/bench_zoo_residual.md``). ``method="auto"`` therefore
measures the Gauss-Newton diagonal on such networks, and says so.

**Cost.** One forward pass and one batched backward pass of ``K <= D`` columns (``D`` outputs per
sample), first derivatives only (so it runs through fused attention kernels and ops without a
double backward), per-layer contractions; the per-(sample, column) path when samples interact or a
weight is used outside ``linear``/``conv`` (embedding tables), with a warning about its cost.
For many outputs use ``method="gauss_newton_mc"`` (:mod:`.gauss_newton_mc`), whose cost does not
grow with ``D``.

**Assumptions.** The loss is the mean of per-sample losses and the model is deterministic: otherwise
:class:`~.exact.ExactMethodNotApplicable` is raised with ``gauss_newton_applicable=False``.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from lightning_flatness.functional.estimators.exact import ExactMethodNotApplicable, _ggn_diagonal
from lightning_flatness.functional.estimators.loss_factors import _loss_factors
from lightning_flatness.functional.estimators.recorder import _autograd_inputs, _record_forward
from lightning_flatness.functional.model_io import ModelInputs

__all__ = ["gauss_newton_exact_diagonal", "gauss_newton_from_columns", "refuse_unless_gauss_newton_applies"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def refuse_unless_gauss_newton_applies(caller: str, loss_issues: list[str], random_ops: list[str]) -> None:
    """Raise :class:`ExactMethodNotApplicable` (``gauss_newton_applicable=False``) when the loss is not a
    mean of per-sample losses or the model draws random numbers (train-mode dropout): the Gauss-Newton
    matrix is then not defined as these estimators use it."""
    problems = loss_issues + [f"the model draws random numbers ({op})" for op in random_ops]
    if problems:
        raise ExactMethodNotApplicable(
            f"{caller}: the Gauss-Newton diagonal does not apply: "
            + "; ".join(problems[:4])
            + '. Use method="hutchinson" (any twice-differentiable model), or model.eval() for dropout.',
            tuple(problems),
            gauss_newton_applicable=False,
        )


def gauss_newton_exact_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: ModelInputs,
    target: Tensor,
    params: dict[str, nn.Parameter],
) -> dict[str, Tensor]:
    """``diag(J^T Lambda J) / N``, the exact Gauss-Newton diagonal of the mean loss (module docstring).

    Args:
        model, loss_fn, inputs, target, params: as for :func:`~.exact.exact_hessian_diagonal`.

    Returns:
        ``{name: diag}`` with each parameter's shape and dtype (non-negative for cross-entropy; eq. 20's
        indefinite loss Hessian can make entries negative).

    Raises:
        ExactMethodNotApplicable: the loss is not a mean of per-sample losses, or the model draws random
            numbers (train-mode dropout): the Gauss-Newton matrix is not defined as used here.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)
        ... ).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
        >>> diag = gauss_newton_exact_diagonal(model, F.cross_entropy, x, y, {"0.weight": model[0].weight})
        >>> def logits(w):
        ...     return torch.func.functional_call(model, {"0.weight": w}, (x,))
        >>> jac = torch.func.jacrev(logits)(model[0].weight).reshape(8, 2, 15)  # (N, K, P)
        >>> p = torch.softmax(logits(model[0].weight), 1)
        >>> lam = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)  # (N, K, K)
        >>> brute = torch.einsum("nkp,nkl,nlp->p", jac, lam, jac) / 8
        >>> torch.allclose(diag["0.weight"].flatten(), brute, rtol=1e-12, atol=1e-15)
        True
    """

    def exact_columns(logits: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor, list[str]]]:
        factors, signs, _, loss_issues = _loss_factors(loss_fn, logits, y)
        return [(factors, signs, loss_issues)]

    return gauss_newton_from_columns(
        model, inputs, target, params, exact_columns, "gauss_newton_exact_diagonal"
    )


#: ``(logits, target) ->`` groups of ``(columns (N, D, C), signs (N, C), the loss's issues)``, made one at a
#: time (a generator bounds the memory of many columns: :mod:`.gauss_newton_mc`); their diagonals add up.
ColumnsOf = Callable[[Tensor, Tensor], "Iterable[tuple[Tensor, Tensor, list[str]]]"]


def gauss_newton_from_columns(
    model: nn.Module,
    inputs: ModelInputs,
    target: Tensor,
    params: dict[str, nn.Parameter],
    columns_of: ColumnsOf,
    caller: str,
) -> dict[str, Tensor]:
    """``sum_{n,k} sign_nk (J_n^T c_nk)^2 / N``: the Gauss-Newton diagonal from the loss-Hessian columns
    that ``columns_of(logits, target)`` yields (groups of ``(N, D, C)`` columns, ``(N, C)`` signs and the
    reasons the loss does not qualify; the groups' diagonals add up), shared by the exact and the
    Monte-Carlo Gauss-Newton estimators.

    One recorded forward pass, one batched backward pass of the ``C`` columns of each group, the
    per-layer contractions (:mod:`.layer_rules`); raises :class:`~.exact.ExactMethodNotApplicable` (with
    ``gauss_newton_applicable=False``) when the loss does not qualify or the model draws random numbers
    (train-mode dropout): the Gauss-Newton matrix of a random function is not what is measured.
    """
    if not params:
        raise ValueError(f"{caller} got no parameters; pass the weights to differentiate.")
    with torch.inference_mode(False), torch.enable_grad():
        x, y = _autograd_inputs(inputs, target)
        forward = _record_forward(model, x, params, caller)
        diag: dict[str, Tensor] = {}
        for columns, signs, loss_issues in columns_of(forward.logits.detach(), y):
            refuse_unless_gauss_newton_applies(caller, loss_issues, forward.recorder.random_ops)
            part = _ggn_diagonal(forward, columns, signs, forward.issues, caller, stacklevel=4, in_place=True)
            diag = {name: diag[name].add_(d) if name in diag else d for name, d in part.items()}
            del columns, signs, part  # before the next group is made
    return {name: d.detach().to(params[name].dtype) for name, d in diag.items()}
