r"""Exact Hessian diagonal for networks that are piecewise linear in each individual weight.

The diagonal :math:`\mathrm{diag}(H)` of the Hessian of the mean loss is what Algorithm 1 of the
paper estimates by finite differences (eq. 61) and what eq. 13 and eq. 17 consume. For the networks
the paper studies it can be computed exactly, with zero variance, from the generalized Gauss-Newton
(GGN) identity. With logits :math:`f_n = f(x_n; w) \in \mathbb{R}^D`, per-sample losses
:math:`\ell_n` and the mean loss :math:`L = \frac1N \sum_n \ell_n(f_n)`,

.. math::

    \frac{\partial^2 L}{\partial w_i^2}
    = \frac1N \sum_n \Big( J_{n,i}^\top \Lambda_n J_{n,i}
      + \nabla_{f}\ell_n^\top \frac{\partial^2 f_n}{\partial w_i^2} \Big),
    \qquad J_{n,i} = \frac{\partial f_n}{\partial w_i},\;
    \Lambda_n = \nabla^2_{f} \ell_n .

If :math:`f` is piecewise linear in every *single* weight :math:`w_i` (ReLU / LeakyReLU, max and
average pooling, eval-mode BatchNorm, residual sums, flatten, eval-mode dropout between Linear /
Conv layers, each weight used once), then :math:`\partial^2 f_n / \partial w_i^2 = 0` almost
everywhere: the weight enters one affine map, and everything downstream is a composition of
piecewise-linear maps. The second term vanishes and ``diag(H) = diag(J^T Lambda J) / N`` exactly.
``Lambda_n`` need not be positive semi-definite (it is indefinite for the normalized
softmax-cross-entropy, eq. 20); the identity holds regardless.

Algorithm (BackPACK's ``DiagGGNExact`` [1] with a signed symmetric factorisation of ``Lambda``):

1. one forward pass; every ``linear`` / ``conv{1,2,3}d`` call whose weight or bias is selected is
   recorded (its input ``a`` and output ``z``, passed on to the model without a copy unless the
   model changes it in place);
2. signed factors of ``Lambda_n`` (:mod:`.loss_factors`): for ``F.cross_entropy`` with its defaults
   the analytic rank-``(C - 1)`` factorisation ``Lambda_n = S_n S_n^T`` through a Householder
   reflection (one column fewer than BackPACK's ``diag(sqrt(p_n)) - p_n sqrt(p_n)^T``), with no double
   backward and no eigendecomposition; for eq. 20 the closed-form ``Lambda_n`` eigendecomposed on the
   complement of the constant shift (at most ``D - 1`` columns); for any other loss ``Lambda_n`` from
   ``D`` double-backward passes through the loss only (batched; the Hessian of a mean of per-sample
   losses in the logits is block-diagonal) and its eigendecomposition
   ``Lambda_n = sum_k s_nk u_nk u_nk^T``;
3. the columns ``v_n = sqrt(|s_nk| / N) u_nk`` for every eigen-index ``k`` (at most ``D``; directions
   with ``|s| ~ 0`` for every sample, such as the constant shift of cross-entropy, are dropped) are
   propagated from the logits of all samples in one batched backward pass, giving ``g_nk = dz_n``
   for every recorded layer output ``z``: the columns folded into the batch, ``(K N, ...)``, through
   hand-written backward formulas where every operation has one (Linear, Conv, ReLU, pooling,
   eval-mode BatchNorm, residual sums, reshapes: :mod:`.layer_rules.column_backward`; each layer is
   then contracted as soon as its gradient is complete), else autograd's ``is_grads_batched``;
4. per layer, the per-sample gradient of ``v_n^T f_n`` is ``g_n a_n^T`` (Linear; summed over extra
   leading positions) or ``g_n unfold(a_n)^T`` (Conv, per group); its square, weighted by
   ``sign(s_nk)``, is summed over samples and ``k``. For a plain Linear layer the square factorises:
   ``sum_n sign_n (g_n^2)(a_n^2)^T``, one matrix product. With few positions ``P`` per sample (small
   feature maps) the square of the sum over positions is expanded into position pairs, again one
   matrix product and no per-sample gradients (:func:`~.layer_rules.contraction.position_pair_contraction`);
   convolutions with few input channels get their per-sample gradients from one grouped
   convolution backward (:func:`~.layer_rules.conv.grouped_squared_gradients`).

**Cost.** One forward pass (two when the model changes a recorded layer output in place), one
batched backward pass of ``K (+ 1) <= D + 1`` columns over the batch (``D`` = outputs per sample,
``K = C - 1`` for cross-entropy over ``C`` classes; the extra column is the batch-independence
check, below, where it is needed), and per layer and ``k`` a contraction costing about one
weight-gradient computation
(``O(N * out * in)`` for Linear, ``O(N * C_out * C_in * k * L)`` for Conv). Memory: the graph of one
forward pass, the stored inputs (Conv inputs unfolded: ``prod(kernel_size)`` times larger), the
layer-output gradients of all ``K`` columns at once and per-sample gradients of at most ``2**18``
elements at a time (``2**20`` on the grouped-convolution path).

**Checks: the result is never silently wrong.** During the forward a
:class:`torch.overrides.TorchFunctionMode` sees every torch function applied to a tensor that
depends on the selected weights and compares it with an allowlist (:data:`PIECEWISE_LINEAR_OPS`,
:data:`MULTILINEAR_OPS`; see there for the reasoning). Anything else (``tanh``, ``sigmoid``,
``gelu``, ``softmax`` inside the model, ``layer_norm``, ``batch_norm`` with batch statistics,
attention, products or quotients of two weight-dependent tensors, train-mode dropout, a weight used
twice, a tensor produced by an operation the mode could not see) makes the GGN differ from the
Hessian: with ``strict=True`` an :class:`ExactMethodNotApplicable` (a :class:`ValueError`) names the
operation and the module, with ``strict=False`` a :class:`UserWarning` does and the **GGN diagonal**
is returned. :func:`gauss_newton_diagonal` returns the GGN diagonal of any model without the check,
with the reasons, per weight tensor, for ``method="ggn_hutchinson"`` (:mod:`.ggn_hutchinson`), which
adds an unbiased estimate of the difference. Operations before
the first selected weight are not restricted (a frozen tanh feature extractor is fine). The loss
must be the mean of per-sample losses (checked on values: the batch loss against its two halves).
The per-layer contractions further need samples not to interact after the first selected layer.
When every operation on weight-dependent tensors provably keeps the samples apart (Linear, Conv,
pooling, eval-mode BatchNorm, elementwise operations and residual sums, ``flatten`` from dim 1,
padding of the non-batch dims, all with the batch along dim 0: :func:`_keeps_samples_apart`), that
holds by construction; otherwise one backward column from sample 0 checks that no other sample's
layer outputs receive gradient. When that fails (train-mode BatchNorm, a batch mean inside the model,
sequence-first layouts) or a weight is
used outside ``linear`` / ``conv``, the per-(sample, k) path is taken instead: ``N * K`` vectorised
backward passes (with a warning about the cost), still exact for the GGN.

**Models and losses as users have them.** ``inputs`` may be a tensor, a tuple (positional
arguments) or a dict (keyword arguments, e.g. Hugging Face batches), and the output a tensor, a tuple
or a dict / ``ModelOutput`` with ``"logits"`` (:mod:`~lightning_flatness.functional.model_io`). With
:class:`~lightning_flatness.functional.model_io.TokenLoss` on ``(N, T, V)`` logits a sequence is one
sample: its loss Hessian is block-diagonal over its tokens, factorised with ``T * K`` columns
(:func:`_token_loss_factors`), weighted by the token-mean of the loss.

**Limitations.** ``D x D`` eigendecompositions per sample: meant for classification-sized outputs
(for a ``K``-independent estimate see :mod:`.gauss_newton_mc`).
The per-layer path covers ``linear`` (any leading dims) and ``conv1d/2d/3d`` with any stride,
padding (including ``"same"`` and non-zero padding modes), dilation and groups; the allowlist is
conservative (``x * y`` of two weight-dependent tensors is flagged even when they depend on
different weights, where the diagonal would still be exact).

References:
    [1] F. Dangel, F. Kunstner, P. Hennig. BackPACK: Packing more into backprop. ICLR 2020
    (``backpack.extensions.DiagGGNExact``).
    [2] N. N. Schraudolph. Fast curvature matrix-vector products for second-order gradient
    descent. Neural Computation 14(7), 2002 (the generalized Gauss-Newton matrix).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from lightning_flatness.functional.estimators.layer_rules import (
    LayerCall,
    SharedCalls,
    accumulate_layer,
    accumulate_shared,
)
from lightning_flatness.functional.estimators.loss_factors import (  # noqa: F401  (re-exported)
    _cross_entropy_factors,
    _loss_factors,
    _per_sample_loss_hessians,
    _plain_class_targets,
    _signed_factors,
    _token_loss_factors,
)
from lightning_flatness.functional.estimators.op_tables import MULTILINEAR_OPS, PIECEWISE_LINEAR_OPS
from lightning_flatness.functional.estimators.recorder import (
    _autograd_inputs,
    _fast_path_blockers,
    _ForwardRecorder,
    _interaction_probe,
    _probe_values,
    _record_forward,
    _RecordedForward,
    rows_of_other_samples,
)
from lightning_flatness.functional.model_io import ModelInputs

__all__ = [
    "exact_hessian_diagonal",
    "ExactMethodNotApplicable",
    "gauss_newton_diagonal",
    "GaussNewtonDiagonal",
    "PIECEWISE_LINEAR_OPS",
    "MULTILINEAR_OPS",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


class ExactMethodNotApplicable(ValueError):
    """The Hessian diagonal of this model and loss is not its Gauss-Newton diagonal.

    Raised by :func:`exact_hessian_diagonal` with ``strict=True`` (a :class:`ValueError`, so
    ``except ValueError`` still catches it). The message names every reason and the alternatives.

    Attributes:
        issues: the reasons, one string each (an operation off the allowlist and its module, a
            weight used twice, a loss that is not a mean of per-sample losses, ...).
        gauss_newton_applicable: whether ``method="ggn_hutchinson"`` can take over: False when the
            loss is not a mean of per-sample losses or the model draws random numbers (train-mode
            dropout), where its exact Gauss-Newton part does not apply either.
    """

    def __init__(self, message: str, issues: tuple[str, ...] = (), gauss_newton_applicable: bool = True):
        super().__init__(message)
        self.issues = tuple(issues)
        self.gauss_newton_applicable = bool(gauss_newton_applicable)


_BATCHED_BACKWARD_ELEMENTS = 2**24  # bound on gradient elements of one batched backward (per-sample path)
#: From this many column entries on (``N x D x K``: language-model vocabularies), the batch-independence
#: probe takes a backward pass of its own instead of riding as one more column, which would copy them all.
SEPARATE_PROBE_ELEMENTS = 2**24
_HUTCHINSON_HINT = (
    'use method="ggn_hutchinson" (the exact Gauss-Newton diagonal plus Hutchinson probes of '
    'the remainder: unbiased, low variance) or method="hutchinson" (any twice-differentiable '
    "model), or pass strict=False to get the generalized Gauss-Newton diagonal with a warning"
)
_HUTCHINSON_ONLY_HINT = (
    'use method="hutchinson" (any twice-differentiable model; the Gauss-Newton part of '
    '"ggn_hutchinson" does not apply here either), or pass strict=False to get the '
    "generalized Gauss-Newton diagonal with a warning"
)


class _Diagonal(dict):
    """``{name: diagonal}`` filled by the contractions: the first contribution is stored as it is
    (:func:`~.layer_rules.contraction.accumulate_layer`); a rule's own contraction that adds in place
    (``diag[name] += ...``, ``index_add_``) gets zeros on first access."""

    def __init__(self, leaves: dict[str, Tensor]):
        super().__init__()
        self.leaves = leaves

    def __missing__(self, name: str) -> Tensor:
        value = self[name] = torch.zeros_like(self.leaves[name])
        return value


def _diagonal_by_layers(
    recorder: _ForwardRecorder,
    logits: Tensor,
    factors: Tensor,
    signs: Tensor,
    leaves: dict[str, Tensor],
    bounds: Optional[Sequence[tuple[int, int]]] = None,
) -> tuple[Any, list[str]]:
    """The fast path: one backward pass of all ``K`` columns at once (:func:`_column_gradients`), then
    per-layer contractions; without a probe column and with the folded-batch backward of
    :mod:`.layer_rules.column_backward`, each layer is contracted as soon as the pass reaches it.

    ``bounds``: ``[(start, stop), ...]`` sample ranges contracted each into a diagonal of its own (a list of
    them is returned), from the same forward and backward pass: for calls with one row per sample whose
    rules contract a slice of the samples from slices of the inputs and output gradients
    (:attr:`~.layer_rules.base.LayerRule.sliceable`) and no weight shared between calls (the caller checks;
    :mod:`.exact_groups`).

    The batch-independence probe (:func:`_probe_values`) is one more column of the same pass (a pass of
    its own first, from :data:`SEPARATE_PROBE_ELEMENTS` column entries on), once per recorded forward
    (``recorder.probe_passed``; groups of columns through the same forward share it):
    returns ``(None, layers)`` with the layers whose outputs of samples ``1..N-1`` receive gradient
    from sample 0's logits (the contractions do not apply), else ``(diag, [])``.
    """
    calls = recorder.calls
    n, k = logits.shape[0], factors.shape[2]
    outputs = [c.output for c in calls]
    # the batch-independence probe as column k, unless every operation kept the samples apart
    probe = 1 if n >= 2 and calls and not (recorder.samples_apart or recorder.probe_passed) else 0
    if probe and factors.numel() >= SEPARATE_PROBE_ELEMENTS:  # its own pass: no copy of the columns
        probe_grads = _column_gradients(recorder, logits, outputs, _interaction_probe(logits).unsqueeze(0))
        mixing = _mixing_layers(calls, probe_grads, 0, n)
        del probe_grads
        if mixing:
            return None, mixing
        recorder.probe_passed = True
        probe = 0
    if probe:
        columns = logits.new_zeros(k + probe, n, factors.shape[1])
        columns[:k] = factors.permute(2, 0, 1)
        columns[k, 0] = _probe_values(tuple(logits.shape[1:]), logits.dtype, logits.device).reshape(-1)
    else:
        columns = factors.permute(2, 0, 1)  # (K, N, D): a view, sample-major for cross-entropy's factors
    columns = columns.reshape(k + probe, *logits.shape)
    diag = _Diagonal(leaves)  # filled by the first contribution to each tensor
    diags = [diag] if bounds is None else [_Diagonal(leaves) for _ in bounds]
    unit_signs = bool((signs == 1).all())

    def contract_one(i: int, g: Tensor) -> None:
        if bounds is None:
            accumulate_layer(calls[i], g, signs, diag, leaves, unit_signs)
            return
        for (lo, hi), part in zip(bounds, diags):  # each group's samples: rows lo..hi of inputs and gradients
            sliced = dataclasses.replace(calls[i], inputs=calls[i].inputs[lo:hi])
            accumulate_layer(sliced, g[:, lo:hi], signs[lo:hi], part, leaves, unit_signs)

    derived = recorder.derived_weights

    def contract_group(group: list[LayerCall], group_grads: list[Tensor]) -> None:
        assert bounds is None, "groups of samples with shared weights: the caller estimates them one by one"
        accumulate_shared(group, group_grads, signs, diag, leaves, n, derived=derived)

    def result() -> Any:
        full = [
            {name: d[name] if name in d else torch.zeros_like(t) for name, t in leaves.items()} for d in diags
        ]
        return full[0] if bounds is None else full

    if not probe:  # each layer contracted as soon as the folded-batch backward reaches it
        consume = SharedCalls(calls, contract_one, contract_group, derived)
        if recorder.tape.backward(logits, columns, outputs, consume) is not None:
            consume.finish()
            return result(), []
    grads = _column_gradients(recorder, logits, outputs, columns)
    if columns.shape[0] > k:
        mixing = _mixing_layers(calls, grads, k, n)
        if mixing:
            return None, mixing
        recorder.probe_passed = True
    consume = SharedCalls(calls, contract_one, contract_group, derived)
    for i, g in enumerate(grads):
        if g is not None:
            consume(i, g[:k])
    consume.finish()
    return result(), []


def _mixing_layers(
    calls: Sequence[LayerCall], grads: Sequence[Optional[Tensor]], column: int, n: int
) -> list[str]:
    """The layers whose gradients of the probe (column ``column`` of ``grads``, on sample 0's logits)
    reach samples ``1..n-1``: the samples interact there (one flag per layer, one sync)."""
    reached = [rows_of_other_samples(g[column], n).any() for g in grads if g is not None]
    if not reached or not bool(torch.stack(reached).any()):
        return []
    return [
        f"{c.op} in {c.module}"
        for c, g in zip(calls, grads)
        if g is not None and bool(rows_of_other_samples(g[column], n).any())
    ]


def _column_gradients(
    recorder: _ForwardRecorder, logits: Tensor, outputs: list[Tensor], columns: Tensor
) -> Sequence[Optional[Tensor]]:
    """``(K, *z.shape)`` gradients of the ``K`` output columns at each recorded layer output ``z``
    (``None`` where ``z`` does not reach the logits): by the folded-batch backward of
    :class:`~.layer_rules.column_backward.ColumnTape` when every operation has a formula there, else
    by autograd (``is_grads_batched``; a loop over the columns if some backward has no vmap rule)."""
    grads = recorder.tape.backward(logits, columns, outputs)
    if grads is not None:
        return grads
    return _batched_backward(logits, outputs, columns)


def _batched_backward(
    logits: Tensor | Sequence[Tensor], targets: list[Tensor], vectors: Tensor | Sequence[Tensor]
) -> Sequence[Optional[Tensor]]:
    """``autograd.grad`` of ``logits`` to ``targets`` for each of ``vectors`` ``(K, *logits.shape)``, stacked
    as ``(K, *target.shape)`` (``None`` for a target the logits do not depend on): vmapped
    (``is_grads_batched``), or a loop over the vectors when some backward has no vmap rule. ``logits``
    may be several tensors, with one ``(K, *shape)`` stack of vectors each (the backward of the sum)."""
    try:
        return torch.autograd.grad(
            logits, targets, vectors, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    except (RuntimeError, NotImplementedError):  # some backward lacks a vmap rule: loop
        count = vectors.shape[0] if isinstance(vectors, Tensor) else vectors[0].shape[0]
        per_vector = [
            torch.autograd.grad(
                logits,
                targets,
                vectors[k] if isinstance(vectors, Tensor) else [v[k] for v in vectors],
                retain_graph=True,
                allow_unused=True,
            )
            for k in range(count)
        ]
        return tuple(
            None if per_vector[0][j] is None else torch.stack([p[j] for p in per_vector])
            for j in range(len(targets))
        )


def _diagonal_per_sample(
    logits: Tensor, factors: Tensor, signs: Tensor, leaves: dict[str, Tensor]
) -> dict[str, Tensor]:
    """One vectorised backward per (sample, k) pair: the GGN diagonal for any graph."""
    n, dim, k = factors.shape
    tol_mask = factors.abs().sum(dim=1) > 0  # (N, K) pairs with a nonzero factor
    pairs = tol_mask.nonzero()
    names = list(leaves)
    diag = {name: torch.zeros_like(t) for name, t in leaves.items()}
    numel = sum(t.numel() for t in leaves.values()) + logits.numel()
    chunk = max(1, _BATCHED_BACKWARD_ELEMENTS // numel)
    for start in range(0, pairs.shape[0], chunk):
        idx = pairs[start : start + chunk]
        vectors = torch.zeros(idx.shape[0], n, dim, dtype=logits.dtype, device=logits.device)
        vectors[torch.arange(idx.shape[0]), idx[:, 0]] = factors[idx[:, 0], :, idx[:, 1]]
        vectors = vectors.reshape(idx.shape[0], *logits.shape)
        sign = signs[idx[:, 0], idx[:, 1]]
        grads: Sequence[Optional[Tensor]]
        try:
            grads = torch.autograd.grad(
                logits,
                [leaves[m] for m in names],
                vectors,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        except (RuntimeError, NotImplementedError):  # some backward lacks a vmap rule: loop
            per_vector = [
                torch.autograd.grad(
                    logits, [leaves[m] for m in names], v, retain_graph=True, allow_unused=True
                )
                for v in vectors
            ]
            grads = [
                None if per_vector[0][j] is None else torch.stack([p[j] for p in per_vector])
                for j in range(len(names))
            ]
        for name, g in zip(names, grads):
            if g is not None:
                diag[name] += torch.tensordot(sign.to(g.dtype), g * g, dims=1)  # (a model that casts inside)
    return diag


def exact_hessian_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: ModelInputs,
    target: Tensor,
    params: dict[str, nn.Parameter],
    *,
    strict: bool = True,
) -> dict[str, Tensor]:
    r"""Exact diagonal of the Hessian of ``loss_fn(model(inputs), target)`` in ``params``.

    ``diag(H) = diag(J^T Lambda J) / N`` (GGN identity, module docstring), exact when the network
    is piecewise linear in each individual weight; this is the ``diag(H)`` of Algorithm 1 / eq. 61
    of the paper without its finite-difference and sampling error.

    Cost: one forward, one batched backward of ``K <= D`` columns (``D`` outputs per sample;
    ``C - 1`` for cross-entropy) plus one for the batch-independence check where the operations do not
    prove it, and per layer a weight-gradient-sized contraction per column. Zero variance. When
    samples interact inside the model or a weight is used outside a layer rule's op:
    ``N * K`` vectorised backward passes instead (warned).

    Assumptions: ``loss_fn`` is the mean of per-sample losses (checked on values) or a
    :class:`TokenLoss` (a mean over valid tokens); the model returns ``(N, ...)`` logits (a tensor, or
    in a tuple / dict / ``ModelOutput``); each selected tensor is the weight or bias of one call of a
    layer rule's op (``linear``, ``conv{1,2,3}d``, ``embedding``, normalization affine parameters) and
    everything downstream of the selected weights is on the allowlist (:data:`PIECEWISE_LINEAR_OPS`,
    :data:`MULTILINEAR_OPS`, eval-mode batch_norm and dropout), checked during the forward.

    Args:
        model: the network, used in its current train/eval mode and never modified (parameters,
            buffers and ``.grad`` untouched; temporary hooks are removed).
        loss_fn: ``(logits, target) -> scalar``, the mean of per-sample losses.
        inputs: ``(N, ...)`` inputs: a tensor, a tuple of positional arguments or a dict of keyword
            arguments (samples along dim 0; see :func:`~lightning_flatness.functional.model_io.call_model`).
        target: ``(N, ...)`` targets (``(N, T)`` token labels for :class:`TokenLoss`).
        params: ``{name: parameter}`` of ``model`` (see :func:`select_parameters`).
        strict: when the Hessian differs from the GGN (an operation off the allowlist, a weight used
            twice, train-mode BatchNorm or dropout, a loss that is not a per-sample mean): raise
            :class:`ExactMethodNotApplicable` (``True``) or warn and return the GGN diagonal
            (``False``).

    Returns:
        ``{name: diag}`` with each parameter's shape and dtype; entries may be negative.

    Raises:
        ExactMethodNotApplicable: with ``strict=True``, when the result would not be the Hessian
            diagonal (a :class:`ValueError`; its ``gauss_newton_applicable`` says whether
            ``method="ggn_hutchinson"`` can take over).
        ValueError: when the model output is not a finite ``(N, ...)`` tensor.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
        >>> model = model.double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
        >>> diag = exact_hessian_diagonal(model, F.cross_entropy, x, y, {"0.weight": model[0].weight})
        >>> loss = lambda w: F.cross_entropy(torch.func.functional_call(model, {"0.weight": w}, (x,)), y)
        >>> brute = torch.func.hessian(loss)(model[0].weight).reshape(15, 15).diagonal()
        >>> torch.allclose(diag["0.weight"].flatten(), brute, rtol=1e-12, atol=1e-14)
        True
    """
    if not params:
        raise ValueError("exact_hessian_diagonal got no parameters; pass the weights to differentiate.")
    with torch.inference_mode(False), torch.enable_grad():
        x, y = _autograd_inputs(inputs, target)
        forward = _record_forward(model, x, params, "exact_hessian_diagonal")
        factors, signs, _, loss_issues = _loss_factors(loss_fn, forward.logits.detach(), y, need_grad=False)
        issues = forward.issues + loss_issues
        if issues:
            message = (
                "exact_hessian_diagonal: the Hessian diagonal of this model is not the Gauss-Newton "
                "diagonal, because: "
                + "; ".join(issues[:8])
                + (f"; and {len(issues) - 8} more" if len(issues) > 8 else "")
                + "."
            )
            ggn_applies = not loss_issues and not forward.recorder.random_ops
            if strict:
                hint = _HUTCHINSON_HINT if ggn_applies else _HUTCHINSON_ONLY_HINT
                raise ExactMethodNotApplicable(
                    f"{message} To estimate it, {hint}.", tuple(issues), ggn_applies
                )
            warnings.warn(
                f"{message} Returning the generalized Gauss-Newton diagonal instead.",
                UserWarning,
                stacklevel=2,
            )
        diag = _ggn_diagonal(forward, factors, signs, issues, "exact_hessian_diagonal", stacklevel=3)
    return {name: _as_result(d, params[name]) for name, d in diag.items()}


def _as_result(d: Tensor, param: Tensor) -> Tensor:
    """``d`` detached, in ``param``'s dtype (no extra op when it is already both)."""
    return d if d.dtype == param.dtype and not d.requires_grad else d.detach().to(param.dtype)


def _ggn_diagonal(
    forward: _RecordedForward,
    factors: Tensor,
    signs: Tensor,
    issues: list[str],
    caller: str,
    stacklevel: int,
    in_place: bool = False,
) -> dict[str, Tensor]:
    """``diag(J^T Lambda J) / N`` from a recorded forward and the signed factors of the per-sample loss
    Hessians: the per-layer contractions where they apply, else the per-(sample, k) path (warned:
    its cost). The batch-independence probe rides along the per-layer backward pass. ``in_place``: the
    factors are the caller's to scale (no copy of them: a language model's columns are vocabulary-sized;
    factors laid out column-major, ``(N, D, C)`` with stride 1 along ``D``, then reach the backward pass
    without a copy either)."""
    recorder, logits, leaves = forward.recorder, forward.logits, forward.leaves
    root = math.sqrt(logits.shape[0])  # the loss is a mean over samples
    factors = factors.div_(root) if in_place else factors / root
    blockers = _fast_path_blockers(recorder, leaves, logits.shape[0])
    if any("invisible" in issue for issue in issues):  # it may hide a weight use: the safe path
        blockers.append("an operation invisible to the checks")
    diag = None
    if not blockers:
        diag, mixing = _diagonal_by_layers(recorder, logits, factors, signs, leaves)
        blockers = [
            f"samples interact (or rows along dim 0 are not grouped by sample) after {layer}"
            for layer in mixing
        ]
    if blockers:
        warnings.warn(
            f"{caller}: per-layer contractions do not apply "
            f"({'; '.join(blockers[:3])}); computing the diagonal with up to "
            f"{logits.shape[0]} x {factors.shape[2]} backward passes.",
            UserWarning,
            stacklevel=stacklevel,
        )
        return _diagonal_per_sample(logits, factors, signs, leaves)
    # no blockers left: _diagonal_by_layers ran and found no mixing, so it returned the diagonal
    assert diag is not None
    return diag


@dataclass
class GaussNewtonDiagonal:
    r"""The Gauss-Newton diagonal of a model and loss, and what separates it from the Hessian's.

    With logits :math:`f`, the mean loss :math:`L` and :math:`g = \nabla_f L`,
    :math:`H = J^\top \Lambda J + R` with the residual :math:`R = \sum_{n,c} g_{nc} \nabla^2_w f_{nc}`
    (module docstring). :func:`~.ggn_hutchinson.ggn_hutchinson_hessian_diagonal` adds an unbiased
    estimate of ``diag(R)`` to ``diagonal``.

    Attributes:
        diagonal: ``{name: diag(J^T Lambda J) / N}``, each with the parameter's shape and dtype.
        issues: why ``diag(H)`` may differ from ``diagonal`` (empty: it does not, ``diag(R) = 0``).
        loss_issues: the loss is not a mean of per-sample losses (then ``diagonal`` uses the wrong
            ``Lambda`` and ``H != GGN + R`` on the diagonal).
        random_ops: calls in the forward that draw random numbers (train-mode dropout, ``rand``):
            the model is then a different function at every call.
        tensor_issues: ``{name: reasons}``: why ``diag(R)`` may be nonzero on that tensor, from one
            recorded forward per tensor with only that tensor variable. Empty for a tensor in which
            the network is piecewise linear (e.g. the last layer of a tanh MLP): ``diag(R) = 0`` there.
        logits_grad: ``g = dL/df`` with the logits' shape, detached: the coefficients of ``R``.
    """

    diagonal: dict[str, Tensor]
    issues: list[str]
    loss_issues: list[str]
    random_ops: list[str]
    tensor_issues: dict[str, list[str]]
    logits_grad: Tensor


def gauss_newton_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: ModelInputs,
    target: Tensor,
    params: dict[str, nn.Parameter],
    *,
    caller: str = "gauss_newton_diagonal",
) -> GaussNewtonDiagonal:
    """Diagonal of the generalized Gauss-Newton matrix ``J^T Lambda J / N`` of any model, with the
    reasons it may differ from the Hessian diagonal, overall and per tensor (never refused).

    The same computation as :func:`exact_hessian_diagonal` (one forward, one batched backward of
    ``K <= D`` columns,
    per-layer contractions or the per-(sample, k) path, which is warned about: its cost) without
    the eligibility check. When the model is not piecewise linear in each weight, one extra
    recorded forward per selected tensor (no backward) finds the tensors in which it is.

    Args:
        model, loss_fn, inputs, target, params: as for :func:`exact_hessian_diagonal`.
        caller: the name used in messages.

    Returns:
        :class:`GaussNewtonDiagonal`.

    Raises:
        ValueError: no parameters, or the model output is not a finite ``(N, ...)`` tensor.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> params = {"0.weight": model[0].weight, "2.weight": model[2].weight}
        >>> ggn = gauss_newton_diagonal(model, F.cross_entropy, x, y, params)
        >>> ggn.diagonal["0.weight"].shape, ggn.logits_grad.shape
        (torch.Size([5, 3]), torch.Size([8, 2]))
        >>> {name: bool(reasons) for name, reasons in ggn.tensor_issues.items()}  # diag(R) != 0 possible?
        {'0.weight': True, '2.weight': False}
    """
    if not params:
        raise ValueError(f"{caller} got no parameters; pass the weights to differentiate.")
    with torch.inference_mode(False), torch.enable_grad():
        x, y = _autograd_inputs(inputs, target)
        forward = _record_forward(model, x, params, caller)
        factors, signs, logits_grad, loss_issues = _loss_factors(loss_fn, forward.logits.detach(), y)
        issues = forward.issues + loss_issues
        random_ops = list(forward.recorder.random_ops)
        diag = _ggn_diagonal(forward, factors, signs, issues, caller, stacklevel=3)
        diag = {name: d.detach().to(params[name].dtype) for name, d in diag.items()}
        model_issues = forward.issues
        del forward  # free the graph before the per-tensor forwards
        if not model_issues:  # piecewise linear in each weight: diag(R) = 0 everywhere
            tensor_issues: dict[str, list[str]] = {name: [] for name in params}
        else:
            tensor_issues = {
                name: _record_forward(model, x, {name: p}, caller).issues for name, p in params.items()
            }
    assert logits_grad is not None  # need_grad=True
    return GaussNewtonDiagonal(diag, issues, loss_issues, random_ops, tensor_issues, logits_grad)
