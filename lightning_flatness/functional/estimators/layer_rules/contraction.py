r"""The per-layer contraction shared by every layer rule:
``sum_{n,k} sign_nk (per-sample gradient of v_nk^T f_n)^2`` from one recorded call.

With the rule's layout, input ``a`` ``(N, G, I, P)`` and output gradients ``g`` ``(N, G, K * O, P)``
of ``K`` backward columns, the per-sample weight gradient of column ``k`` is ``sum_p g_nkp a_np^T``.
Three evaluations, chosen by cost:

- one position per sample (``Linear`` on ``(N, I)``): ``(g a^T)^2 = g^2 (a^2)^T``, so the columns
  are summed first and contracted in one matrix product;
- a rule's own kernel where it has one (:meth:`~.base.LayerRule.squared_gradients`: convolutions
  with few input channels, :func:`~.conv.grouped_squared_gradients`; or a block of entries,
  :meth:`~.base.LayerRule.squared_gradient_block`: convolutions with kernel taps that read only
  padding, :func:`~.conv.cropped_squared_gradient_block`, which contracts the live taps by
  :func:`factor_contraction`, added into the diagonal in place);
- few positions: position pairs (:func:`position_pair_contraction`), no per-sample gradients;
- else per-sample gradients in chunks of about ``CHUNK_ELEMENTS`` entries: sample by sample from the output
  gradients as they lie for a rule that gives them so and large output gradients (Linear on many positions,
  an LM head: :func:`~.base.samplewise_gradients`), else one product over the rule's factors.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_flatness.functional.estimators.layer_rules.base import (
    LAYER_RULES,
    LayerCall,
    LayerRule,
    samplewise_gradients,
    uses_samplewise_gradients,
)

__all__ = [
    "CHUNK_ELEMENTS",
    "SQUARE_COST",
    "accumulate_layer",
    "factor_contraction",
    "pair_products",
    "per_sample_call",
    "position_pair_contraction",
    "use_position_pairs",
]

CHUNK_ELEMENTS = 2**18  # bound on per-sample-gradient elements materialised at once (cache-sized)
SQUARE_COST = 8  # flops-equivalent of squaring and summing one per-sample-gradient entry (memory-bound)


def accumulate_layer(
    call: LayerCall,
    grad: Tensor,
    signs: Tensor,
    diag: dict[str, Tensor],
    leaves: dict[str, Tensor],
    unit_signs: Optional[bool] = None,
) -> None:
    """Add ``sum_{n,k} sign_nk * (per-sample gradient of v_nk^T f_n)^2`` for one layer call, from the
    output gradients ``grad`` ``(K, N, *out)`` of all ``K`` columns and the signs ``(N, K)``, to
    ``diag[name]`` (set when ``name`` is not in ``diag`` yet: no zero-filled start needed).

    ``unit_signs``: whether every sign is ``+1`` (cross-entropy), so that the weighting is skipped;
    ``None`` checks ``signs``. A call with several rows per sample along dim 0 is first viewed per sample
    (:func:`per_sample_call`). The signs take the gradients' dtype: they come in the logits' (a model may cast
    its logits to float32 while its layers run in float64)."""
    call, grad = per_sample_call(call, grad, signs.shape[0])
    signs = signs.to(grad.dtype)
    rule = LAYER_RULES[call.op]
    if rule.accumulate(call, grad, signs, diag, leaves):
        return
    if unit_signs is None:
        unit_signs = bool((signs == 1).all())
    if rule.single_position(call):
        # one position per sample: (g_n a_n^T)^2 = g_n^2 (a_n^2)^T, so the columns are summed first,
        # S_n = sum_k sign_nk g_nk^2, and contracted once
        s = (
            torch.linalg.vecdot(grad, grad, dim=0)
            if unit_signs
            else torch.einsum("nk,kno->no", signs, grad * grad)
        )
        if call.weight is not None:
            squares = s.T @ (call.inputs * call.inputs)  # (O, I)
            _add(diag, call.weight, rule.as_weight(squares.unsqueeze(0), tuple(leaves[call.weight].shape)))
        if call.bias is not None:
            _add(diag, call.bias, s.sum(dim=0))
        return
    if call.bias is not None:
        gb = rule.bias_gradients(grad)  # (K, N, out) per-sample bias gradients
        gb = gb * gb
        _add(diag, call.bias, gb.sum(dim=(0, 1)) if unit_signs else torch.einsum("nk,kno->o", signs, gb))
    if call.weight is None:
        return
    weight = leaves[call.weight]
    kernel = tuple(weight.shape[2:])
    direct = rule.squared_gradients(call, grad, signs, kernel)
    if direct is not None:
        _add(diag, call.weight, rule.as_weight(direct, tuple(weight.shape)))
        return
    block = rule.squared_gradient_block(call, grad, signs, kernel)
    if block is not None:
        part, index = block
        if call.weight not in diag:
            diag[call.weight] = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        target = diag[call.weight]
        if target.is_contiguous():  # the block is added where it lies, the rest untouched
            target.view(*part.shape[:3], *kernel)[index] += part
        else:
            full = part.new_zeros(*part.shape[:3], *kernel)
            full[index] = part
            target += full.reshape(weight.shape)
        return
    _add(diag, call.weight, rule.as_weight(factor_contraction(rule, call, grad, signs, kernel), weight.shape))


def per_sample_call(call: LayerCall, grad: Tensor, n: int) -> tuple[LayerCall, Tensor]:
    """``(call, grad)`` with the ``n`` samples along dim 0: as they are, or by the rule's
    :meth:`~.base.LayerRule.regroup` when dim 0 holds several rows per sample."""
    if call.inputs.shape[0] == n:
        return call, grad
    regrouped = LAYER_RULES[call.op].regroup(call, grad, n)
    if regrouped is None:
        raise ValueError(f"{call.op} in {call.module}: dim 0 of its input is not the batch of {n} samples")
    return regrouped


def factor_contraction(
    rule: LayerRule, call: LayerCall, grad: Tensor, signs: Tensor, kernel: tuple[int, ...]
) -> Tensor:
    """``sum_{n,k} sign_nk (sum_p g_nkp a_np^T)^2`` as ``(G, O, I)`` from the rule's factors
    (:meth:`~.base.LayerRule.factors`): position pairs (:func:`position_pair_contraction`) when
    :func:`use_position_pairs` says they are cheaper, else per-sample gradients in chunks of about
    ``CHUNK_ELEMENTS`` entries (``O(N K P O I)`` flops in batched matrix products, then squared and
    summed with the signs; sample by sample where :func:`~.base.uses_samplewise_gradients` says so).
    ``grad`` ``(K, N, *out)``, ``signs`` ``(N, K)``."""
    k = grad.shape[0]
    direct = rule.positionwise_factors(call, grad)  # (N, P, I), (K, N, P, O)
    if direct is not None and uses_samplewise_gradients(direct[1]):
        if not use_position_pairs(direct[0].shape[1], direct[0].shape[2], k):
            return _samplewise_contraction(*direct, signs)
    a, g = rule.factors(call, grad, kernel)  # (N, G, I, P), (N, G, K * O, P)
    if use_position_pairs(a.shape[3], a.shape[2], k):
        return position_pair_contraction(a, g, signs, k)
    chunk = max(1, CHUNK_ELEMENTS // (g.shape[1] * g.shape[2] * a.shape[2]))
    acc = torch.zeros(g.shape[1], g.shape[2] // k, a.shape[2], dtype=grad.dtype, device=grad.device)
    for start in range(0, a.shape[0], chunk):
        sl = slice(start, start + chunk)
        gw = torch.matmul(g[sl], a[sl].transpose(-1, -2))  # (n, G, K * O, I) per-sample gradients
        m, groups = gw.shape[:2]
        gw = gw.square_().reshape(m, groups, k, -1)  # squares, (n, G, K, O * I)
        if groups == 1:  # sum over (n, k) weighted by the signs: one matrix-vector product, added in place
            acc.view(1, -1).addmm_(signs[sl].reshape(1, -1), gw.reshape(m * k, -1))
        else:
            acc += gw.mul_(signs[sl].reshape(m, 1, k, 1)).sum(dim=(0, 2)).reshape(acc.shape)
    return acc


def _samplewise_contraction(a: Tensor, g: Tensor, signs: Tensor) -> Tensor:
    """:func:`factor_contraction`'s per-sample gradients taken sample by sample from the output gradients
    as they lie (:func:`~.base.samplewise_gradients`), ``(1, O, I)``."""
    k, n, _, o = g.shape
    chunk = max(1, CHUNK_ELEMENTS // (k * o * a.shape[2]))
    acc = torch.zeros(1, o, a.shape[2], dtype=g.dtype, device=g.device)
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        gw = samplewise_gradients(a, g, sl).square_()  # (m, K, O, I)
        acc.view(1, -1).addmm_(signs[sl].reshape(1, -1), gw.reshape(gw.shape[0] * k, -1))
    return acc


def _add(diag: dict[str, Tensor], name: str, value: Tensor) -> None:
    """``diag[name] += value``, or ``diag[name] = value`` for the first contribution."""
    if name in diag:
        diag[name] += value
    else:
        diag[name] = value


def use_position_pairs(positions: int, inputs: int, k: int) -> bool:
    """Whether :func:`position_pair_contraction` is cheaper than per-sample gradients for a layer with
    ``positions`` positions per sample, ``inputs`` inputs per group and ``k`` backward columns.

    Pairs replace ``K P`` products per sample by ``Z = P (P + 1) / 2`` pair products (the flop test
    ``Z <= K (P + SQUARE_COST)``), but they materialise ``Z`` products of every input and output entry,
    memory-bound work that costs about ``SQUARE_COST`` flops each: unless ``SQUARE_COST * Z <= I`` (few
    pairs per input entry, i.e. small feature maps and wide layers) that traffic outweighs the
    per-sample gradients. Pairs win on the late stages of a CIFAR-size ResNet-18 (few positions, wide
    inputs) and lose on long 1-D feature maps with few channels; this rule picks the faster path on
    both (measured: ``benchmarks/RESULTS.md``, "A regression found and fixed").
    """
    pairs = positions * (positions + 1) // 2
    return pairs <= k * (positions + SQUARE_COST) and pairs * SQUARE_COST <= inputs


def position_pair_contraction(a: Tensor, g: Tensor, signs: Tensor, k: int) -> Tensor:
    r"""``sum_{n,k} sign_nk (sum_p g_nkp a_np^T)^2`` as ``(G, O, I)`` without per-sample gradients.

    Squaring the sum over the ``P`` positions, ``(sum_p g_p a_p^T)^2 = sum_{p,q} (g_p g_q)(a_p a_q)^T``
    (entrywise products), so with the ``Z = P (P + 1) / 2`` position pairs ``p <= q`` (off-diagonal ones
    counted twice) the whole sum is one matrix product over ``(n, pair)``:
    ``sum_{n,z} [sum_k sign_nk g_nkz] a_nz^T``, ``O(N Z O I)`` flops in BLAS, independent of ``K``.
    Chosen over per-sample gradients (``O(N K P O I)`` flops plus ``N K O I`` squares, memory-bound)
    when ``Z <= K (P + SQUARE_COST)``: small feature maps (late ResNet stages, ``P = 1`` for
    1x1 maps) and many columns. Samples in chunks of about ``CHUNK_ELEMENTS`` pair products.
    The pair products are built position-major (:func:`pair_products`), so that the input's
    ``(n, Z, I)`` block is the matrix product's operand as it is (no gather, no transposed copy).
    """
    n, groups, inputs, p = a.shape
    o = g.shape[2] // k
    z = p * (p + 1) // 2
    first, second = torch.triu_indices(p, p)
    weight = torch.where(first == second, 1.0, 2.0).to(device=a.device, dtype=a.dtype)
    at = a.transpose(-1, -2).contiguous()  # (N, G, P, I); a no-op for the rules' position-major inputs
    gt = g.transpose(-1, -2).contiguous()  # (N, G, P, K * O)
    acc = torch.zeros(groups, o, inputs, dtype=g.dtype, device=g.device)
    chunk = max(1, CHUNK_ELEMENTS * 16 // (groups * (inputs + k * o) * z))
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        aa = pair_products(at[sl])  # (n, G, Z, I)
        gg = pair_products(gt[sl]).reshape(-1, groups, z, k, o)  # (n, G, Z, K, O)
        m = aa.shape[0]
        w = torch.einsum("nk,ngzko->gonz", signs[sl], gg).mul_(weight).reshape(groups, o, m * z)
        acc += torch.bmm(w, aa.transpose(0, 1).reshape(groups, m * z, inputs))
    return acc


def pair_products(x: Tensor) -> Tensor:
    """``x`` ``(..., P, F)`` -> ``(..., Z, F)``: the entrywise products ``x_p * x_q`` of the
    ``Z = P (P + 1) / 2`` position pairs ``p <= q``, in the order of ``torch.triu_indices(P, P)``.

    ``P`` broadcast products of contiguous rows (``x_p`` times the rows ``p..P-1``) written in place:
    ``Z F`` multiplications, several times faster than gathering the pairs along a last dim of
    size ``P`` (measured on ResNet-18: ``benchmarks/results/bench_contraction_speed.md``)."""
    p = x.shape[-2]
    out = x.new_empty(*x.shape[:-2], p * (p + 1) // 2, x.shape[-1])
    row = 0
    for i in range(p):
        torch.mul(x[..., i : i + 1, :], x[..., i:, :], out=out[..., row : row + p - i, :])
        row += p - i
    return out
