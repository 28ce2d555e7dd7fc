r"""Sketched Gauss-Newton diagonal: random-sign mixtures of the loss-Hessian columns, squared per chunk
of samples. One or two backward columns per sample whatever the number of classes; few squares.

With logits :math:`f_n`, the mean loss :math:`L = \frac1N \sum_n \ell_n(f_n)`, per-sample Jacobians
:math:`J_n` and :math:`\Lambda_n = \nabla^2_f \ell_n = \sum_k s_{nk} c_{nk} c_{nk}^\top` (signed columns:
the exact factors of :func:`~.exact._loss_factors` for few outputs; above that, for cross-entropy and
eq. 20, the exact factors of their structured form
(:class:`~lightning_flatness.functional.loss_hessian_factors.StructuredLossHessian`: a diagonal core
behind a rank-one correction plus rank <= 4, mixed in ``O(N K)`` without materialising ``K`` columns);
else the Monte-Carlo columns of :mod:`~lightning_flatness.functional.loss_hessian_factors`, whose
expectation is :math:`\Lambda_n`), the
Gauss-Newton diagonal is :math:`\mathrm{diag}(G) = \frac1N \sum_n \mathrm{diag}(J_n^\top \Lambda_n J_n)`.

**Sketch.** Split the columns by sign and mix each part with independent Rademacher signs
:math:`\varepsilon_{nk}` (one draw per sample, column and sketch):

.. math:: v_n^\pm = \sum_{k:\, \pm s_{nk} > 0} \varepsilon_{nk} \sqrt{|s_{nk}|}\, c_{nk}, \qquad
          \mathbb{E}_\varepsilon[v_n^\pm v_n^{\pm\top}] = \Lambda_n^\pm,
          \quad \Lambda_n = \Lambda_n^+ - \Lambda_n^-.

Cut the ``N`` samples into chunks :math:`b` of ``chunk_size = B`` samples. For each chunk take **one**
weight gradient per part, :math:`G_b^\pm = \sum_{n \in b} J_n^\top v_n^\pm` (an ordinary gradient of
:math:`\sum_{n \in b} v_n^{\pm\top} f_n`), and

.. math:: \hat g = \frac{1}{N S} \sum_{s=1}^{S} \sum_b \big[(G_b^+)^2 - (G_b^-)^2\big], \qquad
          \mathbb{E}[\hat g] = \mathrm{diag}(G),

because the :math:`\varepsilon` of different samples and columns are independent with mean zero: in
:math:`(G_b^\pm)^2 = \sum_{n,m \in b} \sum_{k,l} \varepsilon_{nk}\varepsilon_{ml} (\ldots)` only the
terms ``n = m, k = l`` survive the expectation, and they sum to
:math:`\sum_{n \in b} \mathrm{diag}(J_n^\top \Lambda_n^\pm J_n)`. Unbiased for any ``B`` and ``S``
(``S = num_sketches`` independent mixtures). ``B = 1`` squares per-sample gradients (as
``"exact"`` does, with 1-2 columns instead of about ``K``); ``B = N`` is a Hutchinson estimate of the
batch's Gauss-Newton diagonal in the output space (``2 S`` ordinary backward passes).

**Variance.** The cross terms (``n != m`` or ``k != l``) are the noise: with exact base columns a
chunk's estimate of one entry has the variance of a Rademacher Hutchinson probe,
:math:`2[(\sum_i a_i^2)^2 - \sum_i a_i^4] \le 2 (\sum_i a_i^2)^2` over its ``B K`` terms ``a_i``, so a
relative standard deviation of at most :math:`\sqrt 2` (Monte-Carlo base columns add their draw noise).
Averaged over the ``N S / B`` independent chunk estimates of a measurement it falls like
:math:`\sqrt{2B/(N S)}` or faster. The noise is independent across chunks and sample groups, so the
jackknife of :class:`~lightning_flatness.metric.NormalizedSharpness` covers it; like every noise it
biases the nonlinear measures (eq. 17 is concave in ``h``, clipping at zero convex), which is why
``B = 1`` is the default: on a CIFAR ResNet-18 it kept the normalized sharpness close to
``"exact"`` on the same samples and left the jackknife s.e. unchanged, while ``B = 8`` and ``B = 64``
added noise and cost no less (measured: ``benchmarks/results/bench_resnet18_cost.md``).

**Cost.** One recorded forward pass, one batched backward pass of ``2 S`` columns (``S`` for
cross-entropy, whose ``Lambda`` has no negative part) to the recorded layer outputs, and per layer the
contraction of :mod:`.layer_rules` (``B = 1``: per-sample squares or position pairs, about the flops of
``2 S`` weight gradients) or :func:`chunk_contraction` (one weight gradient per chunk and column,
``2 S N / B`` squares of every weight, instead of about ``K N`` for ``"exact"``: a memory-bound pass
over all weights per sample and column). Whether samples interact is proved from the recorded
operations where they all keep the samples apart (Linear, Conv, pooling, eval-mode BatchNorm,
elementwise operations: :func:`~.exact._keeps_samples_apart`, as for ``"exact"``); otherwise it is
checked on the first :data:`INTERACTION_PROBE_SAMPLES` samples (:func:`samples_interact`: a forward
and a backward of those samples; its cost: ``benchmarks/results/bench_sketch_copies.md``), not
with a probe column on the whole batch.
``B >= N``: ``2 S`` plain backward passes to the weights, for any graph. When samples
interact (train-mode BatchNorm) or a weight is used outside Linear/Conv, one backward per chunk and
column is taken instead (``2 S N / B`` passes, warned). No double backward anywhere. The base columns
cost ``O(N K^3)`` for the exact factors (``K <= max_exact_outputs``), ``O(N K S)`` for the structured
ones (any ``K``) and ``O(N K)`` per draw for the Monte-Carlo ones
(:func:`~lightning_flatness.functional.loss_hessian_factors.sample_loss_hessian_columns`), which are
mixed into the same columns, so more draws cost no backward pass.

**What it measures.** The Gauss-Newton diagonal, equal to the Hessian diagonal only when the network is
piecewise linear in each weight (see :mod:`.exact`). Defaults (:data:`DEFAULT_CHUNK_SIZE`,
:data:`DEFAULT_NUM_SKETCHES`) come from ``benchmarks/results/bench_resnet18_cost.md``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch import Tensor, nn

from lightning_flatness.functional.estimators.exact import (
    _BATCHED_BACKWARD_ELEMENTS,
    _batched_backward,
)
from lightning_flatness.functional.estimators.gauss_newton import refuse_unless_gauss_newton_applies
from lightning_flatness.functional.estimators.layer_rules import (
    LAYER_RULES,
    LayerCall,
    LayerRule,
    SharedCalls,
    accumulate_layer,
    accumulate_shared,
    per_sample_call,
)
from lightning_flatness.functional.estimators.loss_factors import _loss_factors
from lightning_flatness.functional.estimators.recorder import (
    _autograd_inputs,
    _fast_path_blockers,
    _interaction_probe,
    _record_forward,
    _RecordedForward,
    rows_of_other_samples,
)
from lightning_flatness.functional.loss_forms import hessian_twin
from lightning_flatness.functional.loss_hessian_factors import (
    StructuredLossHessian,
    default_exact_classes,
    default_mc_samples,
    loss_hessian_structure,
    sample_loss_hessian_columns,
    token_loss_columns,
)
from lightning_flatness.functional.losses import normalized_softmax_cross_entropy
from lightning_flatness.functional.model_io import ModelInputs, TokenLoss, inputs_batch_size, select_samples

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_NUM_SKETCHES",
    "DEFAULT_STRUCTURED_SKETCHES",
    "INTERACTION_PROBE_SAMPLES",
    "MAX_EXACT_FACTOR_OUTPUTS",
    "chunk_contraction",
    "gauss_newton_sketch_diagonal",
    "samples_interact",
    "sketch_columns",
]

LossFn = Callable[[Tensor, Tensor], Tensor]

#: Samples per sign-mixed chunk (``B``): each chunk costs one square of every weight per column.
DEFAULT_CHUNK_SIZE = 1
#: Independent sketches ``S`` (``2 S`` backward columns for a loss with an indefinite Hessian).
DEFAULT_NUM_SKETCHES = 1
#: Default ``S`` per loss above ``max_exact_outputs`` outputs, where the structured exact factors are
#: mixed (others: :data:`DEFAULT_NUM_SKETCHES`). Eq. 20 at many classes: each sample's Gauss-Newton
#: diagonal has large ``+`` and ``-`` parts whose sum over samples nearly cancels at initialisation, so
#: the mixing noise is large against the result and eq. 17 turns it into upward bias; 4 sketches (8
#: backward columns, fewer than the Monte-Carlo estimator's 18) is the smallest count whose measured
#: bias on tiny 1,000-class networks met the 5% target (``benchmarks/results/bench_resnet18_1000.md``).
DEFAULT_STRUCTURED_SKETCHES: dict[Callable[..., Tensor], int] = {normalized_softmax_cross_entropy: 4}
#: Up to this many outputs per sample the exact factors of ``Lambda_n`` are mixed (no class sampling;
#: ``O(K^3)`` per sample for losses without a closed form); above it the structured exact factors
#: (cross-entropy, eq. 20) or the Monte-Carlo columns (other losses).
MAX_EXACT_FACTOR_OUTPUTS = 32
#: Samples of the batch-independence probe (:func:`samples_interact`).
INTERACTION_PROBE_SAMPLES = 4
#: Bound on the per-chunk weight-gradient entries materialised at once.
CHUNK_GRADIENT_ELEMENTS = 2**22
#: Bound on the gradient entries of one batched backward pass of :func:`_diagonal_by_layers` (columns
#: entering at inner tensors: the Hessian sketch's) and on its columns' stacks: the sketches and then the
#: columns go through in groups of about this many entries (at least one column). All in one pass, a
#: ViT-Tiny's memory and time grew faster than its sketches (``benchmarks/RESULTS.md``, round 23).
BATCHED_COLUMN_ELEMENTS = 2**26


def sketch_columns(
    columns: Tensor, signs: Tensor, num_sketches: int, generator: Optional[torch.Generator]
) -> tuple[Tensor, Tensor]:
    r"""Random-sign mixtures :math:`v^\pm_n = \sum_{k: \pm s_{nk} > 0} \varepsilon_{nk} \sqrt{|s_{nk}|}
    c_{nk} / \sqrt S` of signed columns (module docstring), ``S`` independent ones.

    Args:
        columns: ``(N, D, C)`` columns with :math:`\mathbb{E}[\sum_k s_{nk} c_{nk} c_{nk}^\top] = \Lambda_n`.
        signs: ``(N, C)`` or ``(C,)`` signed weights (any real values; usually ``+-1``).
        num_sketches: ``S >= 1``.
        generator: for the Rademacher signs, or None for the global RNG.

    Returns:
        ``(mixed (N, D, C'), signs (C',))`` with ``C' = 2 S`` (``S`` when no sign is negative), so that
        :math:`\mathbb{E}[\sum_j s'_j v_{nj} v_{nj}^\top] = \mathbb{E}[\sum_k s_{nk} c_{nk} c_{nk}^\top]`.
    """
    if not isinstance(num_sketches, int) or num_sketches < 1:
        raise ValueError(f"`num_sketches` must be a positive int, got {num_sketches!r}.")
    n, d, c = columns.shape
    if c == 0:  # no curvature in any sample's loss (eq. 20 on all-equal logits: a zero-initialised head)
        return columns.new_zeros(n, d, num_sketches), columns.new_ones(num_sketches)
    signs = signs.to(columns.dtype).reshape(-1, c).expand(n, c)
    weight = signs.abs().sqrt()
    parts = [(1.0, (signs > 0).to(columns.dtype) * weight)]
    if bool((signs < 0).any()):
        parts.append((-1.0, (signs < 0).to(columns.dtype) * weight))
    eps = torch.randint(0, 2, (num_sketches, len(parts), n, c), generator=generator, device=columns.device)
    eps = eps.to(columns.dtype).mul_(2).sub_(1)
    mixed, out_signs = [], []
    for s in range(num_sketches):
        for j, (sign, mask) in enumerate(parts):
            mixed.append(torch.einsum("ndc,nc->nd", columns, eps[s, j] * mask) / math.sqrt(num_sketches))
            out_signs.append(sign)
    return torch.stack(mixed, dim=2), torch.tensor(out_signs, dtype=columns.dtype, device=columns.device)


def chunk_contraction(
    call: LayerCall, grad: Tensor, signs: Tensor, chunk_size: int, diag: dict[str, Tensor], kernel: tuple
) -> None:
    r"""Add :math:`\sum_{b, j} s_j (\sum_{n \in b} \nabla_W (v_{nj}^\top f_n))^2` for one layer call: the
    weight (and bias) gradient of each chunk of ``chunk_size`` samples and each column ``j``, squared.

    ``grad`` ``(C, N, *out)``: output gradients of the ``C`` columns; ``signs`` ``(C,)``. The layer
    rule's layout ``a (N, G, I, P)``, ``g (N, G, C O, P)`` is regrouped as ``(N/B, G, I, B P)``, so a
    chunk's gradient is one matrix product over its samples and positions: ``2 N P C O I / G`` flops
    in all (one weight gradient per column) and ``C N / B`` squares of the weight. Partial last chunk:
    zero-padded (zero samples add nothing). Rules with a contraction of their own (embedding lookups,
    offsets) are chunked through their per-sample gradients instead
    (:func:`~.layer_rules.shared.accumulate_shared`).
    """
    rule = LAYER_RULES[call.op]
    c, n = grad.shape[:2]
    m = -(-n // chunk_size)
    pad = m * chunk_size - n
    if call.bias is not None:
        gb = rule.bias_gradients(grad)  # (C, N, O)
        if pad:
            gb = torch.cat([gb, gb.new_zeros(c, pad, gb.shape[2])], dim=1)
        gb = gb.reshape(c, m, chunk_size, -1).sum(dim=2)
        diag[call.bias] += torch.einsum("c,cmo->o", signs, gb * gb)
    if call.weight is None:
        return
    a, g = rule.factors(call, grad, kernel)  # (N, G, I, P), (N, G, C * O, P)
    if pad:
        a = torch.cat([a, a.new_zeros(pad, *a.shape[1:])])
        g = torch.cat([g, g.new_zeros(pad, *g.shape[1:])])
    groups, inputs, positions = a.shape[1:]
    a = a.reshape(m, chunk_size, groups, inputs, positions).permute(0, 2, 1, 4, 3)
    a = a.reshape(m, groups, chunk_size * positions, inputs)  # (M, G, B P, I)
    g = g.reshape(m, chunk_size, groups, -1, positions).permute(0, 2, 3, 1, 4)
    g = g.reshape(m, groups, g.shape[2], chunk_size * positions)  # (M, G, C O, B P)
    outputs = g.shape[2] // c
    acc = torch.zeros(groups, c, outputs * inputs, dtype=grad.dtype, device=grad.device)
    step = max(1, CHUNK_GRADIENT_ELEMENTS // (groups * g.shape[2] * inputs))
    for start in range(0, m, step):
        gw = torch.matmul(g[start : start + step], a[start : start + step])  # (m, G, C O, I)
        acc += gw.square_().reshape(gw.shape[0], groups, c, -1).sum(dim=0)
    squares = torch.einsum("c,gcx->gx", signs, acc).reshape(groups, outputs, inputs)
    diag[call.weight] += rule.as_weight(squares, tuple(diag[call.weight].shape))


def samples_interact(
    model: nn.Module,
    inputs: ModelInputs,
    params: dict[str, nn.Parameter],
    caller: str,
    record_nodes: bool = False,
) -> list[str]:
    """The recorded layers whose outputs for samples ``1..m-1`` depend on sample 0's logits (train-mode
    BatchNorm, anything mixing the batch), on a batch of the first ``m = INTERACTION_PROBE_SAMPLES``
    samples: one recorded forward and one backward of ``m`` samples, instead of a probe column in the
    backward of the whole batch (a full column's cost). A mixing that shows only between samples beyond
    the first ``m`` is not detected (the exact method's probe, on the whole batch, misses mixing that
    does not involve sample 0 likewise). Rows along dim 0 are read as :func:`~.exact.rows_of_other_samples`
    reads them (several rows per sample: sample-major); a tensor whose dim 0 is not a multiple of ``m``
    is flagged too (its rows do not grow with the samples: a sequence-first layout). ``record_nodes``:
    the inputs of the recorded nonlinear ops (:mod:`.hessian_sketch`) are checked too, where their
    columns enter."""
    n = inputs_batch_size(inputs)
    if n < 2:
        return []
    few = select_samples(inputs, slice(0, min(n, INTERACTION_PROBE_SAMPLES)), n)
    forward = _record_forward(model, few, params, caller, record_nodes=record_nodes)
    m = forward.logits.shape[0]
    named = [(f"{c.op} in {c.module}", c.output) for c in forward.recorder.calls]
    named += [
        (f"{node.op!r} in {node.module}", t) for node in forward.recorder.nodes or [] for t in node.inputs
    ]
    named = [(label, t) for label, t in named if t.requires_grad and t.ndim > 0]
    if not named or not forward.logits.requires_grad:
        return []
    grads = torch.autograd.grad(
        forward.logits, [t for _, t in named], _interaction_probe(forward.logits), allow_unused=True
    )
    found = [
        label
        for (label, t), g in zip(named, grads)
        # rows that do not grow with the samples (a sequence-first layout, a table shared by all samples)
        # are not grouped by sample: flagged whether or not the probe reaches them
        if t.shape[0] % m != 0 or g is not None and bool(rows_of_other_samples(g, m).any())
    ]
    return list(dict.fromkeys(found))


#: Columns injected at tensors inside the graph besides the logits: ``(tensors, vectors)``, one
#: ``(C, *tensor.shape)`` stack of the ``C`` columns per tensor (the node columns of :mod:`.hessian_sketch`).
Injections = tuple[list[Tensor], list[Tensor]]


def _diagonal_by_layers(
    forward: _RecordedForward,
    columns: Tensor,
    signs: Tensor,
    chunk_size: int,
    injections: Optional[Injections] = None,
) -> dict[str, Tensor]:
    """One backward of the ``C`` columns to the recorded layer outputs, then :func:`chunk_contraction`
    per layer (``chunk_size == 1``: the per-sample contractions of :func:`~.layer_rules.accumulate_layer`,
    with their position-pair path). The samples must not interact (:func:`samples_interact`).

    The backward is the folded-batch one of :class:`~.layer_rules.column_backward.ColumnTape` where it
    covers the model (each layer contracted as soon as the pass reaches it, as in the exact method), else
    autograd's batched one, which also takes ``injections`` (columns entering at inner tensors), over groups
    of columns of at most :data:`BATCHED_COLUMN_ELEMENTS` layer-output gradient entries (at least one
    column): it returns every layer's gradient of a group at once, so its memory grows with the group."""
    calls, logits, leaves = forward.recorder.calls, forward.logits, forward.leaves
    n, c = logits.shape[0], columns.shape[2]
    vectors = columns.permute(2, 0, 1).reshape(c, *logits.shape)
    # zero-filled at the start on purpose: storing each first contribution as it is (no fill, no add)
    # was measured slower on a CIFAR ResNet-18 (page faults: the results then interleave with the
    # temporaries in the heap, which the allocator hands back to the kernel and faults in again;
    # benchmarks/results/bench_sketch_copies.md)
    diag = {name: torch.zeros_like(t) for name, t in leaves.items()}
    derived = forward.recorder.derived_weights

    def contraction(columns_signs: Tensor, leaf_columns: dict[str, Tensor]) -> SharedCalls:
        """The per-layer contractions of a group of columns with their ``(C',)`` or ``(N, C')`` signs."""
        per_sample_signs = (
            columns_signs if columns_signs.ndim == 2 else columns_signs.unsqueeze(0).expand(n, -1)
        )

        def contract_one(i: int, g: Tensor) -> None:
            call = calls[i]
            if chunk_size == 1:
                accumulate_layer(call, g, per_sample_signs, diag, leaves)
            elif type(LAYER_RULES[call.op]).accumulate is not LayerRule.accumulate:
                # a rule with its own per-sample contraction (embedding, offset): its per-sample gradients,
                # summed per chunk
                accumulate_shared([call], [g], columns_signs, diag, leaves, n, chunk_size)
            else:  # (C,) signs: the same for every sample
                kernel = tuple(leaves[call.weight].shape[2:]) if call.weight is not None else ()
                chunk_contraction(*per_sample_call(call, g, n), columns_signs, chunk_size, diag, kernel)

        def contract_group(group: list[LayerCall], grads: list[Tensor]) -> None:
            group_signs = per_sample_signs if chunk_size == 1 else columns_signs
            accumulate_shared(group, grads, group_signs, diag, leaves, n, chunk_size, leaf_columns, derived)

        return SharedCalls(calls, contract_one, contract_group, derived)

    # a weight's own columns (a tied weight's products, per sample) add to its per-sample gradients
    leaf_ids = {id(t): name for name, t in leaves.items()}
    roots, stacks, leaf_columns = [logits], [vectors], {}
    for tensor, stack in zip(*(injections or ([], []))):
        if id(tensor) in leaf_ids:
            leaf_columns[leaf_ids[id(tensor)]] = stack
        else:
            roots.append(tensor)
            stacks.append(stack)

    outputs = [call.output for call in calls]
    if len(roots) == 1:
        contract = contraction(signs, leaf_columns)
        if forward.recorder.tape.backward(logits, vectors, outputs, contract) is not None:
            contract.finish()
            return diag
    # autograd's batched backward holds every layer output's gradient for all columns of a pass at once:
    # columns in groups of about BATCHED_COLUMN_ELEMENTS such entries (each column's squares are its own)
    per_column = sum(t.numel() for t in outputs) + sum(t.numel() for t in roots)
    step = max(1, BATCHED_COLUMN_ELEMENTS // max(1, per_column))
    for start in range(0, c, step):
        part = slice(start, min(c, start + step))
        contract = contraction(signs[..., part], {name: st[part] for name, st in leaf_columns.items()})
        for i, g in enumerate(_batched_backward(roots, outputs, [st[part] for st in stacks])):
            if g is not None:
                contract(i, g)
        contract.finish()
    return diag


def _diagonal_by_chunks(
    logits: Tensor,
    columns: Tensor,
    signs: Tensor,
    leaves: dict[str, Tensor],
    chunk_size: int,
    injections: Optional[Injections] = None,
) -> dict[str, Tensor]:
    """Any graph: one backward per (chunk, column) of ``sum_{n in b} v_nj^T f_n`` to the weights,
    squared (samples may interact: the gradient is still linear in the vector). Whole-batch vectors
    (one chunk) go through a loop of plain backward passes (faster than a vmapped one on ResNet-18
    when the estimator was written; that timing is not among ``benchmarks/results``); more take
    vmapped passes of about ``_BATCHED_BACKWARD_ELEMENTS`` gradient entries. ``injections`` (tensors
    with the batch along dim 0) are masked to each chunk's samples like the logits' columns; columns
    at a weight itself (one of ``leaves``: a tied weight's, ``(C, N, *weight.shape)``, per sample) are
    summed over the chunk's samples and sent in as that weight's own gradient. ``signs``
    ``(C,)``, or ``(N, C)`` per sample with ``chunk_size=1``."""
    n, _, c = columns.shape
    m = -(-n // chunk_size)
    owner = torch.arange(n, device=logits.device) // chunk_size
    targets = list(leaves.values())
    diag = {name: torch.zeros_like(t) for name, t in leaves.items()}
    inner, stacks = injections if injections is not None else ([], [])
    numel = sum(t.numel() for t in targets) + logits.numel() + sum(t.numel() for t in inner)
    per_pass = 1 if m == 1 else max(1, _BATCHED_BACKWARD_ELEMENTS // numel)
    pairs = [(b, j) for b in range(m) for j in range(c)]

    leaf_ids = {id(t) for t in targets}

    def masked(tensor: Tensor, stack: Tensor, idx: list[tuple[int, int]]) -> Tensor:
        if id(tensor) in leaf_ids:  # per-sample columns at a weight itself (C, N, *weight): the chunk's sum
            return torch.stack([stack[j][owner == b].sum(dim=0) for b, j in idx])
        shape = (-1,) + (1,) * (stack.ndim - 2)
        return torch.stack([stack[j] * (owner == b).to(stack.dtype).reshape(shape) for b, j in idx])

    for start in range(0, len(pairs), per_pass):
        idx = pairs[start : start + per_pass]
        vectors = torch.stack(
            [columns[:, :, j] * (owner == b).to(columns.dtype).unsqueeze(1) for b, j in idx]
        ).reshape(len(idx), *logits.shape)
        roots, grad_outputs = [logits, *inner], [vectors, *(masked(t, s, idx) for t, s in zip(inner, stacks))]
        # (N, C) per-sample signs need one sample per chunk
        weights = torch.stack([signs[b, j] if signs.ndim == 2 else signs[j] for b, j in idx])
        if len(idx) == 1:
            grads: Sequence[Optional[Tensor]] = [
                None if g is None else g.unsqueeze(0)
                for g in torch.autograd.grad(
                    roots, targets, [v[0] for v in grad_outputs], retain_graph=True, allow_unused=True
                )
            ]
        else:
            grads = _batched_backward(roots, targets, grad_outputs)
        for name, g in zip(leaves, grads):
            if g is not None:
                diag[name] += torch.tensordot(weights.to(g.dtype), g * g, dims=1)  # (a model may cast)
    return diag


def _base_columns(
    loss_fn: LossFn,
    logits: Tensor,
    target: Tensor,
    num_mc_samples: int,
    generator: Optional[torch.Generator],
    max_exact_outputs: int,
) -> tuple[Tensor, Tensor, list[str]]:
    """Signed columns of ``Lambda_n``: the exact factors for ``D <= max_exact_outputs`` outputs per
    sample, else the Monte-Carlo columns (``num_mc_samples`` draws, the loss's default exact classes;
    used for losses without a
    :func:`~lightning_flatness.functional.loss_hessian_factors.loss_hessian_structure`)."""
    if logits[0].numel() <= max_exact_outputs:
        factors, signs, _, issues = _loss_factors(loss_fn, logits, target)
        return factors.to(logits.dtype), signs.to(logits.dtype), issues
    columns, signs = sample_loss_hessian_columns(
        loss_fn, logits, target, num_mc_samples, generator, exact_classes=default_exact_classes(loss_fn)
    )
    return columns.to(logits.dtype), signs.to(logits.dtype), []


def _loss_structure(
    loss_fn: LossFn, logits: Tensor, target: Tensor, num_sketches: Optional[int], max_exact_outputs: int
) -> tuple[Optional[StructuredLossHessian], int]:
    """The loss Hessian's structured exact factors above ``max_exact_outputs`` outputs per sample (None
    below, or for a loss without them), and the number of sketches (``num_sketches``, or the default:
    :data:`DEFAULT_STRUCTURED_SKETCHES` with a structure, else :data:`DEFAULT_NUM_SKETCHES`)."""
    structure = (
        loss_hessian_structure(loss_fn, logits, target) if logits[0].numel() > max_exact_outputs else None
    )
    if num_sketches is None:
        num_sketches = (
            DEFAULT_STRUCTURED_SKETCHES.get(hessian_twin(loss_fn), DEFAULT_NUM_SKETCHES)
            if structure is not None
            else DEFAULT_NUM_SKETCHES
        )
    return structure, num_sketches


def _mixed_base_columns(
    loss_fn: LossFn,
    logits: Tensor,
    target: Tensor,
    num_mc_samples: Optional[int],
    generator: Optional[torch.Generator],
    max_exact_outputs: int,
    num_sketches: int,
) -> tuple[Tensor, Tensor, list[str]]:
    """:func:`_base_columns` (``num_mc_samples`` None: the loss's default) mixed by :func:`sketch_columns`:
    ``(columns (N, D, C), signs (C,), the loss's issues with the per-sample-mean assumption)``. A
    :class:`TokenLoss`'s Monte-Carlo columns are mixed token chunk by token chunk
    (:func:`~lightning_flatness.functional.loss_hessian_factors.token_loss_columns`): the base columns of
    all tokens (an LM vocabulary each) are never held at once."""
    draws = default_mc_samples(loss_fn) if num_mc_samples is None else num_mc_samples
    if isinstance(loss_fn, TokenLoss) and logits[0].numel() > max_exact_outputs:
        mixed, mixed_signs = token_loss_columns(
            loss_fn,
            logits,
            target,
            draws,
            generator,
            exact_classes=default_exact_classes(loss_fn),
            num_sketches=num_sketches,
        )
        return mixed.to(logits.dtype), mixed_signs.to(logits.dtype), []
    columns, signs, issues = _base_columns(loss_fn, logits, target, draws, generator, max_exact_outputs)
    mixed, mixed_signs = sketch_columns(columns, signs, num_sketches, generator)
    return mixed, mixed_signs, issues


def gauss_newton_sketch_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: ModelInputs,
    target: Tensor,
    params: dict[str, nn.Parameter],
    *,
    num_mc_samples: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    chunk_size: Optional[int] = None,
    num_sketches: Optional[int] = None,
    max_exact_outputs: int = MAX_EXACT_FACTOR_OUTPUTS,
) -> dict[str, Tensor]:
    r"""Unbiased sketched estimate of the Gauss-Newton diagonal ``diag(J^T Lambda J) / N`` (module
    docstring: the estimator, its variance and cost).

    Args:
        model: the network, used in its current mode and never modified.
        loss_fn: ``(logits, target) -> scalar``, a mean of per-sample losses.
        inputs: a tensor, tuple or dict with the samples along dim 0 (:func:`~..model_io.call_model`).
        target: what ``loss_fn`` takes.
        params: ``{name: parameter}`` of ``model`` (:func:`select_parameters`).
        num_mc_samples: draws of the Monte-Carlo base columns when ``D > max_exact_outputs`` and the
            loss has no structured form (cross-entropy and eq. 20 have one and draw nothing; None: the
            loss's default; they are mixed into the same 1-2 columns, so more draws cost
            no backward pass, only ``O(N K)`` per draw).
        generator: for the Rademacher signs and draws, or None for the global RNG.
        chunk_size: samples per sign-mixed chunk ``B`` (None: :data:`DEFAULT_CHUNK_SIZE`).
        num_sketches: independent mixtures ``S`` (None: :data:`DEFAULT_NUM_SKETCHES`, or above
            ``max_exact_outputs`` the loss's entry in :data:`DEFAULT_STRUCTURED_SKETCHES`).
        max_exact_outputs: up to this many outputs per sample ``Lambda_n`` is factorised exactly.

    Returns:
        ``{name: diag}`` with each parameter's shape and dtype (entries may be negative when ``Lambda``
        is indefinite, as for eq. 20).

    Raises:
        ValueError: no parameters, bad ``chunk_size``/``num_sketches``, a non-finite output.
        ExactMethodNotApplicable: (``gauss_newton_applicable=False``) the loss is not a per-sample mean or
            the model draws random numbers.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 1000))
        >>> x, y = torch.randn(16, 3), torch.randint(0, 1000, (16,))
        >>> gen = torch.Generator().manual_seed(0)
        >>> est = gauss_newton_sketch_diagonal(
        ...     model, F.cross_entropy, x, y, {"0.weight": model[0].weight}, generator=gen, chunk_size=4
        ... )
        >>> est["0.weight"].shape  # one backward column, 4 squares of the weight
        torch.Size([5, 3])
    """
    caller = "gauss_newton_sketch_diagonal"
    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive int (samples per chunk), got {chunk_size!r}.")
    if not params:
        raise ValueError(f"{caller} got no parameters; pass the weights to differentiate.")
    with torch.inference_mode(False), torch.enable_grad():
        x, y = _autograd_inputs(inputs, target)
        forward = _record_forward(model, x, params, caller)
        logits = forward.logits.detach()
        structure, num_sketches = _loss_structure(loss_fn, logits, y, num_sketches, max_exact_outputs)
        if structure is not None:  # the exact factors, mixed in O(N K): no class sampling
            refuse_unless_gauss_newton_applies(caller, [], forward.recorder.random_ops)
            mixed, mixed_signs = structure.sketch(num_sketches, generator)
            mixed, mixed_signs = mixed.to(logits.dtype), mixed_signs.to(logits.dtype)
        else:
            mixed, mixed_signs, loss_issues = _mixed_base_columns(
                loss_fn, logits, y, num_mc_samples, generator, max_exact_outputs, num_sketches
            )
            refuse_unless_gauss_newton_applies(caller, loss_issues, forward.recorder.random_ops)
        mixed = mixed.div_(math.sqrt(logits.shape[0]))  # the loss is a mean over samples (fresh columns)
        blockers = _fast_path_blockers(forward.recorder, forward.leaves, logits.shape[0])
        if any("invisible" in issue for issue in forward.issues):
            blockers.append("an operation invisible to the checks")
        if chunk_size >= logits.shape[0]:  # one chunk: ordinary weight gradients, any graph
            return _finish(
                _diagonal_by_chunks(forward.logits, mixed, mixed_signs, forward.leaves, logits.shape[0]),
                params,
            )
        if not blockers and not forward.recorder.samples_apart:
            # the probe only where the recorded operations do not prove the samples apart
            # (:func:`~.exact._keeps_samples_apart`: Linear, Conv, pooling, eval BatchNorm, elementwise)
            blockers = [
                f"samples interact (or rows along dim 0 are not grouped by sample) after {layer}"
                for layer in samples_interact(model, x, params, caller)
            ]
        if not blockers:
            diag = _diagonal_by_layers(forward, mixed, mixed_signs, chunk_size)
        else:
            chunks = -(-logits.shape[0] // chunk_size)
            warnings.warn(
                f"{caller}: per-layer contractions do not apply ({'; '.join(blockers[:3])}); computing "
                f"the diagonal with {chunks} x {mixed.shape[2]} backward passes (chunks x columns).",
                UserWarning,
                stacklevel=2,
            )
            diag = _diagonal_by_chunks(forward.logits, mixed, mixed_signs, forward.leaves, chunk_size)
    return _finish(diag, params)


def _finish(diag: dict[str, Tensor], params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    return {name: d.detach().to(params[name].dtype) for name, d in diag.items()}
