r"""Exact Hessian diagonals of several sample groups of one batch, from one pass over the batch.

A measurement's jackknife needs one Hessian-diagonal estimate per replicate group of samples. Estimated
group by group, each call of :func:`~.exact.exact_hessian_diagonal` pays its fixed cost: a recorded forward
(a torch function mode on every operation), the loss Hessian's factors (eq. 20's closed form and its
eigendecomposition), the folded-column backward pass and the metric update, most of a call on a small
network (measured: benchmarks/RESULTS.md, round 28). Here the batch holding ``G`` contiguous groups (as
``torch.tensor_split`` cuts it) goes through one forward, one factorisation and one backward pass, and only
the per-layer contractions are taken group by group, each from the rows of its samples:

.. math::

    \mathrm{diag}(H)_g = \frac{1}{N_g} \sum_{n \in g} \sum_k s_{nk}\, (\text{per-sample gradient of }
    v_{nk}^\top f_n)^2 ,

the same sums as :func:`~.exact.exact_hessian_diagonal` of each group alone (up to the rounding of batched
products of another size), so the identity ``diag(H) = diag(J^T Lambda J) / N`` and its checks carry over.

It applies where the pass is small (at most :data:`ONE_PASS_COLUMN_ELEMENTS` entries of backward columns at
the recorded layer outputs: above, a call's fixed cost is small beside its per-sample work, and the larger
pass runs slower than the groups one by one, measured in benchmarks/RESULTS.md, round 28), where the
per-layer path of the exact method applies without a shared weight, and where every recorded
call has one row per sample whose rule contracts a slice of the samples from slices of its inputs and output
gradients (:attr:`~.layer_rules.base.LayerRule.sliceable`: Linear, convolutions, normalization affines);
the loss is a mean over samples (not a :class:`~lightning_flatness.functional.model_io.TokenLoss`, whose
groups weigh their tokens). Elsewhere it returns ``None`` (after the forward it took to find out), and the
caller estimates the groups one by one; nothing is ever approximated.

Cost: that of :func:`~.exact.exact_hessian_diagonal` on the whole batch, plus ``G - 1`` more contraction
calls per layer (the same flops, cut into ``G`` products). Memory: that of one call on the whole batch.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from lightning_flatness.functional.estimators.exact import _diagonal_by_layers
from lightning_flatness.functional.estimators.layer_rules import LAYER_RULES, shared_call_groups
from lightning_flatness.functional.estimators.loss_factors import _loss_factors
from lightning_flatness.functional.estimators.recorder import (
    _autograd_inputs,
    _fast_path_blockers,
    _record_forward,
)
from lightning_flatness.functional.estimators.registry import OnePassGroups
from lightning_flatness.functional.model_io import ModelInputs, TokenLoss, group_bounds

__all__ = ["ONE_PASS_COLUMN_ELEMENTS", "exact_hessian_diagonal_groups", "max_samples"]

LossFn = Callable[[Tensor, Tensor], Tensor]

#: Entries of the ``K`` backward columns at the recorded layer outputs of the whole batch (``K N`` times a
#: sample's output entries) up to which the groups go in one pass (module docstring); :func:`max_samples`
#: bounds a batch by it with the recorded layer inputs counted too.
ONE_PASS_COLUMN_ELEMENTS = 2**22


def exact_hessian_diagonal_groups(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: ModelInputs,
    target: Tensor,
    params: dict[str, nn.Parameter],
    num_groups: int,
) -> Optional[OnePassGroups]:
    """``{name: (G, *shape)}``: the exact Hessian diagonal of each of ``num_groups`` contiguous sample groups
    of the batch (``torch.tensor_split`` along dim 0), each the mean over its own samples, from one pass
    (module docstring), with the most samples one pass of this model takes (:func:`max_samples`); ``None``
    where that does not apply, for the caller to estimate the groups one by one (then
    :func:`~.exact.exact_hessian_diagonal` raises or warns as it must).

    Args:
        model, loss_fn, inputs, target, params: as for :func:`~.exact.exact_hessian_diagonal`.
        num_groups: ``G >= 2``, at most the batch size.
    """
    n = int(target.shape[0]) if target.ndim else 0
    if num_groups < 2 or n < num_groups or isinstance(loss_fn, TokenLoss):
        return None
    with torch.inference_mode(False), torch.enable_grad():
        x, y = _autograd_inputs(inputs, target)
        forward = _record_forward(model, x, params, "exact_hessian_diagonal")
        recorder, logits, leaves = forward.recorder, forward.logits, forward.leaves
        if forward.issues or logits.shape[0] != n:
            return None
        calls = recorder.calls
        outputs = sum(c.output.numel() for c in calls)  # a column's entries at the recorded layer outputs
        if outputs > ONE_PASS_COLUMN_ELEMENTS:  # (at least one column: no factorisation needed to know)
            return None
        factors, signs, _, loss_issues = _loss_factors(loss_fn, logits.detach(), y, need_grad=False)
        if (
            factors.shape[2] * outputs > ONE_PASS_COLUMN_ELEMENTS
            or loss_issues
            or _fast_path_blockers(recorder, leaves, n)
            or not all(
                LAYER_RULES[c.op].sliceable and c.inputs.shape[0] == n and c.output.shape[0] == n
                for c in calls
            )
            or shared_call_groups(calls, recorder.derived_weights)
        ):
            return None
        bounds = group_bounds(n, num_groups)
        diags, mixing = _diagonal_by_layers(recorder, logits, factors / math.sqrt(n), signs, leaves, bounds)
        if mixing:
            return None
    # each group's sum over its samples was taken with the batch's 1 / n: its own mean is n / n_g of it
    groups = {
        name: torch.stack([d[name] * (n / (hi - lo)) for d, (lo, hi) in zip(diags, bounds)])
        .detach()
        .to(param.dtype)
        for name, param in params.items()
    }
    held = sum(c.inputs.numel() for c in calls)  # the layer inputs the contractions read, held with them
    return OnePassGroups(groups, max_samples(outputs // n, logits[0].numel(), held // n))


def max_samples(output_entries: int, outputs_per_sample: int, input_entries: int = 0) -> int:
    """The most samples whose backward columns and recorded layer inputs stay within
    :data:`ONE_PASS_COLUMN_ELEMENTS` entries: a sample has at most one column per output entry
    (``outputs_per_sample``; eq. 20 drops its null direction, so the count bounds the columns of every batch
    of this model) of ``output_entries`` entries at the recorded layer outputs, and ``input_entries`` at their
    inputs (a wide input, an image flattened into a Linear, counts there). At least 1.

    Example:
        >>> max_samples(310, 10, 340)  # the paper's MLP: 100 + 100 + 100 + 10 outputs, 40 + 3 x 100 inputs
        1219
    """
    per_sample = output_entries * outputs_per_sample + input_entries
    return max(1, ONE_PASS_COLUMN_ELEMENTS // max(1, per_sample))
