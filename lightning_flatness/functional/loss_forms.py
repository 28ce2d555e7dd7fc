r"""The forms in which users pass the standard losses, reduced to the one the estimators know.

The closed-form loss Hessians of :mod:`~lightning_flatness.functional.loss_hessian_factors` and
:mod:`.estimators.loss_factors` are registered for functions (``F.cross_entropy``, eq. 20,
``F.mse_loss``, ``F.binary_cross_entropy_with_logits``); a loss they do not know takes the autograd
fallback, whose cost grows with the number of outputs (``O(K)`` backward passes through the loss and an
``O(K^3)`` eigendecomposition per sample). Common forms of the same losses would take it needlessly, and
one would measure nothing:

- ``nn.CrossEntropyLoss()``, ``nn.NLLLoss()``, ``nn.MSELoss()`` and ``nn.BCEWithLogitsLoss()`` (the module
  forms, at their default options: no (class or positive) weights, ``ignore_index=-100``, mean reduction)
  are their functional forms (:func:`standard_loss`). Other options keep the module (autograd fallback,
  exact but slower).
- Label smoothing (``nn.CrossEntropyLoss(label_smoothing=eps)``, as torchvision's reference recipes train,
  and timm's ``LabelSmoothingCrossEntropy(eps)``) is :class:`LabelSmoothedCrossEntropy`: the cross-entropy
  against the target distribution ``q = (1 - eps) e_y + eps / K``, whose Hessian in the logits,
  ``(sum_k q_k) (diag p - p p^T) = diag p - p p^T``, does not depend on ``q``. So the closed forms of
  ``F.cross_entropy`` apply to it (:func:`hessian_twin`), and only its gradient, ``p - q``, differs.
- timm's ``SoftTargetCrossEntropy`` (mixup training) on ``(N, K)`` outputs is ``F.cross_entropy`` with
  probability targets, the same formula (:func:`loss_for_outputs`).
- ``F.nll_loss`` on log-probabilities ``o = log_softmax(z)`` (PyTorch's MNIST and word-language-model
  examples end their networks with ``log_softmax``) is *linear* in ``o``: its Hessian in the model's
  outputs is zero, so every Gauss-Newton diagonal split at the outputs is zero. On log-probabilities
  ``F.cross_entropy(o, y) = -log_softmax(o)_y = -o_y = F.nll_loss(o, y)`` for *every* weight (the
  rows of ``o`` stay normalised), so the two losses are the same function of the weights, with the
  same Hessian; and the Gauss-Newton matrix of ``F.cross_entropy`` at ``o`` is the usual one at the
  logits ``z``: with ``p = softmax(z) = exp(o)`` and ``J_o = (I - 1 p^T) J_z``,
  ``J_o^T (diag p - p p^T) J_o = J_z^T (diag p - p p^T) J_z`` because ``(diag p - p p^T) 1 = 0``
  (:func:`loss_for_outputs`). On outputs that are not log-probabilities ``F.nll_loss`` breaks its own
  contract and is rejected with an error naming the fix.

Cost: a ``logsumexp`` over the outputs of the batch the check sees (two samples at the front doors).
"""

from __future__ import annotations

import copy
import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_flatness.functional.model_io import TokenLoss

__all__ = [
    "LabelSmoothedCrossEntropy",
    "are_log_probabilities",
    "are_probabilities",
    "hessian_twin",
    "loss_for_outputs",
    "needs_outputs",
    "single_output_bce_with_logits_loss",
    "single_output_mse_loss",
    "split_ignore_index",
    "standard_loss",
]

LossFn = Callable[[Tensor, Tensor], Tensor]

#: Module losses that are their functional form at their default options.
_FUNCTIONAL_FORMS: dict[type, LossFn] = {
    nn.CrossEntropyLoss: F.cross_entropy,
    nn.NLLLoss: F.nll_loss,
    nn.MSELoss: F.mse_loss,
    nn.BCEWithLogitsLoss: F.binary_cross_entropy_with_logits,
}


class LabelSmoothedCrossEntropy:
    """``F.cross_entropy(logits, target, label_smoothing=smoothing)`` on ``(N, K)`` logits and ``(N,)``
    class targets: the mean over samples of ``-sum_k q_k log p_k`` with ``q = (1 - smoothing) e_y +
    smoothing / K``. Its logit Hessian is that of ``F.cross_entropy`` (:func:`hessian_twin`); its gradient
    in the logits is ``(p - q) / N``.

    Args:
        smoothing: ``eps`` in ``[0, 1]``.
    """

    def __init__(self, smoothing: float) -> None:
        if not 0.0 <= float(smoothing) <= 1.0:
            raise ValueError(f"label smoothing must lie in [0, 1], got {smoothing!r}.")
        self.smoothing = float(smoothing)

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits, target, label_smoothing=self.smoothing)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelSmoothedCrossEntropy) and other.smoothing == self.smoothing

    def __hash__(self) -> int:
        return hash((LabelSmoothedCrossEntropy, self.smoothing))

    def __repr__(self) -> str:
        return f"LabelSmoothedCrossEntropy({self.smoothing})"


