r"""Sketched Hessian diagonal: the Gauss-Newton sketch plus random columns of every nonlinear op's own
curvature, one backward pass for all of them. Unbiased for ``diag(H)`` of any network built from the
ops of :mod:`.node_rules`; first derivatives of the network only.

**The identity.** For a loss computed by a graph of operations (second-order adjoints; the "Hessian
backpropagation" of Dangel, Kunstner and Hennig, 2020):

.. math:: \nabla^2_w L = J_f^\top \Lambda J_f + \sum_{\text{ops } z = \phi(a)} J_a^\top M_a J_a, \qquad
          M_a = \sum_i \frac{\partial L}{\partial z_i} \nabla^2_a z_i,

with ``f`` the logits, :math:`\Lambda` the loss Hessian in the logits (eq. 20-22's for the default
loss), ``a`` an op's weight-dependent inputs and :math:`J_a = \partial a / \partial w` through the
whole network upstream of it. The first term is the Gauss-Newton matrix (:mod:`.gauss_newton_sketch`);
the sum is the residual that the Gauss-Newton diagonal misses on networks that are not piecewise
linear in each weight (GELU, LayerNorm, attention's softmax and products, SiLU, hardswish, squeeze-
excitation gates). Each :math:`M_a` is known in closed form (:mod:`.node_rules`).

**The estimator.** Per sketch, draw for the logits the ``+`` and ``-`` columns of
:func:`~.gauss_newton_sketch.sketch_columns` and, independently, for each recorded op one ``+`` and one
``-`` column :math:`c_a^\pm` with :math:`\mathbb{E}[c_a^+ c_a^{+\top} - c_a^- c_a^{-\top}] = M_a`
(per sample: the op's entries of one sample belong to that sample). One batched backward pass of

.. math:: G_n^\pm = J_{f,n}^\top v_n^\pm + \sum_a J_{a,n}^\top c_{a,n}^\pm

(the gradient of ``<v, f> + sum_a <c_a, a>``: the columns enter the backward where their tensor sits)
reaches every recorded Linear/Conv/embedding output, and the per-sample squares of the layer rules
(:mod:`.layer_rules`) give :math:`\hat h = \frac1S \sum_s \sum_n (G_n^+)^2 - (G_n^-)^2`. The columns of
different ops, samples and sketches are independent with mean zero, so the cross terms vanish in
expectation and :math:`\mathbb{E}[\hat h] = \mathrm{diag}(H)` exactly. The noise is independent across
samples, so the jackknife over sample groups covers it.

**A weight used twice** (a tied LM head, ALBERT's shared layers), by Linear layers and embedding lookups:
a Linear call of it on an input that depends on it is bilinear in (input, weight), and that curvature
reaches the weight's own diagonal; it is sampled as a product (:mod:`.node_rules.tied_linear`), with the
weight's columns per sample (their size is bounded by :data:`TIED_COLUMN_ELEMENTS`), added to the sum of
the weight's per-sample gradients from its calls on the per-layer path (:mod:`.layer_rules.shared`), or to
its per-sample gradients on the per-sample path. Those columns are noisy:
``method="auto"`` keeps the Gauss-Newton diagonal for such networks (:func:`hessian_sketch_applies`). A
weight whose uses are not coupled that way (an encoder-decoder's token table, looked up by the encoder and
the decoder) needs no columns of its own: ``auto`` takes the sketch there.

**Pairs of columns.** Columns that share a pair meet in its squares, and their cross terms are
zero-mean noise. The loss's columns get a pair of their own (against the ops' columns they were most
of the noise on the zoo models), the ops' columns a second one, and the products of two activations
(whose ``+`` and ``-`` columns share their random signs, so that their own squares cancel draw by draw)
:data:`PRODUCT_PAIRS` more, in turn: at most ``2 (2 + PRODUCT_PAIRS) S`` backward columns. On small
models (where ``method="auto"`` would compute the Gauss-Newton part exactly) the loss's exact factors
are sent backward as columns of their own instead of its pair: its part then has no noise at all.
Measured against brute force: ``benchmarks/results/bench_hessian_sketch.md``.

**Cost.** One recorded forward pass; one backward pass for the adjoints :math:`\partial L/\partial z`
of the recorded ops; their columns (``O(numel)`` per elementwise op, two matrix products of the op's
size per product of two activations); batched backward passes of the columns to the layer outputs
and the per-sample squares, as for :mod:`.gauss_newton_sketch` (autograd's batched backward: the
folded-column tape of the exact method does not apply): ``2 + PRODUCT_PAIRS`` times the Gauss-Newton
sketch's backward columns on a transformer (its measured cost: ``benchmarks/RESULTS.md``, round 6).
Memory: the columns' stacks at the ops' inputs and a pass's layer-output gradients, each about
``2 (2 + PRODUCT_PAIRS)`` times the activations per sketch; on large models the sketches and then the
columns go through in groups of about
:data:`~.gauss_newton_sketch.BATCHED_COLUMN_ELEMENTS` entries (:func:`_sketch_groups`), so that memory
stays near one sketch's and time grows linearly in the sketches (round 23).
No double backward through the network:
it runs through fused kernels' first derivatives, and under
:func:`~lightning_flatness.functional.twice_differentiable.twice_differentiable` (timm's and Hugging
Face's attention in explicit ops, so that ``softmax`` and the products are seen).

**Limits (refused with the operation named).** An op on weight-dependent tensors that is neither
piecewise linear nor covered by a node rule (``atan``, an LSTM's fused kernel, fused
``scaled_dot_product_attention`` with dropout (without, it is written out:
:mod:`~lightning_flatness.functional.explicit_sdpa`), train-mode BatchNorm or dropout, a nonlinear function of
weights alone other than weight standardization or normalization, :mod:`.node_rules.weight_functions`,
whose curvature's diagonal is added exactly); a selected
weight used twice by anything but Linear layers and embedding lookups, or whose per-sample columns
would exceed :data:`TIED_COLUMN_ELEMENTS`; an op input changed in place after the op (activation
*modules* built with ``inplace=True`` run out of place under
:func:`~lightning_flatness.functional.twice_differentiable.twice_differentiable`; an in-place call in
the model's own code stays in place), or without the samples along dim 0 (a sequence-first layout).
Inputs with several rows per sample along dim 0, sample-major (windowed attention), are taken on the
per-layer path once the batch-independence probe has checked them (:func:`_grouped_rows_blockers`).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from lightning_flatness.functional.estimators import gauss_newton_sketch as sketch_module
from lightning_flatness.functional.estimators.exact import ExactMethodNotApplicable
from lightning_flatness.functional.estimators.gauss_newton_sketch import (
    MAX_EXACT_FACTOR_OUTPUTS,
    _diagonal_by_chunks,
    _diagonal_by_layers,
    _finish,
    _loss_structure,
    _mixed_base_columns,
    samples_interact,
)
from lightning_flatness.functional.estimators.loss_factors import _loss_factors
from lightning_flatness.functional.estimators.method_choice import SKETCH_MIN_WORK
from lightning_flatness.functional.estimators.node_rules import NODE_RULES, NodeCall
from lightning_flatness.functional.estimators.node_rules.elementwise import second_derivative
from lightning_flatness.functional.estimators.recorder import (
    _autograd_inputs,
    _fast_path_blockers,
    _record_forward,
    _RecordedForward,
)
from lightning_flatness.functional.model_io import ModelInputs
from lightning_flatness.functional.twice_differentiable import twice_differentiable

__all__ = ["PRODUCT_PAIRS", "hessian_sketch_applies", "hessian_sketch_blockers", "hessian_sketch_diagonal"]

LossFn = Callable[[Tensor, Tensor], Tensor]

#: Pairs of backward columns per sketch for the products of two weight-dependent tensors, shared in turn
#: (:func:`_node_injections`); with the loss's pair and the other ops' pair, at most ``2 + PRODUCT_PAIRS``.
#: One pair of their own lowered the tiny ViT's eq. 17 bias against sharing the other ops' pair, a second
#: one little more (the figures: ``benchmarks/results/hessian_sketch.md``, "Pairs").
PRODUCT_PAIRS = 1
#: Bound on the entries of the per-sample columns of a tied weight (``samples x weight entries x backward
#: columns per sketch``, :mod:`.node_rules.tied_linear`), materialised at once: 2**27 (512 MiB in float32).
TIED_COLUMN_ELEMENTS = 2**27


def hessian_sketch_blockers(forward: _RecordedForward, shared_weights: bool = True) -> list[str]:
    """Why the sketched Hessian diagonal does not apply to a forward recorded with ``record_nodes``:
    ops no node rule covers, weights used twice other than by Linear layers and embedding lookups (or
    too large for per-sample columns), ops invisible to the recorder, random ops, op inputs
    without the samples along dim 0 (``n k`` rows, ``k`` per sample, as windowed attention has them,
    are checked by the batch-independence probe instead: :func:`_grouped_rows_blockers`). Where there is
    none of these and ``shared_weights`` is False (``auto``: :func:`hessian_sketch_applies`), a weight used
    twice with coupled uses (:func:`_coupled_weights`)."""
    recorder = forward.recorder
    n = forward.logits.shape[0]
    reasons = [f"{entry}: no node rule (node_rules) covers it" for entry in recorder.uncovered]
    reasons += [
        f"{node.op!r} in {node.module}: its input or output is changed in place later (e.g. an in-place "
        "activation after it), so its curvature cannot be evaluated"
        for node in recorder.nodes or []
        if node.changed_in_place()
    ][:1]
    reasons += [
        f"{node.op!r} in {node.module} has an input without the {n} samples along dim 0"
        for node in recorder.nodes or []
        if any(t.ndim == 0 or t.shape[0] % n != 0 for t in node.inputs)
    ][:1]
    n_columns = 2 * (2 + PRODUCT_PAIRS)  # per sketch, at most
    shared = _shared_weights(forward)
    coupled = _coupled_weights(forward, shared)
    for name, uses in shared.items():
        leaf = forward.leaves[name]
        if recorder.other_uses[name] or not all(u.startswith(("'linear'", "'embedding'")) for u in uses):
            reasons.append(
                f"weight {name!r} is used {len(uses)} times ({'; '.join(uses[:2])}), not only by "
                "Linear layers and embedding lookups"
            )
        elif name in coupled and n * leaf.numel() * n_columns > TIED_COLUMN_ELEMENTS:
            reasons.append(
                f"weight {name!r} is used {len(uses)} times (a tied weight) and its per-sample columns "
                f"({n} samples x {leaf.numel()} entries x {n_columns}) exceed {TIED_COLUMN_ELEMENTS} entries"
            )
    reasons += [issue for issue in forward.issues if "invisible" in issue]
    reasons += [f"{op} draws random numbers" for op in recorder.random_ops]
    if not reasons and not shared_weights:
        reasons = [
            f"weight {name!r} is used {len(uses)} times (a tied weight: method='hessian_sketch' measures "
            "its Hessian, more noisily than the Gauss-Newton diagonal's gap on the tiny GPT-2, "
            "benchmarks/RESULTS.md)"
            for name, uses in shared.items()
            if name in coupled
        ][:1]
    return reasons


def _grouped_inputs(forward: _RecordedForward) -> list[str]:
    """The recorded ops with several rows per sample along dim 0 (windowed attention), where their
    columns enter. (Layers with such rows need no check here: the per-sample path does not read them,
    and the per-layer path's probe covers them.)"""
    n = forward.logits.shape[0]
    return [
        f"{node.op!r} in {node.module}"
        for node in forward.recorder.nodes or []
        if any(t.shape[0] != n for t in node.inputs)
    ]


def _grouped_rows_blockers(
    forward: _RecordedForward, model: nn.Module, x: ModelInputs, params: dict[str, nn.Parameter], caller: str
) -> list[str]:
    """Where ops hold several rows per sample along dim 0: the per-sample path cannot mask their columns
    to one sample, and the per-layer path reads the rows sample-major, which the batch-independence
    probe checks (:func:`samples_interact`, also on the ops' inputs); rows of one sample must not be
    shared with another. Empty when no op's rows are grouped."""
    grouped = _grouped_inputs(forward)
    if not grouped:
        return []
    blockers = _fast_path_blockers(forward.recorder, forward.leaves, forward.logits.shape[0])
    if blockers:
        return [
            f"{grouped[0]} has several rows per sample along dim 0, which only the per-layer path reads "
            f"({blockers[0]})"
        ]
    mixed = samples_interact(model, x, params, caller, record_nodes=True)
    return (
        [f"rows along dim 0 are not grouped by sample (or samples interact) at {mixed[0]}"] if mixed else []
    )


def hessian_sketch_applies(
    model: nn.Module,
    inputs: ModelInputs,
    target: Tensor,
    params: dict[str, nn.Parameter],
    shared_weights: bool = False,
) -> tuple[list[str], list[str]]:
    """:func:`hessian_sketch_blockers` from one recorded forward pass of ``inputs`` (no backward), and the
    names of the nonlinear ops its node rules cover (in call order, each once): what ``method="auto"``
    checks on two samples before choosing ``"hessian_sketch"``.

    ``shared_weights=False`` (``auto``): a selected weight used twice whose uses are coupled
    (:func:`_coupled_weights`: a tied LM head, a shared layer) blocks it too. The estimator measures such
    weights, unbiased, but the columns of their coupling are noisy: on the tiny GPT-2 at the callback's
    512 samples its normalized sharpness was further from the Hessian's than the Gauss-Newton diagonal's
    (``benchmarks/RESULTS.md``, round 7), so ``auto`` keeps the Gauss-Newton diagonal there and
    ``method="hessian_sketch"`` asks for it. A weight used twice without coupling (an encoder-decoder's
    token table, looked up by both stacks) has no columns of its own: its estimate is the same sum of
    the loss's and the ops' columns as any weight's, so it blocks nothing."""
    with torch.inference_mode(False), torch.enable_grad(), twice_differentiable(model):
        x, _ = _autograd_inputs(inputs, target)
        forward = _record_forward(model, x, params, "choose_method", record_nodes=True)
        blockers = hessian_sketch_blockers(forward, shared_weights)
        if not blockers:
            blockers = _grouped_rows_blockers(forward, model, x, params, "choose_method")
    ops = list(dict.fromkeys(node.op for node in forward.recorder.nodes or []))
    return blockers, ops


def _injected_nodes(forward: _RecordedForward) -> list[NodeCall]:
    """The recorded ops whose columns are injected: the node calls, then a tied weight's products."""
    return [*(forward.recorder.nodes or []), *_tied_products(forward)]  # none changed in place (blockers)


#: ``(live (node, adjoint) pairs, {id(product node): its pair}, pairs per sketch)``: :func:`_pair_layout`
PairLayout = tuple[list[tuple[NodeCall, Tensor]], dict[int, int], int]


def _node_injections(
    forward: _RecordedForward,
    layout: PairLayout,
    num_sketches: int,
    generator: Optional[torch.Generator],
    scale: float,
) -> tuple[list[Tensor], list[Tensor]]:
    """The columns of the ops of ``layout`` (:func:`_pair_layout` of :func:`_injected_nodes` and the mean
    loss's gradient at each one's output) for ``num_sketches`` sketches: ``(tensors, stacks)``, one
    ``(2 S pairs, *tensor.shape)`` stack per distinct input tensor (columns of ops sharing an input
    added). Column ``2 (pairs s + p)`` is the ``+`` column of pair ``p`` in sketch ``s``, the next one its
    ``-`` column.

    Pair 0 is the loss's (filled by the caller), pair 1 holds the ops whose ``+`` and ``-`` columns are
    independent, and the products (:attr:`~.node_rules.NodeRule.own_pair`: their ``+``/``-`` columns
    share their random signs, so that their own squares cancel draw by draw) take the next
    ``product_pairs`` pairs in turn, in call order (0: they share pair 1). Columns in one pair meet in
    the squares: their cross terms are zero-mean noise, and the loss's large columns against the ops'
    ones were most of it (measured: ``benchmarks/results/bench_hessian_sketch.md``). A tied weight's
    linear calls on inputs that depend on it count as products (:func:`_tied_products`); their
    columns at the weight itself are per sample, ``(2 S pairs, N, *weight.shape)``. ``scale``: of every
    column, ``1 / sqrt(S)`` of the whole estimate (a group of its sketches passes the estimate's)."""
    leaf_ids = {id(leaf) for leaf in forward.leaves.values()}
    live, pair_of, pairs = layout
    tensors: dict[int, Tensor] = {}
    stacks: dict[int, Tensor] = {}
    # sketch by sketch, so that sketches drawn in groups (:func:`_sketch_groups`) are the same draws
    for s in range(num_sketches):
        for node, adjoint in live:
            rule = NODE_RULES[node.op]
            pair = pair_of.get(id(node), 1)
            plus, minus = rule.columns(node, adjoint.detach(), generator)
            column = 2 * (pairs * s + pair)
            for tensor, cp, cm in zip(node.inputs, plus, minus):
                key = id(tensor)
                if key not in stacks:  # a tied weight's columns are per sample: (C, N, *weight.shape)
                    per_sample = (forward.logits.shape[0],) if key in leaf_ids else ()
                    tensors[key] = tensor
                    stacks[key] = tensor.new_zeros(2 * pairs * num_sketches, *per_sample, *tensor.shape)
                if cp is not None:
                    stacks[key][column] += scale * cp.to(tensor.dtype)
                if cm is not None:
                    stacks[key][column + 1] += scale * cm.to(tensor.dtype)
    return list(tensors.values()), list(stacks.values())


def _pair_layout(nodes: list[NodeCall], adjoints: tuple, product_pairs: int = PRODUCT_PAIRS) -> PairLayout:
    """Which pair of :func:`_node_injections` each op's columns take (``adjoints``: the mean loss's gradient
    at each op's output, None where it does not reach the loss: such ops get no columns):
    ``(live (node, adjoint) pairs, {id(product node): its pair}, pairs per sketch)``; the other ops take
    pair 1."""
    live = [(node, adjoint) for node, adjoint in zip(nodes, adjoints) if adjoint is not None]
    products = [node for node, _ in live if NODE_RULES[node.op].own_pair] if product_pairs else []
    first = 2 if len(products) < len(live) else 1  # pair 1: the ops that are not products
    pairs = first + min(len(products), product_pairs)
    return live, {id(node): first + i % (pairs - first) for i, node in enumerate(products)}, pairs


def _sketch_groups(
    forward: _RecordedForward, nodes: list[NodeCall], pairs: int, num_sketches: int
) -> list[int]:
    """Sizes of the groups in which the ``num_sketches`` sketches go through: as many per group as keep its
    columns' stacks at the ops' inputs and its layer-output gradients (autograd's batched backward) within
    about :data:`~.gauss_newton_sketch.BATCHED_COLUMN_ELEMENTS` entries, at least one. Every column of the
    ops' stacks is allocated up front, so all sketches at once held memory (and time, in page faults)
    growing with the sketches (``benchmarks/RESULTS.md``, round 23)."""
    inputs = {id(t): t.numel() for node in nodes for t in node.inputs}
    per_column = sum(inputs.values()) + sum(c.output.numel() for c in forward.recorder.calls)
    per_sketch = 2 * pairs * max(1, per_column + forward.logits.numel())
    size = max(1, min(num_sketches, sketch_module.BATCHED_COLUMN_ELEMENTS // per_sketch))
    return [min(size, num_sketches - start) for start in range(0, num_sketches, size)]


def _tied_products(forward: _RecordedForward) -> list[NodeCall]:
    """The Linear calls of a selected weight used more than once (a tied LM head) on an input that
    depends on the selected weights, as products ``(h, W)`` (:mod:`.node_rules.tied_linear`): their
    curvature reaches the diagonal of the weight's Hessian through its other uses."""
    rule = NODE_RULES["linear"]
    return [p for p in _shared_weight_products(forward, _shared_weights(forward)) if rule.accepts(p)]


def _shared_weight_products(forward: _RecordedForward, shared: dict[str, list[str]]) -> list[NodeCall]:
    """The recorded Linear calls, as products ``(h, W)``, of the weights ``shared``
    (:func:`_shared_weights`) on inputs that depend on the selected weights."""
    ids = {id(forward.leaves[name]) for name in shared}
    return [p for p in forward.recorder.weight_products if id(p.inputs[1]) in ids]


def _coupled_weights(forward: _RecordedForward, shared: dict[str, list[str]]) -> set[str]:
    """The selected weights used more than once with a Linear call on an input that depends on the selected
    weights (a tied LM head, ALBERT's shared layers: :func:`_shared_weight_products`, whatever the rule of
    :func:`_tied_products` accepts): the curvature that couples their uses reaches their diagonal and is
    sampled by per-sample columns at the weight itself. A weight whose uses are embedding lookups (an
    encoder-decoder's shared token table) and Linear calls on inputs that do not depend on the weights has
    no such term: each use is linear in it, so its Hessian diagonal is what the backward columns of the
    loss and the ops give, summed over its uses. ``shared``: :func:`_shared_weights`."""
    name_of = {id(forward.leaves[name]): name for name in shared}
    return {name_of[id(p.inputs[1])] for p in _shared_weight_products(forward, shared)}


def _shared_weights(forward: _RecordedForward) -> dict[str, list[str]]:
    """``{name: its uses}`` of the selected weights used more than once (a tied LM head, a shared layer)."""
    recorder = forward.recorder
    uses = {name: recorder.uses[name] + recorder.other_uses[name] for name in forward.leaves}
    return {name: u for name, u in uses.items() if len(u) > 1}


def _exact_loss_first(
    factors: Tensor, factor_signs: Tensor, stacks: list[Tensor], num_sketches: int, pairs: int
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Columns for exact loss factors: the ``K'`` factors ``(N, D, K')`` with their per-sample signs
    ``(N, K')`` as columns of their own, then the ops' pairs (pair 0 of the node stacks, left empty for
    the loss, dropped): ``(logit columns (N, D, C), signs (N, C), stacks (C, ...))``."""
    n, d, k = factors.shape
    keep = [c for c in range(2 * pairs * num_sketches) if (c // 2) % pairs != 0]
    columns = torch.cat([factors, factors.new_zeros(n, d, len(keep))], dim=2)
    pattern = factor_signs.new_tensor([1.0 if c % 2 == 0 else -1.0 for c in keep])
    signs = torch.cat([factor_signs.reshape(n, k), pattern.expand(n, len(keep))], dim=1)
    stacks = [torch.cat([st.new_zeros(k, *st.shape[1:]), st[keep]]) for st in stacks]
    return columns, signs, stacks


def _loss_pair_columns(mixed: Tensor, signs: Tensor, num_sketches: int, pairs: int) -> tuple[Tensor, Tensor]:
    """The loss's sketched columns (``(+, -)`` per sketch, or ``+`` only where its Hessian has no negative
    part, as for cross-entropy) in pair 0 of ``pairs`` per sketch, zeros elsewhere: ``(N, D, 2 S pairs)``
    columns and signs ``[+1, -1] * (S pairs)``."""
    n, d, _ = mixed.shape
    out = mixed.new_zeros(n, d, num_sketches, pairs, 2)
    out[:, :, :, 0, : mixed.shape[2] // num_sketches] = mixed.reshape(n, d, num_sketches, -1)
    return out.reshape(n, d, -1), signs.new_tensor([1.0, -1.0] * (num_sketches * pairs))


def hessian_sketch_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: ModelInputs,
    target: Tensor,
    params: dict[str, nn.Parameter],
    *,
    num_mc_samples: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    num_sketches: Optional[int] = None,
    max_exact_outputs: int = MAX_EXACT_FACTOR_OUTPUTS,
    exact_loss_factors: Optional[bool] = None,
) -> dict[str, Tensor]:
    r"""Unbiased sketched estimate of the Hessian diagonal of the mean loss (module docstring: the
    identity, the estimator, its cost and limits).

    Args:
        model: the network, in its current mode (eval: dropout and BatchNorm statistics fixed), never
            modified (attention switched to explicit ops for the call only).
        loss_fn: ``(logits, target) -> scalar``, a mean of per-sample losses.
        inputs: a tensor, tuple or dict with the samples along dim 0 (:func:`~..model_io.call_model`).
        target: what ``loss_fn`` takes.
        params: ``{name: parameter}`` of ``model`` (:func:`select_parameters`).
        num_mc_samples: draws of the loss's Monte-Carlo columns above ``max_exact_outputs`` outputs
            for losses without a structured Hessian (None: the loss's default).
        generator: for every random sign and draw, or None for the global RNG.
        num_sketches: independent sketches ``S`` (``2 S`` backward columns per pair; None: as
            :mod:`.gauss_newton_sketch` chooses).
        max_exact_outputs: up to this many outputs per sample the loss Hessian is factorised exactly.
        exact_loss_factors: send the exact factors of each sample's loss Hessian backward as columns
            of their own (about ``K`` columns: the Gauss-Newton part without noise, as
            ``method="gauss_newton"`` computes it) instead of mixing them into one pair per sketch.
            None: where the exact Gauss-Newton diagonal is cheap, as ``method="auto"`` decides it
            (at most ``max_exact_outputs`` outputs and fewer than
            :data:`~.method_choice.SKETCH_MIN_WORK` ``outputs x selected weights``).

    Returns:
        ``{name: diag}`` with each parameter's shape and dtype (entries may be negative).

    Raises:
        ExactMethodNotApplicable: an op without a node rule, a weight used twice, train-mode
            randomness (:func:`hessian_sketch_blockers`), or an op's input changed in place.
        ValueError: no parameters, a non-finite output.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
        >>> x, y = torch.randn(32, 3), torch.randint(0, 4, (32,))
        >>> est = hessian_sketch_diagonal(
        ...     model, torch.nn.functional.cross_entropy, x, y, {"0.weight": model[0].weight},
        ...     generator=torch.Generator().manual_seed(0),
        ... )
        >>> est["0.weight"].shape
        torch.Size([8, 3])
    """
    caller = "hessian_sketch_diagonal"
    if not params:
        raise ValueError(f"{caller} got no parameters; pass the weights to differentiate.")
    with torch.inference_mode(False), torch.enable_grad(), twice_differentiable(model):
        x, y = _autograd_inputs(inputs, target)
        forward = _record_forward(model, x, params, caller, record_nodes=True)
        blockers = hessian_sketch_blockers(forward) or _grouped_rows_blockers(
            forward, model, x, params, caller
        )
        if blockers:
            raise ExactMethodNotApplicable(
                f"{caller} does not apply: {'; '.join(blockers[:3])}. Use method='gauss_newton_sketch' "
                "(the Gauss-Newton diagonal) or method='ggn_hutchinson'."
            )
        logits = forward.logits.detach()
        n = logits.shape[0]
        structure, num_sketches = _loss_structure(loss_fn, logits, y, num_sketches, max_exact_outputs)
        if not isinstance(num_sketches, int) or num_sketches < 1:
            raise ValueError(f"`num_sketches` must be a positive int, got {num_sketches!r}.")
        work = logits[0].numel() * sum(p.numel() for p in params.values())
        if exact_loss_factors is None:
            exact_loss_factors = logits[0].numel() <= max_exact_outputs and work < SKETCH_MIN_WORK
        if structure is not None and not exact_loss_factors:
            mixed, signs = structure.sketch(num_sketches, generator)
        elif exact_loss_factors:
            mixed, signs, _, loss_issues = _loss_factors(loss_fn, logits, y, need_grad=False)
            if loss_issues:
                raise ExactMethodNotApplicable(f"{caller} does not apply: {'; '.join(loss_issues[:3])}.")
        else:
            mixed, signs, loss_issues = _mixed_base_columns(
                loss_fn, logits, y, num_mc_samples, generator, max_exact_outputs, num_sketches
            )
            if loss_issues:
                raise ExactMethodNotApplicable(f"{caller} does not apply: {'; '.join(loss_issues[:3])}.")
        # the loss is a mean; the columns are fresh (scaled in place: vocabulary-sized for a language model)
        mixed, signs = mixed.to(logits.dtype).div_(math.sqrt(n)), signs.to(logits.dtype)
        nodes, functions = _injected_nodes(forward), forward.recorder.weight_functions
        elementwise = forward.recorder.derived_elementwise
        outputs = (
            [n.output for n in nodes] + [c.output for c in functions] + [c.node.output for c in elementwise]
        )
        adjoints = (  # the mean loss's gradient at every op's output, in one backward pass
            torch.autograd.grad(loss_fn(forward.logits, y), outputs, retain_graph=True, allow_unused=True)
            if outputs
            else ()
        )
        own = _weight_function_diagonals(functions, adjoints[len(nodes) : len(nodes) + len(functions)])
        own += _derived_elementwise_diagonals(
            elementwise, adjoints[len(nodes) + len(functions) :], forward.leaves
        )
        blockers = _fast_path_blockers(forward.recorder, forward.leaves, n)
        if not blockers and not forward.recorder.samples_apart and not _grouped_inputs(forward):
            blockers = [  # (grouped rows: probed above, with the ops' inputs)
                f"samples interact (or rows along dim 0 are not grouped by sample) after {layer}"
                for layer in samples_interact(model, x, params, caller, record_nodes=True)
            ]
        layout = _pair_layout(nodes, adjoints[: len(nodes)])
        pairs = layout[2]
        # the loss's exact factors are columns of their own, sent once: all sketches in one group there
        groups = [num_sketches] if exact_loss_factors else _sketch_groups(forward, nodes, pairs, num_sketches)
        if blockers:  # a weight used outside Linear/Conv/embedding, or samples that interact: per sample
            ops = 2 * (pairs - 1) * num_sketches  # with exact loss factors, pair 0 is the loss's factors
            count = mixed.shape[2] + ops if exact_loss_factors else 2 * pairs * num_sketches
            warnings.warn(
                f"{caller}: per-layer contractions do not apply ({'; '.join(blockers[:3])}); computing "
                f"the diagonal with {n} x {count} backward passes (samples x columns).",
                UserWarning,
                stacklevel=2,
            )
        diag: Optional[dict[str, Tensor]] = None
        per_sketch = mixed.shape[2] // num_sketches  # the loss's mixed columns, sketch-major
        start = 0
        for size in groups:
            tensors, stacks = _node_injections(
                forward, layout, size, generator, 1.0 / math.sqrt(num_sketches)
            )
            if exact_loss_factors:  # the loss's exact columns first (per-sample signs), then the ops' pairs
                columns, column_signs, stacks = _exact_loss_first(mixed, signs, stacks, size, pairs)
            else:
                loss_part = mixed[:, :, start * per_sketch : (start + size) * per_sketch]
                columns, column_signs = _loss_pair_columns(loss_part, signs, size, pairs)
            start += size
            if not blockers:
                group = _diagonal_by_layers(forward, columns, column_signs, 1, (tensors, stacks))
            else:
                group = _diagonal_by_chunks(
                    forward.logits, columns, column_signs, forward.leaves, 1, (tensors, stacks)
                )
            del tensors, stacks, columns
            diag = group if diag is None else {name: diag[name].add_(value) for name, value in group.items()}
        assert diag is not None
        for name, part in own:
            diag[name] = diag[name] + part.reshape(diag[name].shape).to(diag[name].dtype)
    return _finish(diag, params)


#: entries of a function of the weights differentiated in one batched backward pass
#: (:func:`_derived_elementwise_diagonals`)
_DERIVED_CHUNK = 256


def _derived_elementwise_diagonals(
    calls: list, adjoints: tuple, leaves: dict[str, Tensor]
) -> list[tuple[str, Tensor]]:
    r"""``(weight name, diag(J^T D J))`` for each recorded unary elementwise op ``z = phi(t)`` on a function
    ``t(W)`` of the selected weights alone (:class:`~.recorder.DerivedElementwiseCall`: the sigmoid of Swin
    V2's position-bias MLP), with ``D = diag(d)``, ``d = g phi''(t)``, ``g`` the mean loss's gradient at
    ``z`` and ``J`` the Jacobian of ``t`` in the weights it depends on: the op's term of the second-order
    adjoint identity (:mod:`.node_rules.base`), exactly. ``t`` holds no samples, so the term is not per
    sample and nothing is sampled. Where ``t = P u`` selects from ``u`` (the call's ``root``), the term is
    ``J_u^T diag(P^T d) J_u`` (``P^T d``: the backward of the selection), ``sum_j e_j (du_j / dW)^2`` with
    ``e = P^T d`` (:func:`_weighted_squared_jacobian`). The curvature of ``u``'s own function (another such
    op) is its own term."""
    out: list[tuple[str, Tensor]] = []
    for call, adjoint in zip(calls, adjoints):
        if adjoint is None:
            continue
        t, u = call.node.inputs[0], call.root
        d = adjoint * second_derivative(call.node).to(adjoint.dtype)
        if u is not t:
            (d,) = torch.autograd.grad(t, u, d, retain_graph=True)
        names = list(call.sources)
        sums = (
            None if call.producer is None else _rowwise_squared_jacobian(call.producer, u, d, names, leaves)
        )
        if sums is None:
            sums = _weighted_squared_jacobian(u, d.reshape(-1), [leaves[name] for name in names])
        out += list(zip(names, sums))
    return out


def _weighted_squared_jacobian(u: Tensor, e: Tensor, targets: list[Tensor]) -> list[Tensor]:
    """``sum_j e_j (du_j / dw)^2`` for each of ``targets`` from the graph of ``u``: one backward pass per
    entry with ``e_j != 0``, ``_DERIVED_CHUNK`` at a time (batched one-hot cotangents)."""
    sums = [torch.zeros_like(w) for w in targets]
    live = e.nonzero().squeeze(1)
    for chunk in live.split(_DERIVED_CHUNK):
        basis = u.new_zeros(chunk.numel(), u.numel())
        basis[torch.arange(chunk.numel()), chunk] = 1.0
        grads = torch.autograd.grad(
            u,
            targets,
            basis.view(chunk.numel(), *u.shape),
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=True,
        )
        for total, g in zip(sums, grads):
            if g is not None:
                total += torch.tensordot(e[chunk].to(g.dtype), g.square(), dims=1)
    return sums


#: rows of a module's constant input whose per-row Jacobians are formed at once
#: (:func:`_rowwise_squared_jacobian`)
_ROW_CHUNK = 64


def _rowwise_squared_jacobian(
    producer: tuple, u: Tensor, e: Tensor, names: list[str], leaves: dict[str, Tensor]
) -> Optional[list[Tensor]]:
    """:func:`_weighted_squared_jacobian` for ``u = module(x)``, a module called on a constant, when each
    row of ``u`` (its last dim at every other index) is the module applied to that row of ``x`` alone
    (an MLP on a grid of positions; checked on a few rows in another order): per-row Jacobians by
    ``torch.func`` (``vmap`` of ``jacrev`` over the rows, ``_ROW_CHUNK`` at a time), each one row of the
    module's work, instead of a backward pass through all rows per entry. None where the rows are not
    separate (then the caller takes the graph's way)."""
    module, args, tensors = producer
    x = args[0]
    if x.ndim == 0 or u.ndim == 0 or x.shape[:-1] != u.shape[:-1] or len(args) > 1:
        return None
    x, rows_shape = x.reshape(-1, x.shape[-1]), (-1, u.shape[-1])  # rows: every position of the last dim
    if x.shape[0] < 2:
        return None
    by_id = {id(leaf): name for name, leaf in leaves.items()}
    selected = {key: t for key, t in tensors.items() if by_id.get(id(t)) in names}
    if sorted(by_id[id(t)] for t in selected.values()) != sorted(names):
        return None  # u depends on selected weights outside the module
    fixed = {key: t.detach() for key, t in tensors.items() if key not in selected}
    u = u.reshape(rows_shape)

    def rows_of(params: dict[str, Tensor], rows: Tensor) -> Tensor:
        return torch.func.functional_call(module, {**fixed, **params}, (rows,))

    with torch.no_grad():
        detached = {key: t.detach() for key, t in selected.items()}
        probe = torch.arange(min(4, x.shape[0]) - 1, -1, -1)  # a few rows, reversed
        try:
            again = rows_of(detached, x[probe])
        except Exception:
            return None
        expected = u[probe].detach()
        tolerance = 1e-6 * float(expected.abs().max())  # relative to the rows' scale, whatever it is
        if again.shape != expected.shape or not torch.allclose(again, expected, rtol=1e-5, atol=tolerance):
            return None

    def one_row(params: dict[str, Tensor], row: Tensor) -> Tensor:
        return rows_of(params, row.unsqueeze(0)).squeeze(0)

    jacobian = torch.func.vmap(torch.func.jacrev(one_row), in_dims=(None, 0))
    e = e.reshape(u.shape).detach()
    sums = {key: torch.zeros_like(t) for key, t in selected.items()}
    for start in range(0, x.shape[0], _ROW_CHUNK):
        rows = slice(start, start + _ROW_CHUNK)
        weights = e[rows].reshape(e[rows].shape[0], -1)
        for key, jac in jacobian(detached, x[rows]).items():
            flat = jac.reshape(weights.shape[0], weights.shape[1], -1)
            sums[key] += torch.einsum("ro,rof->f", weights.to(flat.dtype), flat.square()).view(
                sums[key].shape
            )
    name_of = {key: by_id[id(t)] for key, t in selected.items()}
    return [next(sums[key] for key in sums if name_of[key] == name) for name in names]


def _weight_function_diagonals(calls: list, adjoints: tuple) -> list[tuple[str, Tensor]]:
    """``(weight name, diag(M))`` of each recorded nonlinear function of one selected weight alone (weight
    standardization, normalization): its own curvature with the mean loss's gradient ``adjoints`` at its
    output, exactly (:mod:`.node_rules.weight_functions`; no sampling: the term is not per sample)."""
    return [
        (c.weight, c.rule.diagonal(c.args, c.kwargs, adjoint))
        for c, adjoint in zip(calls, adjoints)
        if adjoint is not None
    ]
