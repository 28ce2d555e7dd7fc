r"""Signed factors of each sample's loss Hessian in the logits, exactly: the ``Lambda_n`` of the
generalized Gauss-Newton matrix ``J^T Lambda J`` as ``Lambda_n = sum_k s_nk c_nk c_nk^T``.

Every exact Gauss-Newton estimator (:mod:`.exact`, :mod:`.gauss_newton`, the few-output case of
:mod:`.gauss_newton_sketch`, the FSDP2 measurement) sends the columns ``c_nk`` backward through the
network and contracts ``sum_k s_nk (J_n^T c_nk)^2``; the number of columns is the backward cost.

- ``F.cross_entropy`` on ``(N, C)`` logits: ``diag(p) - p p^T``, analytic, ``C - 1`` columns of sign
  ``+`` (:func:`_cross_entropy_factors`).
- eq. 20 (:func:`~lightning_flatness.functional.losses.normalized_softmax_cross_entropy`) on ``(N, K)``
  logits: the closed-form Hessian of
  :func:`~lightning_flatness.functional.loss_hessian_factors.normalized_cross_entropy_logit_hessian`
  (float64), restricted to the complement of the constant shift (its exact null direction) and
  eigendecomposed there: at most ``K - 1`` signed columns (:func:`_normalized_cross_entropy_factors`).
- :class:`~lightning_flatness.functional.model_io.TokenLoss`: the base loss's factors per valid token,
  placed in their sequence (:func:`_token_loss_factors`).
- ``F.mse_loss``, ``F.binary_cross_entropy_with_logits``: the known diagonal ``Lambda_n``, ``D`` columns
  ``sqrt(d_nj) e_j`` (:func:`_elementwise_factors`).
- Any other per-sample-mean loss: ``Lambda_n`` by double backward (:func:`_per_sample_loss_hessians`)
  and an eigendecomposition (:func:`_signed_factors`); cost ``O(D)`` backward passes through the loss
  and ``O(D^3)`` per sample.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_flatness.functional.loss_forms import hessian_twin
from lightning_flatness.functional.loss_hessian_factors import (
    ELEMENTWISE_LOSSES,
    _normalized_cross_entropy_hessian_and_gradient,
    is_probability_target,
    loss_hessian_structure,
    target_probabilities,
)
from lightning_flatness.functional.losses import normalized_softmax_cross_entropy
from lightning_flatness.functional.model_io import TokenLoss

LossFn = Callable[[Tensor, Tensor], Tensor]


def _per_sample_loss_hessians(
    loss_fn: LossFn, logits: Tensor, target: Tensor
) -> tuple[Tensor, Tensor, list[str]]:
    """``Lambda_n`` as ``(N, D, D)``, the gradient ``dL/df`` (logits' shape, detached) and issues with
    the per-sample-mean assumption.

    For ``L = (1/N) sum_n l_n(f_n)`` the Hessian of ``L`` in all logits is block-diagonal with blocks
    ``Lambda_n / N``, so one double-backward pass per output coordinate ``j`` (all ``D`` batched with
    ``is_grads_batched``) gives row ``j`` of every block: ``d/df (sum_n dL/df_nj)``. The assumption
    is checked on values: the batch loss must equal the size-weighted mean of its two halves' losses
    (a sum-reduced loss fails this).
    """
    n = logits.shape[0]
    dim = logits[0].numel()
    f = logits.detach().requires_grad_(True)
    total = loss_fn(f, target)
    if not isinstance(total, Tensor) or total.numel() != 1:
        raise ValueError(
            f"`loss_fn` must return a scalar tensor (the mean loss over the batch), got "
            f"{getattr(total, 'shape', type(total).__name__)}; use reduction='mean'."
        )
    issues = []
    if n >= 2:
        half = n // 2
        with torch.no_grad():
            parts = (
                half * loss_fn(logits[:half], target[:half])
                + (n - half) * loss_fn(logits[half:], target[half:])
            ) / n
        value = float(total.detach())
        scale = max(abs(value), float(parts.abs()), torch.finfo(logits.dtype).tiny)
        if abs(value - float(parts)) > 1e3 * torch.finfo(logits.dtype).eps * scale:
            issues.append(
                f"`loss_fn` is not the mean of per-sample losses (batch value {value:.6g}, "
                f"size-weighted mean over its two halves {float(parts):.6g}); use reduction='mean' "
                f"and no terms that couple samples"
            )
    (grad,) = torch.autograd.grad(total.reshape(()), f, create_graph=True)
    if not grad.requires_grad:  # loss linear in the logits
        _warn_linear_loss()
        return torch.zeros(n, dim, dim, dtype=logits.dtype, device=logits.device), grad.detach(), issues
    basis = torch.eye(dim, dtype=logits.dtype, device=logits.device).reshape(dim, 1, *logits.shape[1:])
    basis = basis.expand(dim, *logits.shape)
    try:
        (rows,) = torch.autograd.grad(
            grad,
            f,
            basis,
            retain_graph=True,
            is_grads_batched=True,
            allow_unused=True,
            materialize_grads=True,
        )
    except (RuntimeError, NotImplementedError):  # a backward without a vmap rule: loop over j
        rows = torch.stack(
            [
                torch.autograd.grad(grad, f, e, retain_graph=True, allow_unused=True, materialize_grads=True)[
                    0
                ]
                for e in basis
            ]
        )
    hessians = n * rows.reshape(dim, n, dim).transpose(0, 1)  # [n, j, :] = d^2 l_n / df_nj df_n
    if not hessians.any():
        _warn_linear_loss()
    return 0.5 * (hessians + hessians.transpose(1, 2)), grad.detach(), issues


def _warn_linear_loss() -> None:
    warnings.warn(
        "`loss_fn` has zero curvature in the model's outputs on this batch (it is linear in them, as "
        "nll_loss is on log-probabilities that the model computes): its Gauss-Newton matrix is zero, so a "
        "Gauss-Newton estimate is zero and a Hessian estimate is the network's own curvature alone. "
        "Pass `F.nll_loss` or `nn.NLLLoss()` itself (recognised on log-probabilities: "
        "lightning_flatness.functional.loss_forms), or `F.cross_entropy` on logits.",
        stacklevel=3,
    )


def _loss_factors(
    loss_fn: LossFn, logits: Tensor, target: Tensor, need_grad: bool = True
) -> tuple[Tensor, Tensor, Optional[Tensor], list[str]]:
    """``Lambda_n = sum_k sign_nk c_nk c_nk^T`` as factors ``(N, D, K)`` and signs ``(N, K)``, with the
    gradient ``dL/df`` (logits' shape, detached; ``None`` for cross-entropy when not ``need_grad``) and
    issues with the per-sample-mean assumption.

    For ``loss_fn is F.cross_entropy`` (called with its defaults: mean reduction, no weights, no label
    smoothing) on ``(N, C)`` logits and integer class targets in ``[0, C)``, the factorisation is
    analytic, of rank ``C - 1`` (:func:`_cross_entropy_factors`: ``K = C - 1`` columns, all signs
    ``+1``), and ``dL/df_n = (p_n - e_{y_n}) / N``, computed in the logits' dtype (at least float32).
    The same factors hold for label smoothing
    (:class:`~lightning_flatness.functional.loss_forms.LabelSmoothedCrossEntropy`), with
    ``dL/df_n = (p_n - q_n) / N``, ``q_n = (1 - eps) e_{y_n} + eps / C``.
    For eq. 20 (``loss_fn is normalized_softmax_cross_entropy``) on such logits and targets: the closed
    form in float64 (:func:`_normalized_cross_entropy_factors`: at most ``K - 1`` signed columns and the
    gradient), returned in the logits' dtype. For ``F.mse_loss`` and ``F.binary_cross_entropy_with_logits``
    with a target of the outputs' shape: the diagonal of :func:`_elementwise_factors`. Any other loss:
    :func:`_per_sample_loss_hessians` and :func:`_signed_factors`.
    """
    if isinstance(loss_fn, TokenLoss):
        return _token_loss_factors(loss_fn, logits, target, need_grad)
    if hessian_twin(loss_fn) is F.cross_entropy and _plain_class_targets(logits, target):
        p = torch.softmax(logits.detach(), dim=1, dtype=torch.promote_types(logits.dtype, torch.float32))
        factors = _cross_entropy_factors(p).to(logits.dtype)
        grad = None
        if need_grad:  # (p - q) / N, q = (1 - eps) t + eps / K (t: e_y or the target's row; eps: smoothing)
            eps = getattr(loss_fn, "smoothing", 0.0)
            q = (1 - eps) * target_probabilities(target, p.shape[1], p.dtype) + eps / p.shape[1]
            grad = ((p - q) / logits.shape[0]).to(logits.dtype)
        signs = torch.ones(logits.shape[0], factors.shape[2], dtype=logits.dtype, device=logits.device)
        return factors, signs, grad, []
    if loss_fn is normalized_softmax_cross_entropy and _plain_class_targets(logits, target):
        factors, signs, grad = _normalized_cross_entropy_factors(logits, target, need_grad)
        return factors, signs, grad, []
    elementwise = any(loss_fn is f for f in ELEMENTWISE_LOSSES)  # identity: a loss need not be hashable
    if elementwise and isinstance(target, Tensor) and target.shape == logits.shape:
        return _elementwise_factors(loss_fn, logits, target, need_grad)
    hessians, grad, issues = _per_sample_loss_hessians(loss_fn, logits, target)
    factors, signs = _signed_factors(hessians)
    return factors, signs, grad, issues


def _cross_entropy_factors(p: Tensor) -> Tensor:
    r"""Exact rank-``(C - 1)`` factors of the softmax cross-entropy Hessians: ``(N, C, C - 1)`` columns
    ``S_n`` with ``S_n S_n^T = Lambda_n = diag(p_n) - p_n p_n^T``, from the probabilities ``p`` ``(N, C)``.

    With ``q = sqrt(p_n)`` (a unit vector), ``Lambda_n = diag(q) (I - q q^T) diag(q)``. The Householder
    reflection ``R = I - 2 u u^T / (u^T u)``, ``u = q + e_C``, is symmetric, orthogonal and maps
    ``e_C`` to ``-q``, so ``I - q q^T = R (I - e_C e_C^T) R = sum_{c < C} R_c R_c^T`` over its first
    ``C - 1`` columns, and ``S_n = diag(q) R[:, :C-1]``. ``u^T u = 2 + 2 q_C >= 2``: no cancellation
    for any ``p``. One column fewer than BackPACK's ``diag(q) - p q^T`` [1] (``C`` columns of rank
    ``C - 1``; the constant shift of the logits is its null direction), so the backward pass carries
    ``C - 1`` columns. ``C = 1`` (a constant loss): one zero column. Cost ``O(N C^2)``, in ``p``'s dtype;
    the result is a view of an ``(N, C - 1, C)`` tensor (the backward pass takes the columns as they are,
    sample-major).
    """
    n, c = p.shape
    if c == 1:
        return p.new_zeros(n, 1, 1)
    k = c - 1
    q = p.sqrt()
    # S = diag(q) R[:, :C-1] = [diag(q[:C-1]); 0] - (q * u) (q[:C-1] / (1 + q_C))^T, u^T u = 2 (1 + q_C),
    # built as S^T, (N, C - 1, C): the sample-major layout the backward pass keeps (one view away)
    head, tail = q[:, :k], q[:, k:]
    qu = p.clone()
    qu[:, k:].add_(tail)  # q * u = (p_1, .., p_{C-1}, p_C + q_C)
    coefficients = head / (-1.0 - tail)  # -q[:C-1] / (1 + q_C), (N, C - 1)
    columns = coefficients.unsqueeze(2) * qu.unsqueeze(1)  # (N, C - 1, C), contiguous
    torch.as_strided(columns, (n, k), (k * c, c + 1)).add_(head)  # entries (n, j, j): + q_nj
    return columns.transpose(1, 2)


def _normalized_cross_entropy_factors(
    logits: Tensor, target: Tensor, need_grad: bool = False
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    r"""Signed factors of eq. 20's per-sample logit Hessians, ``(N, K, K')`` and signs ``(N, K')`` with
    ``K' <= K - 1``, and (``need_grad``) the gradient ``dL/dz`` of the batch mean, ``(N, K)``, all in the
    logits' dtype, from the closed form (no double backward). ``target``: class indices in ``[0, K)``,
    checked by the caller (:func:`_plain_class_targets`).

    ``Lambda_n`` (float64, the closed form of
    :func:`~lightning_flatness.functional.loss_hessian_factors.normalized_cross_entropy_logit_hessian`)
    annihilates the constant vector ``1`` (the loss is shift-invariant, eq. 21), so it is
    eigendecomposed on ``1^perp``: with the Householder reflection ``R = I - 2 v v^T / (v^T v)``,
    ``v = q + e_K``, ``q = 1 / sqrt(K)`` (symmetric, orthogonal, ``R e_K = -q``), the first ``K - 1``
    columns ``Q`` of ``R`` are an orthonormal basis of ``1^perp`` and ``Lambda_n = Q (Q^T Lambda_n Q)
    Q^T`` exactly; ``Q^T Lambda_n Q = U diag(s) U^T`` gives the columns ``Q U sqrt|s|`` with signs
    ``sign(s)``. The shift direction is thus dropped by construction rather than by a rounding
    threshold; further null directions (common to every sample) are dropped as in
    :func:`_signed_factors`, with the threshold of the logits' dtype. Cost ``O(N K^3)`` (a batched
    ``(K - 1) x (K - 1)`` eigendecomposition), for the exact estimators' ``K`` (up to a few dozen).
    """
    n, k = logits.shape
    hessians, grads = _normalized_cross_entropy_hessian_and_gradient(logits, target)  # float64
    q = hessians.new_full((k,), 1.0 / math.sqrt(k))
    v = q.clone()
    v[-1] += 1.0  # v^T v = 2 + 2 / sqrt(K)
    basis = torch.eye(k, dtype=hessians.dtype, device=hessians.device) - torch.outer(v, v) * (2.0 / v.dot(v))
    basis = basis[:, : k - 1]  # (K, K - 1), orthonormal columns spanning 1^perp
    reduced = basis.T @ hessians @ basis
    factors, signs = _signed_factors(0.5 * (reduced + reduced.transpose(1, 2)), torch.finfo(logits.dtype).eps)
    grad = (grads / n).to(logits.dtype) if need_grad else None
    return (basis @ factors).to(logits.dtype), signs.to(logits.dtype), grad


def _elementwise_factors(
    loss_fn: LossFn, logits: Tensor, target: Tensor, need_grad: bool
) -> tuple[Tensor, Tensor, Optional[Tensor], list[str]]:
    """Exact factors of a loss of
    :data:`~lightning_flatness.functional.loss_hessian_factors.ELEMENTWISE_LOSSES`, whose ``Lambda_n =
    diag(d_n)`` is known (``2/D`` for MSE, ``s (1 - s) / D`` for binary cross-entropy with logits): the
    ``D`` columns ``sqrt(d_nj) e_j``, all of sign ``+``, ``(N, D, D)``, for outputs of any shape (``D`` per
    sample); the gradient by one backward pass through the loss. No eigendecomposition: ``O(N D^2)``
    memory for the columns (the exact method's ``D`` backward columns), against ``O(N D^3)`` time for the
    autograd fallback."""
    d = loss_hessian_structure(loss_fn, logits, target).d  # type: ignore[union-attr]  # (N, D) float64
    factors = torch.diag_embed(d.sqrt()).to(logits.dtype)
    signs = torch.ones(d.shape, dtype=logits.dtype, device=logits.device)
    return factors, signs, _loss_gradient(loss_fn, logits, target) if need_grad else None, []


def _loss_gradient(loss_fn: LossFn, logits: Tensor, target: Tensor) -> Tensor:
    """``dL/df`` at ``logits`` (their shape, detached): one backward pass through the loss alone."""
    f = logits.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(loss_fn(f, target), f)
    return grad.detach()


def _token_loss_factors(
    loss_fn: TokenLoss, logits: Tensor, target: Tensor, need_grad: bool = True
) -> tuple[Tensor, Tensor, Optional[Tensor], list[str]]:
    """Exact factors for :class:`TokenLoss`: block-diagonal per sequence.

    The loss is ``(1/M) sum_t l_t`` over the ``M`` valid tokens, so sequence ``n`` contributes
    ``Lambda_n = (N/M) sum_{t in n} E_t Lambda_t E_t^T`` in the ``1/N`` convention of
    :func:`_ggn_diagonal` (``E_t`` places token ``t``'s ``V`` logits among the sequence's ``T V``).
    The base loss's factors ``(M, V, K)`` of every valid token go to the columns ``t K .. (t + 1) K``
    of their sequence: ``T K`` columns per sequence (ignored positions: zero columns). Cost: that of
    the base loss on ``M`` rows, and ``T K`` backward columns.
    """
    from lightning_flatness.functional.loss_hessian_factors import _token_positions

    n = logits.shape[0]
    rows, labels, _ = loss_fn.rows(logits.detach(), target)
    if rows.shape[0] == 0:
        raise ValueError("TokenLoss: every target is ignore_index; the batch has no token to score.")
    row_factors, row_signs, _, issues = _loss_factors(loss_fn.base, rows, labels, need_grad=False)
    flat = _token_positions(loss_fn, logits, target)[0]
    positions = loss_fn.num_positions(logits)
    v, k = row_factors.shape[1], row_factors.shape[2]
    factors = torch.zeros(n * positions, v, positions, k, dtype=logits.dtype, device=logits.device)
    signs = torch.zeros(n * positions, positions, k, dtype=logits.dtype, device=logits.device)
    slot = flat % positions
    factors[flat, :, slot] = row_factors * math.sqrt(n / rows.shape[0])  # indexed shape (M, V, K)
    signs[flat, slot] = row_signs
    factors = loss_fn.output_layout(factors.view(n, positions, v, positions * k), logits)  # as the logits'
    signs = signs.reshape(n, positions, positions * k).sum(dim=1)
    return factors, signs, _loss_gradient(loss_fn, logits, target) if need_grad else None, issues


def _plain_class_targets(logits: Tensor, target: Tensor) -> bool:
    """``(N, C)`` floating logits, and ``(N,)`` integer targets all in ``[0, C)`` (none ignored) or
    ``(N, C)`` class probabilities
    (:func:`~lightning_flatness.functional.loss_hessian_factors.is_probability_target`)."""
    if logits.ndim != 2 or not logits.is_floating_point() or not isinstance(target, Tensor):
        return False
    if is_probability_target(logits, target):
        return True
    if (
        target.ndim != 1
        or target.shape[0] != logits.shape[0]
        or target.is_floating_point()
        or target.is_complex()
        or target.dtype == torch.bool
        or target.numel() == 0
    ):
        return False
    low, high = torch.aminmax(target)
    return 0 <= int(low) and int(high) < logits.shape[1]


def _signed_factors(hessians: Tensor, eps: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """``Lambda_n = sum_k sign_nk c_nk c_nk^T``: factors ``(N, D, K)`` and signs ``(N, K)``.

    Eigendecomposition in float64, eigenpairs sorted by ``|s|`` per sample; eigen-indices whose
    ``|s|`` is below ``D * eps * max|s|`` for every sample (null directions) are dropped (``eps``: that
    of ``hessians``' dtype unless given).
    """
    s, u = torch.linalg.eigh(hessians.to(torch.float64))
    order = s.abs().argsort(dim=1, descending=True)
    s = s.gather(1, order)
    u = u.gather(2, order.unsqueeze(1).expand_as(u))
    eps = torch.finfo(hessians.dtype).eps if eps is None else eps
    tol = hessians.shape[1] * eps * float(s.abs().max().clamp_min(0))
    keep = int((s.abs() > tol).any(dim=0).sum())  # columns sorted by |s|: a prefix survives
    s, u = s[:, :keep], u[:, :, :keep]
    return (u * s.abs().sqrt().unsqueeze(1)).to(hessians.dtype), torch.sign(s).to(hessians.dtype)