def hessian_twin(loss_fn: LossFn) -> LossFn:
    """The loss whose registered closed forms (loss Hessian structure, Monte-Carlo columns, factors)
    hold for ``loss_fn``: ``F.cross_entropy`` for a :class:`LabelSmoothedCrossEntropy`, else ``loss_fn``
    itself. Its gradient is never taken from the twin."""
    return F.cross_entropy if isinstance(loss_fn, LabelSmoothedCrossEntropy) else loss_fn


def _at_defaults(loss: nn.Module) -> bool:
    return (
        getattr(loss, "weight", None) is None
        and getattr(loss, "pos_weight", None) is None
        and getattr(loss, "ignore_index", -100) == -100
        and getattr(loss, "reduction", "mean") == "mean"
    )


def _timm_loss(loss_fn: object, name: str) -> bool:
    """Whether ``loss_fn`` is timm's loss class ``name`` (``timm.loss``), recognised without importing timm:
    ``LabelSmoothingCrossEntropy`` is ``(1 - eps) nll + eps mean_k(-log p_k)``; ``SoftTargetCrossEntropy``
    is ``mean_n sum_k -t_nk log_softmax(x_n)_k`` over the last dim (mixup training)."""
    cls = type(loss_fn)
    return cls.__name__ == name and cls.__module__.startswith("timm.")


def standard_loss(loss_fn: LossFn) -> LossFn:
    """``loss_fn`` with the module forms at their default options (``nn.CrossEntropyLoss()``,
    ``nn.NLLLoss()``, ``nn.MSELoss()``, ``nn.BCEWithLogitsLoss()``) replaced by their functional forms,
    and label-smoothed cross-entropies (PyTorch's ``label_smoothing``, timm's
    ``LabelSmoothingCrossEntropy``) by :class:`LabelSmoothedCrossEntropy` (inside a
    :class:`~lightning_flatness.functional.model_io.TokenLoss` too); anything else unchanged. Needs no
    outputs."""
    if isinstance(loss_fn, TokenLoss):
        base = standard_loss(loss_fn.base)
        return loss_fn if base is loss_fn.base else loss_fn.with_base(base)
    if _timm_loss(loss_fn, "LabelSmoothingCrossEntropy"):
        return LabelSmoothedCrossEntropy(loss_fn.smoothing)  # type: ignore[attr-defined]
    form = _FUNCTIONAL_FORMS.get(type(loss_fn))
    if form is None or not _at_defaults(loss_fn):  # type: ignore[arg-type]
        return loss_fn
    smoothing = float(getattr(loss_fn, "label_smoothing", 0.0))
    return LabelSmoothedCrossEntropy(smoothing) if smoothing else form


def split_ignore_index(loss_fn: LossFn) -> tuple[LossFn, int]:
    """``(loss, ignore_index)``: a class-index loss that skips the targets equal to some ``ignore_index``
    (``nn.CrossEntropyLoss(ignore_index=255)`` and ``nn.NLLLoss(...)``, ``functools.partial(F.cross_entropy,
    ignore_index=255)`` and of ``F.nll_loss``, as semantic segmentation trains) as the same loss at the
    default ``ignore_index=-100`` and that index, for a
    :class:`~lightning_flatness.functional.model_io.TokenLoss` to drop those positions (and the loss to
    keep its closed forms); any other loss as it is, with ``-100``."""
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        index = int(loss_fn.ignore_index)
        if index != -100:
            loss_fn = copy.copy(loss_fn)
            loss_fn.ignore_index = -100
        return loss_fn, index
    if (
        isinstance(loss_fn, functools.partial)
        and loss_fn.func in (F.cross_entropy, F.nll_loss)
        and not loss_fn.args
        and set(loss_fn.keywords) == {"ignore_index"}
    ):
        return loss_fn.func, int(loss_fn.keywords["ignore_index"])
    return loss_fn, -100


def needs_outputs(loss_fn: LossFn) -> bool:
    """Whether :func:`loss_for_outputs` must see the model's outputs to settle ``loss_fn`` (it is, or
    wraps, ``F.nll_loss``; or it is timm's ``SoftTargetCrossEntropy``)."""
    loss_fn = standard_loss(loss_fn)
    if _timm_loss(loss_fn, "SoftTargetCrossEntropy"):
        return True
    return (loss_fn.base if isinstance(loss_fn, TokenLoss) else loss_fn) is F.nll_loss


def are_log_probabilities(outputs: Tensor, dim: int) -> bool:
    """Whether every ``outputs`` slice along ``dim`` is a log-probability vector: ``logsumexp`` within
    ``max(1e-4, 16 eps)`` of 0 (``eps`` of the outputs' dtype: rounding of a ``log_softmax``)."""
    if outputs.ndim == 0 or outputs.numel() == 0 or not outputs.is_floating_point():
        return False
    tol = max(1e-4, 16 * torch.finfo(outputs.dtype).eps)
    total = torch.logsumexp(outputs.detach().to(torch.float64), dim)
    return bool(torch.isfinite(total).all() and total.abs().max() <= tol)


def are_probabilities(outputs: Tensor, dim: int) -> bool:
    """Whether every ``outputs`` slice along ``dim`` (of at least 2 entries) is a probability vector:
    entries in ``[0, 1]`` summing to 1 within ``max(1e-4, 16 eps)`` (a ``softmax``'s rounding)."""
    if outputs.ndim == 0 or outputs.numel() == 0 or not outputs.is_floating_point() or outputs.shape[dim] < 2:
        return False
    tol = max(1e-4, 16 * torch.finfo(outputs.dtype).eps)
    o = outputs.detach().to(torch.float64)
    inside = bool(((o >= 0) & (o <= 1)).all())
    return inside and bool((o.sum(dim) - 1).abs().max() <= tol)


def loss_for_outputs(loss_fn: LossFn, outputs: Tensor) -> LossFn:
    """:func:`standard_loss`, with ``F.nll_loss`` on log-probabilities, and timm's
    ``SoftTargetCrossEntropy`` on ``(N, K)`` outputs, replaced by ``F.cross_entropy`` (the same function of
    the weights; see the module docstring).

    Args:
        loss_fn: the loss as given, or a ``TokenLoss`` around it.
        outputs: the model's outputs on a few samples: ``(N, K, ...)`` with classes along dim 1, or
            along ``loss_fn.class_dim`` when it is a ``TokenLoss`` (``(N, T, V)``: the last dim).

    Raises:
        ValueError: ``F.nll_loss`` on outputs that are not log-probabilities (it is linear in them,
            so its Gauss-Newton matrix is zero): the message names the fix.
    """
    loss_fn = standard_loss(loss_fn)
    if not needs_outputs(loss_fn):
        return loss_fn
    if _timm_loss(loss_fn, "SoftTargetCrossEntropy"):  # over the last dim: F.cross_entropy's dim 1 if 2-D
        return F.cross_entropy if outputs.ndim == 2 else loss_fn
    dim = loss_fn.class_dim if isinstance(loss_fn, TokenLoss) else 1
    if outputs.ndim < 2 or not are_log_probabilities(outputs, dim):
        raise ValueError(
            "the loss is `F.nll_loss` (or `nn.NLLLoss`), but the model's outputs are not log-probabilities "
            f"along dim {dim} (their logsumexp is not 0): nll_loss is then linear in the outputs, so its "
            "Gauss-Newton matrix is zero and the measures mean nothing. End the model with "
            "`log_softmax`, or pass `loss_fn=F.cross_entropy` for a model that returns logits."
        )
    if isinstance(loss_fn, TokenLoss):
        return loss_fn.with_base(F.cross_entropy)
    return F.cross_entropy


def single_output_bce_with_logits_loss(outputs: Tensor, target: Tensor) -> Tensor:
    """The binary cross-entropy of a binary classifier with one logit per sample, ``(N, 1)`` logits against
    ``(N,)`` (or ``(N, 1)``) targets in ``[0, 1]``, averaged over the samples: what a ``training_step`` that
    computes ``F.binary_cross_entropy_with_logits(logits.squeeze(-1), y)`` trains. (With the targets
    ``(N,)``, ``F.binary_cross_entropy_with_logits`` itself would broadcast them against ``(N, 1)`` logits to
    ``(N, N)``.) One output per sample: its Hessian is taken by autograd at the cost of one column.

    Example:
        >>> import torch
        >>> loss = single_output_bce_with_logits_loss(torch.tensor([[0.0], [0.0]]), torch.tensor([0.0, 1.0]))
        >>> round(float(loss), 4)  # log 2
        0.6931
    """
    n = outputs.shape[0]
    return F.binary_cross_entropy_with_logits(outputs.reshape(n), target.reshape(n).to(outputs.dtype))


def single_output_mse_loss(outputs: Tensor, target: Tensor) -> Tensor:
    """The squared error of a single-output regression model, ``(N, 1)`` outputs against ``(N,)`` (or
    ``(N, 1)``) targets, averaged over the samples: what Hugging Face's classifiers with ``num_labels=1``
    train with, ``MSELoss()(logits.squeeze(), labels.squeeze())``. (``F.mse_loss`` itself would broadcast
    ``(N, 1)`` against ``(N,)`` to ``(N, N)``.) One output per sample: its Hessian is taken by autograd at
    the cost of one column.

    Example:
        >>> import torch
        >>> float(single_output_mse_loss(torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0])))
        2.5
    """
    n = outputs.shape[0]
    return F.mse_loss(outputs.reshape(n), target.reshape(n).to(outputs.dtype))
