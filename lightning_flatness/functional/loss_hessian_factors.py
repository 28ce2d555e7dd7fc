r"""Signed columns whose outer products give the Hessian of a loss in the logits, exactly or in
expectation: the ``Lambda_n`` of the generalized Gauss-Newton matrix ``J^T Lambda J``.

For a mean loss ``L = (1/N) sum_n l_n(f_n)`` every estimator of the Gauss-Newton diagonal needs, per
sample, columns ``c_nk`` and signs ``s_k`` with

.. math:: \mathbb{E}\Big[\sum_k s_k\, c_{nk} c_{nk}^\top\Big] = \Lambda_n = \nabla^2_{f} \ell_n(f_n).

Then ``sum_k s_k (J_n^T c_nk)^2`` is an unbiased estimate of ``diag(J_n^T Lambda_n J_n)`` at the cost
of one backward column per ``k`` (:mod:`~lightning_flatness.functional.estimators.gauss_newton_mc`).
The signs are per column *slot*, the same for every sample, so that token columns can be stacked into
one sequence column (:func:`token_loss_columns`).

One function per loss, registered in :data:`MC_LOSS_COLUMNS` (keyed by the loss function; a loss with
the same logit Hessian as a registered one is looked up as that one,
:func:`~lightning_flatness.functional.loss_forms.hessian_twin`: label smoothing), with the
autograd fallback :func:`autograd_columns` for any other per-sample-mean loss:

- :func:`cross_entropy_columns` (``F.cross_entropy``): ``Lambda = diag(p) - p p^T
  = sum_c p_c (e_c - p)(e_c - p)^T = Cov[p - e_y]``, ``y ~ p``; one column per draw, ``K``-independent.
- :func:`normalized_cross_entropy_columns` (eq. 20, :func:`normalized_softmax_cross_entropy`): the
  decomposition of :func:`normalized_cross_entropy_logit_hessian`; two columns per draw (one
  ``+``, one ``-``), ``K``-independent.
- :func:`elementwise_columns` (``F.mse_loss``, ``F.binary_cross_entropy_with_logits``: means over output
  entries, ``Lambda_n = diag(d_n)`` known exactly): Rademacher columns ``sqrt(d_n) o xi``, for outputs of
  any shape, ``D``-independent.
- :func:`autograd_columns` (anything else): per-sample ``Lambda_n`` by double backward and an
  eigendecomposition, two columns per draw; cost ``O(D)`` backward passes through the loss and
  ``O(D^3)`` per sample (``D`` outputs per sample): it grows with ``K``.
- :func:`token_loss_columns` (:class:`TokenLoss` wrapping any of these): the base columns per valid
  token, stacked per sequence with independent random signs; for the sketched estimators, their
  random-sign mixtures, formed directly where :data:`MC_LOSS_SKETCHES` has the loss
  (:func:`normalized_cross_entropy_sketch`, eq. 20).

Targets of the softmax losses: class indices, or ``(N, K)`` class probabilities whose rows sum to 1
(mixup, cutmix: :func:`is_probability_target`); every closed form below holds for them with ``e_y``
replaced by the target's row (``Lambda`` of cross-entropy does not depend on it at all).

Exact structured forms (:class:`StructuredLossHessian`, :data:`LOSS_HESSIAN_STRUCTURES`): for
cross-entropy and eq. 20, ``Lambda_n`` is a diagonal core behind a rank-one correction plus at most 4
signed columns, ``O(K)`` numbers per sample, exact at any ``K``; for the elementwise losses (MSE, binary
cross-entropy with logits) a diagonal; the sketched Gauss-Newton estimator mixes
them with random signs instead of sampling classes (:func:`loss_hessian_structure`; measured in
``benchmarks/results/bench_resnet18_1000.md``).

Variance reduction for the softmax losses: ``exact_classes = m`` takes the ``m`` most probable classes
of each sample exactly (``m`` more columns) and samples only the tail; :data:`DEFAULT_EXACT_CLASSES`
holds the measured defaults (2 for cross-entropy, 0 for eq. 20, where it does not help).

For eq. 20 the rank-2 part of the logit Hessian is taken as two exact columns by default
(:data:`EXACT_LOW_RANK`) and 8 draws are made per sample (:data:`DEFAULT_MC_SAMPLES`): on trained
10-class networks merging it into the draws made no difference, but with many classes at
initialisation the exact part removes much of the noise (measurements: ``benchmarks/RESULTS.md``,
"Sampling eq. 20's logit Hessian" and ``benchmarks/results/bench_gauss_newton_mc.md``).
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_flatness.functional.loss_forms import hessian_twin
from lightning_flatness.functional.losses import normalized_softmax_cross_entropy
from lightning_flatness.functional.model_io import TokenLoss

__all__ = [
    "DEFAULT_EXACT_CLASSES",
    "LOSS_HESSIAN_STRUCTURES",
    "ELEMENTWISE_LOSSES",
    "StructuredLossHessian",
    "binary_cross_entropy_structure",
    "elementwise_columns",
    "is_probability_target",
    "target_probabilities",
    "has_loss_hessian_structure",
    "mean_squared_error_structure",
    "loss_hessian_structure",
    "normalized_cross_entropy_structure",
    "softmax_cross_entropy_structure",
    "DEFAULT_MC_SAMPLES",
    "MC_LOSS_COLUMNS",
    "MC_LOSS_SKETCHES",
    "autograd_columns",
    "cross_entropy_columns",
    "default_exact_classes",
    "default_mc_samples",
    "normalized_cross_entropy_columns",
    "normalized_cross_entropy_logit_hessian",
    "normalized_cross_entropy_sketch",
    "sample_loss_hessian_columns",
    "TOKEN_CHUNK_ELEMENTS",
    "TOKEN_SKETCH_CHUNK_ELEMENTS",
    "token_loss_columns",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
Columns = tuple[Tensor, Tensor]  # (N, D, C) columns and (C,) signs


def _rademacher(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    return (
        torch.randint(0, 2, shape, generator=generator, device=like.device, dtype=like.dtype).mul_(2).sub_(1)
    )


_BIT_MASKS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
#: The bytes of an int64 word below its top one (bits 0-55), in memory order.
_LOW_BYTES = slice(0, 7) if sys.byteorder == "little" else slice(1, 8)


def _random_bytes(count: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``count`` independent uniform bytes (``uint8``): 7 from each word of ``torch.randint(0, 2**62)``
    (exactly uniform in its low 62 bits), where ``torch.randint`` draws a word per entry. For the long random
    columns of language-model vocabularies."""
    words = -(-count // 7)
    raw = torch.randint(0, 1 << 62, (words,), generator=generator, device=device, dtype=torch.int64)
    return raw.view(torch.uint8).view(words, 8)[:, _LOW_BYTES].reshape(-1)[:count]


def _random_bits(count: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``count`` independent fair bits, as a ``bool`` tensor: the 8 bits of each of :func:`_random_bytes`."""
    low = _random_bytes(-(-count // 8), generator, device)
    return torch.bitwise_and(low.unsqueeze(1), _BIT_MASKS.to(device)).bool().reshape(-1)[:count]


def _binomial_counts(
    count: int, trials: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """``count`` independent draws of ``Binomial(trials, 1/2)`` (``int16``): the set bits among ``trials``
    random bits each, counted a byte at a time (a population count of :func:`_random_bytes`)."""
    total = torch.zeros(count, dtype=torch.int16, device=device)
    for start in range(0, trials, 8):
        x = _random_bytes(count, generator, device)
        if trials - start < 8:
            x = x.bitwise_and_((1 << (trials - start)) - 1)
        x = x - ((x >> 1) & 0x55)  # population count of each byte, two bits, four, eight at a time
        x = (x & 0x33) + ((x >> 2) & 0x33)
        total += (x + (x >> 4)) & 0x0F
    return total


#: Up to this many classes, class draws use ``torch.multinomial`` (:func:`_draw_classes`).
MULTINOMIAL_MAX_CLASSES = 1024


def _draw_classes(weights: Tensor, draws: int, generator: torch.Generator | None) -> Tensor:
    """``(N, draws)`` class indices drawn with replacement with probabilities proportional to the rows of
    ``weights`` ``(N, K)`` (non-negative; a row of zeros gets zero-weight columns, whatever its class).

    Up to :data:`MULTINOMIAL_MAX_CLASSES` classes ``torch.multinomial``, the sampler of BackPACK's
    ``DiagGGNMC`` (the same seed gives the same draws, so the two estimators are compared value for value);
    above, the inverse of each row's cumulative sum at uniform points, ``O(K + draws log K)`` per row,
    the same distribution at a fraction of the cost on language-model vocabularies
    (``benchmarks/RESULTS.md``, round 13)."""
    if weights.shape[1] <= MULTINOMIAL_MAX_CLASSES:
        mass = weights.sum(dim=1, keepdim=True)
        if not bool((mass > 0).all()):  # multinomial needs a positive row
            weights = torch.where(mass > 0, weights, torch.ones_like(weights))
        return torch.multinomial(weights, draws, replacement=True, generator=generator)
    cumulative = weights.cumsum(dim=1, dtype=torch.float64)  # float64 whatever the weights' dtype:
    points = torch.rand(  # a float32 sum over a vocabulary drifts by about a class's width
        weights.shape[0], draws, generator=generator, device=weights.device, dtype=torch.float64
    ).mul_(cumulative[:, -1:])
    return torch.searchsorted(cumulative, points, right=True).clamp_max_(weights.shape[1] - 1)


def _check_draws(num_mc_samples: int) -> None:
    if not isinstance(num_mc_samples, int) or isinstance(num_mc_samples, bool) or num_mc_samples < 1:
        raise ValueError(f"`num_mc_samples` must be a positive int, got {num_mc_samples!r}.")


def is_probability_target(logits: Tensor, target: Tensor) -> bool:
    """Whether ``target`` is ``(N, K)`` class probabilities for ``(N, K)`` logits (mixup, cutmix): floating,
    non-negative, each row summing to 1 within ``1e-4``. The softmax losses' closed forms hold for them
    with ``e_y`` replaced by the row; rows that do not sum to 1 would scale the loss Hessian."""
    if logits.ndim != 2 or not isinstance(target, Tensor) or target.shape != logits.shape:
        return False
    if not target.is_floating_point() or target.numel() == 0:
        return False
    return bool((target >= 0).all() and ((target.sum(dim=1) - 1).abs() <= 1e-4).all())


def target_probabilities(target: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    """``(N, K)``: the one-hot rows of class indices, or probability targets as they are (``dtype``)."""
    if target.is_floating_point():
        return target.to(dtype)
    return F.one_hot(target.long(), k).to(dtype)


def _check_class_targets(logits: Tensor, target: Tensor, caller: str) -> None:
    if is_probability_target(logits, target):
        return
    if (
        logits.ndim != 2
        or target.ndim != 1
        or target.shape[0] != logits.shape[0]
        or target.is_floating_point()
    ):
        raise ValueError(
            f"{caller} needs (N, K) logits and (N,) integer class targets or (N, K) class probabilities "
            f"(rows summing to 1), got {tuple(logits.shape)} and {tuple(target.shape)} ({target.dtype}); "
            "wrap sequence losses in TokenLoss."
        )
    outside = (target < 0) | (target >= logits.shape[1])
    if target.numel() and bool(outside.any()):
        value = int(target[outside][0])
        raise ValueError(
            f"{caller}: class targets must lie in [0, {logits.shape[1]}), got {value}. Positions to leave "
            f"out need a TokenLoss that drops them, TokenLoss(loss, ignore_index={value}) (class_dim=1 for "
            f"(N, K, H, W) outputs), or a loss that names them, nn.CrossEntropyLoss(ignore_index={value})."
        )


def _softmax_draws(
    p: Tensor, num_mc_samples: int, exact_classes: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    r"""The classes ``c`` and weights ``w`` of :func:`_softmax_hessian_columns`' columns ``w (e_c - p)``:
    ``(N, m + num_mc_samples)`` each, the ``m = exact_classes`` most probable classes first (weight
    ``sqrt(p_c)``), then the draws from the tail (weight ``sqrt(q / num_mc_samples)``, ``q`` the tail's
    mass)."""
    n, k = p.shape
    m = min(int(exact_classes), k)
    classes = torch.empty(n, m + num_mc_samples, dtype=torch.long, device=p.device)  # (N, C) the e_c
    weights = p.new_empty(n, m + num_mc_samples)  # (N, C) the column scales
    tail = p
    if m:
        top = p.topk(m, dim=1).indices  # (N, m)
        classes[:, :m] = top
        weights[:, :m] = p.gather(1, top).sqrt()
        tail = p.scatter(1, top, 0.0)
    mass = tail.sum(dim=1, keepdim=True)  # (N, 1); a row without tail gets zero-weight draws
    classes[:, m:] = _draw_classes(tail, num_mc_samples, generator)
    weights[:, m:] = (mass / num_mc_samples).sqrt()
    return classes, weights


def _softmax_hessian_columns(
    p: Tensor, num_mc_samples: int, exact_classes: int, generator: torch.Generator | None
) -> Tensor:
    r"""Columns ``(N, K, m + num_mc_samples)``, all of sign ``+``, with
    ``E[sum_k c_k c_k^T] = diag(p) - p p^T`` (float64 ``p``).

    ``diag(p) - p p^T = sum_c p_c (e_c - p)(e_c - p)^T``. The ``m = exact_classes`` most probable
    classes enter exactly (``sqrt(p_c) (e_c - p)``); the tail of mass ``q`` is sampled: each of the
    ``num_mc_samples`` draws ``c ~ p`` restricted to the tail gives ``sqrt(q / num_mc_samples)(e_c - p)``
    (unbiased: ``E = sum_{c in tail} p_c (e_c - p)(e_c - p)^T``). ``m = 0``: plain ``y ~ p``
    (:func:`_softmax_draws`).
    """
    classes, weights = _softmax_draws(p, num_mc_samples, exact_classes, generator)
    # w (e_c - p), written once: -w p, then + w at class c (no one-hot tensors, no concatenation; an
    # LM vocabulary makes every column a dense (N, K) block)
    cols = torch.mul(p.unsqueeze(1), weights.unsqueeze(2).neg())  # (N, C, K)
    cols.scatter_add_(2, classes.unsqueeze(2), weights.unsqueeze(2))
    return cols.transpose(1, 2)  # (N, K, C)


def cross_entropy_columns(
    logits: Tensor,
    target: Tensor,
    num_mc_samples: int = 1,
    generator: torch.Generator | None = None,
    *,
    exact_classes: int = 0,
    draws_only: bool = False,
) -> Columns:
    r"""Monte-Carlo columns for ``F.cross_entropy`` (defaults: mean reduction, no weights, no smoothing).

    ``Lambda_n = diag(p_n) - p_n p_n^T = Cov_{y ~ p_n}[p_n - e_y]`` (the Fisher of the softmax), so
    ``c = p_n - e_y`` with ``y`` drawn from the model's own softmax satisfies ``E[c c^T] = Lambda_n``
    (``E[c] = 0``). See :func:`_softmax_hessian_columns` for ``exact_classes`` (variance reduction).

    Args:
        logits: ``(N, K)``.
        target: ``(N,)`` class indices (not used: ``Lambda`` does not depend on the label).
        num_mc_samples: draws per sample (columns scaled by ``1/sqrt(num_mc_samples)``).
        generator: ``torch.Generator`` on the logits' device, or None for the global RNG.
        exact_classes: the most probable classes taken exactly (one column each).
        draws_only: leave the exact columns out (the draws still sample the tail only).

    Returns:
        ``(columns (N, K, exact_classes + num_mc_samples), signs (C,) all +1)``, float64.

    Cost: ``O(N K (exact_classes + num_mc_samples))``; no backward pass.
    """
    _check_draws(num_mc_samples)
    _check_class_targets(logits, target, "cross_entropy_columns")
    p = torch.softmax(logits.detach().to(torch.float64), dim=1)
    cols = _softmax_hessian_columns(p, num_mc_samples, exact_classes, generator)
    if draws_only:
        cols = cols[:, :, cols.shape[2] - num_mc_samples :]
    return cols, torch.ones(cols.shape[2], dtype=torch.float64, device=logits.device)


def _normalization(logits: Tensor, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    """``u`` (normalized logits), ``s`` (population std, ``(N, 1)``) and the non-degenerate rows ``(N,)``
    in ``dtype`` (float64 by default), as :func:`normalize_logits` computes them."""
    z = logits.detach().to(dtype)
    c = z - z.mean(dim=1, keepdim=True)
    s = c.pow(2).mean(dim=1, keepdim=True).sqrt()
    scale = logits.detach().abs().amax(dim=1, keepdim=True).to(dtype)
    eps = torch.finfo(logits.dtype)
    ok = (s > 16 * eps.eps * scale + eps.tiny).squeeze(1)
    if bool(ok.all()):
        return c.div_(s), s, ok
    s = torch.where(ok.unsqueeze(1), s, torch.ones_like(s))
    u = torch.where(ok.unsqueeze(1), c / s, torch.zeros_like(c))
    return u, s, ok


def _normalization_jacobian_apply(u: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """``J_g v`` for ``v`` ``(N, K, C)``: ``J_g = (1/s)(P - u u^T / K)`` (symmetric), ``P = I - 11^T/K``."""
    k = u.shape[1]
    centred = v - v.mean(dim=1, keepdim=True)
    return (centred - u.unsqueeze(2) * (u.unsqueeze(2) * v).sum(dim=1, keepdim=True) / k) / s.unsqueeze(2)


def normalized_cross_entropy_logit_hessian(logits: Tensor, target: Tensor) -> Tensor:
    r"""Closed-form per-sample Hessian of eq. 20 in the raw logits, ``(N, K, K)`` float64.

    With ``u = (z - mean z) / s`` (eq. 21-22, ``s`` the population standard deviation), ``p =
    softmax(u)``, ``r = p - e_y`` and the centering projection ``P = I - 11^T / K``:

    .. math::

        \nabla^2_z \ell = J_g^\top (\mathrm{diag}\,p - p p^\top) J_g + M, \qquad
        J_g = \tfrac1s \big(P - \tfrac1K u u^\top\big),

        M = \sum_i r_i \nabla^2_z u_i = \frac{1}{s^2 K}\Big[-(r u^\top + u r^\top) - (r\cdot u) P
            + \frac{3 (r\cdot u)}{K} u u^\top\Big].

    Derivation: ``ds/dz = u / K`` and ``d(1/s)/dz = -u / (K s^2)``, so
    ``d^2 u_i / dz_j dz_k = -(u_k P_ij + u_j P_ik + u_i P_jk - 3 u_i u_j u_k / K) / (K s^2)``;
    contracting with ``r`` uses ``P r = r`` (``sum_i r_i = 0``) and ``u . P r = u . r``. ``M`` is
    ``alpha P`` with ``alpha = -(r . u) / (s^2 K)`` plus a rank-2 part in ``span{r, u}``; it is
    indefinite. Rows whose logits are all equal (degenerate, :func:`normalize_logits`) get 0.

    Args:
        logits: ``(N, K)``; target: ``(N,)`` class indices, or ``(N, K)`` class probabilities (then
            ``e_y`` is the target's row).

    Returns:
        ``(N, K, K)`` float64. Cost ``O(N K^2)`` (for tests and small ``K``).
    """
    _check_class_targets(logits, target, "normalized_cross_entropy_logit_hessian")
    return _normalized_cross_entropy_hessian_and_gradient(logits, target)[0]


def _normalized_cross_entropy_hessian_and_gradient(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    r""":func:`normalized_cross_entropy_logit_hessian` without its argument checks (the caller has made
    them), and from the same terms each sample's logit gradient ``J_g^T r = (r - u (u . r) / K) / s``
    (``sum r = 0``, so the centering drops out): ``(N, K, K)`` and ``(N, K)`` float64, zero on degenerate
    rows (all logits equal: :func:`~lightning_flatness.functional.losses.normalize_logits`)."""
    u, s, ok = _normalization(logits)
    n, k = u.shape
    p = torch.softmax(u, dim=1)
    r = p - target_probabilities(target, k, p.dtype)
    ru = (r * u).sum(dim=1, keepdim=True)
    grad = torch.where(ok.unsqueeze(1), (r - u * ru / k) / s, torch.zeros_like(r))
    eye = torch.eye(k, dtype=p.dtype, device=p.device)
    proj = eye - 1.0 / k
    jg = (proj - u.unsqueeze(2) * u.unsqueeze(1) / k) / s.unsqueeze(2)
    lam_u = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    ru = ru.reshape(n, 1, 1)
    m = (
        -(r.unsqueeze(2) * u.unsqueeze(1) + u.unsqueeze(2) * r.unsqueeze(1))
        - ru * proj
        + 3 * ru * u.unsqueeze(2) * u.unsqueeze(1) / k
    ) / (s.unsqueeze(2) ** 2 * k)
    hess = jg @ lam_u @ jg + m
    return torch.where(ok.reshape(n, 1, 1), hess, torch.zeros_like(hess)), grad


@dataclass(frozen=True)
class StructuredLossHessian:
    r"""``Lambda_n = T_n diag(d_n) T_n^T + sum_j l_nj q_nj q_nj^T`` per sample: a diagonal core behind the
    rank-one correction ``T_n = I - a_n 1^T``, plus a few signed exact columns. ``O(K)`` numbers per sample
    describe a ``K x K`` loss Hessian exactly, so it can be sketched (:meth:`sketch`) at ``O(N K)`` cost
    whatever ``K``: no class sampling.

    - ``F.cross_entropy``: ``diag(p) - p p^T = (I - p 1^T) diag(p) (I - 1 p^T)``: ``d = p``, ``a = p``, no
      low-rank part (:func:`softmax_cross_entropy_structure`).
    - eq. 20: ``Lambda = P diag(p / s^2 + alpha) P + L`` with the centering ``P`` (``a = 1/K``) and ``L``
      of rank at most 4 (:func:`normalized_cross_entropy_structure`).

    Attributes:
        d: ``(N, K)`` the diagonal core (any sign).
        a: ``(N, K)`` the correction vector of ``T_n = I - a_n 1^T``.
        low: ``(N, K, R)`` the exact columns ``q_nj`` (``R`` may be 0).
        low_signs: ``(N, R)`` their signed weights ``l_nj``.
    """

    d: Tensor
    a: Tensor
    low: Tensor
    low_signs: Tensor

    def apply_t(self, v: Tensor) -> Tensor:
        """``T_n v`` for ``v`` ``(N, K, C)``: ``v - a_n (1^T v)``."""
        return v - self.a.unsqueeze(2) * v.sum(dim=1, keepdim=True)

    def dense(self) -> Tensor:
        """``(N, K, K)`` ``Lambda_n`` (for tests and small ``K``; ``O(N K^2)`` memory)."""
        core = self.apply_t(torch.diag_embed(self.d))  # T diag(d)
        core = self.apply_t(core.transpose(1, 2)).transpose(1, 2)  # T diag(d) T^T
        return core + torch.einsum("nkr,nr,nlr->nkl", self.low, self.low_signs, self.low)

    def sketch(self, num_sketches: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        r"""Random-sign mixtures of the exact factors: ``S`` sketches, each one ``+`` and (when some part
        is negative) one ``-`` column,

        .. math:: v^\pm = \tfrac{1}{\sqrt S}\Big[T\,(\sqrt{d^\pm} \circ \xi^\pm)
                  + \sum_{j:\, \pm l_j > 0} \varepsilon_j \sqrt{|l_j|}\, q_j\Big], \qquad
                  \mathbb{E}\Big[\sum_{\text{sketches}} v^+ v^{+\top} - v^- v^{-\top}\Big] = \Lambda

        (``xi``, ``eps`` independent Rademacher; ``d^+ = max(d, 0)``, ``d^- = max(-d, 0)``): the estimator of
        :func:`~lightning_flatness.functional.estimators.gauss_newton_sketch.sketch_columns` applied to the
        ``K + R`` exact columns ``sqrt|d_c| T e_c`` and ``sqrt|l_j| q_j``, without materialising them.

        Returns:
            ``(columns (N, K, C), signs (C,))``, ``C = 2 S`` (``S`` when nothing is negative, as for
            cross-entropy). Cost ``O(N K S)`` (plus ``O(N K R S)``); no class sampling.
        """
        if not isinstance(num_sketches, int) or num_sketches < 1:
            raise ValueError(f"`num_sketches` must be a positive int, got {num_sketches!r}.")
        n, k = self.d.shape
        r = self.low.shape[2]
        parts = [1.0, -1.0] if bool((self.d < 0).any()) or bool((self.low_signs < 0).any()) else [1.0]
        xi = _rademacher((n, k, num_sketches * len(parts)), self.d, generator)
        eps = _rademacher((n, r, num_sketches * len(parts)), self.d, generator)
        cols = []
        for s in range(num_sketches):
            for j, sign in enumerate(parts):
                idx = s * len(parts) + j
                root = (sign * self.d).clamp_min(0).sqrt()
                col = self.apply_t((root * xi[:, :, idx]).unsqueeze(2)).squeeze(2)
                if r:
                    weight = (sign * self.low_signs).clamp_min(0).sqrt() * eps[:, :, idx]  # (N, R)
                    col = col + torch.einsum("nkr,nr->nk", self.low, weight)
                cols.append(col)
        mixed = torch.stack(cols, dim=2) / math.sqrt(num_sketches)
        return mixed, torch.tensor(parts * num_sketches, dtype=mixed.dtype, device=mixed.device)


def softmax_cross_entropy_structure(logits: Tensor, target: Tensor) -> StructuredLossHessian:
    r"""``F.cross_entropy``'s ``Lambda_n = diag(p) - p p^T = (I - p 1^T) diag(p) (I - 1 p^T)`` (uses
    ``sum_c p_c = 1``), in the form of :class:`StructuredLossHessian`; float64, ``O(N K)``."""
    _check_class_targets(logits, target, "softmax_cross_entropy_structure")
    p = torch.softmax(logits.detach().to(torch.float64), dim=1)
    n = p.shape[0]
    return StructuredLossHessian(p, p, p.new_zeros(n, p.shape[1], 0), p.new_zeros(n, 0))


def normalized_cross_entropy_structure(logits: Tensor, target: Tensor) -> StructuredLossHessian:
    r"""Eq. 20's per-sample logit Hessian as a diagonal core behind the centering plus rank <= 4, exactly.

    From :func:`normalized_cross_entropy_logit_hessian`, with ``A = P - u u^T / K`` (``J_g = A / s``,
    ``P u = u``), ``C = diag(p) - p p^T``, ``r = p - e_y`` and ``alpha = -(r.u)/(s^2 K)``:
    ``A diag(p) A = P diag(p) P - (w u^T + u w^T)/K + (u^T diag(p) u) u u^T / K^2`` with
    ``w = P (p o u)``, so

    .. math::

        \Lambda = P\,\mathrm{diag}\big(\tfrac{p}{s^2} + \alpha\big) P + \tfrac{1}{s^2}\Big[
            \tfrac{(u^\top \mathrm{diag}(p)\, u) + 3 (r\cdot u)}{K^2} u u^\top
            - \tfrac{1}{K}(w u^\top + u w^\top) - \tfrac1K (r u^\top + u r^\top) - (A p)(A p)^\top\Big].

    The core ``p/s^2 + alpha`` nets the softmax curvature against the normalization's ``alpha P`` *per
    class*, before any sampling (sampled separately, as in :func:`normalized_cross_entropy_columns`,
    their large ``+`` and ``-`` parts cancel only on average). The bracket lies in
    ``span{u, w, A p, r}``: a ``4 x 4`` symmetric matrix in that basis, diagonalised through a thin QR
    (``O(N K)``), gives at most 4 signed exact columns. Degenerate rows (all logits equal) get zeros.
    """
    _check_class_targets(logits, target, "normalized_cross_entropy_structure")
    u, s, ok = _normalization(logits)
    n, k = u.shape
    p = torch.softmax(u, dim=1)
    r = p - target_probabilities(target, k, p.dtype)
    s2 = s.squeeze(1) ** 2
    ru = (r * u).sum(dim=1)
    alpha = -ru / (s2 * k)
    d = p / s2.unsqueeze(1) + alpha.unsqueeze(1)
    pu = p * u
    w = pu - pu.mean(dim=1, keepdim=True)
    ap = (p - p.mean(dim=1, keepdim=True)) - u * (u * p).sum(dim=1, keepdim=True) / k
    basis = torch.stack([u, w, ap, r], dim=2)  # (N, K, 4)
    coef = torch.zeros(n, 4, 4, dtype=p.dtype, device=p.device)
    coef[:, 0, 0] = ((pu * u).sum(dim=1) + 3 * ru) / k**2
    coef[:, 0, 1] = coef[:, 1, 0] = -1.0 / k
    coef[:, 0, 3] = coef[:, 3, 0] = -1.0 / k
    coef[:, 2, 2] = -1.0
    coef = coef / s2.reshape(n, 1, 1)
    q, rr = torch.linalg.qr(basis)  # (N, K, 4), (N, 4, 4)
    lam, vec = torch.linalg.eigh(rr @ coef @ rr.transpose(1, 2))
    low = q @ vec
    keep = ok.to(p.dtype)
    a = torch.full_like(p, 1.0 / k)
    return StructuredLossHessian(
        d * keep.unsqueeze(1), a, low * keep.reshape(n, 1, 1), lam * keep.unsqueeze(1)
    )


def _elementwise_rows(logits: Tensor, target: Tensor, caller: str) -> Tensor:
    """The outputs as ``(N, D)`` float64 rows, checked against a target of the same shape."""
    if logits.ndim < 1 or target.shape != logits.shape:
        raise ValueError(
            f"{caller} needs a target of the outputs' shape, got {tuple(target.shape)} for outputs "
            f"{tuple(logits.shape)}."
        )
    return logits.detach().reshape(logits.shape[0], -1).to(torch.float64)


def _diagonal(d: Tensor) -> StructuredLossHessian:
    n, k = d.shape
    return StructuredLossHessian(d, torch.zeros_like(d), d.new_zeros(n, k, 0), d.new_zeros(n, 0))


def mean_squared_error_structure(logits: Tensor, target: Tensor) -> StructuredLossHessian:
    r"""``F.mse_loss`` (mean over all ``N D`` entries: ``l_n = (1/D) sum_j (f_nj - t_nj)^2``): ``Lambda_n =
    (2/D) I``, a diagonal core with no correction (``a = 0``); outputs of any shape, flattened per sample
    to ``D`` entries. Float64, ``O(N D)``."""
    rows = _elementwise_rows(logits, target, "mean_squared_error_structure")
    return _diagonal(torch.full_like(rows, 2.0 / rows.shape[1]))


def binary_cross_entropy_structure(logits: Tensor, target: Tensor) -> StructuredLossHessian:
    r"""``F.binary_cross_entropy_with_logits`` (mean over all ``N D`` entries, no weights): ``Lambda_n =
    diag(s (1 - s)) / D`` with ``s = sigmoid(f_n)``, whatever the (soft) targets; outputs of any shape,
    flattened per sample. Float64, ``O(N D)``."""
    rows = _elementwise_rows(logits, target, "binary_cross_entropy_structure")
    s = torch.sigmoid(rows)
    return _diagonal(s * (1 - s) / rows.shape[1])


#: Closed-form structures of ``Lambda_n`` (:class:`StructuredLossHessian`), keyed by the loss function.
LOSS_HESSIAN_STRUCTURES: dict[Callable[..., Tensor], Callable[[Tensor, Tensor], StructuredLossHessian]] = {
    F.cross_entropy: softmax_cross_entropy_structure,
    normalized_softmax_cross_entropy: normalized_cross_entropy_structure,
    F.mse_loss: mean_squared_error_structure,
    F.binary_cross_entropy_with_logits: binary_cross_entropy_structure,
}
#: Losses of :data:`LOSS_HESSIAN_STRUCTURES` that are means over output entries, so that their structure
#: holds for outputs of any shape (flattened per sample); the softmax losses need ``(N, K)`` logits.
ELEMENTWISE_LOSSES = frozenset({F.mse_loss, F.binary_cross_entropy_with_logits})


def has_loss_hessian_structure(loss_fn: LossFn, output_ndim: int) -> bool:
    """Whether :func:`loss_hessian_structure` gives ``loss_fn``'s structure for outputs of ``output_ndim``
    dimensions (batch included)."""
    key = hessian_twin(loss_fn)
    return key in LOSS_HESSIAN_STRUCTURES and (output_ndim == 2 or key in ELEMENTWISE_LOSSES)


def loss_hessian_structure(loss_fn: LossFn, logits: Tensor, target: Tensor) -> StructuredLossHessian | None:
    """The exact :class:`StructuredLossHessian` of ``loss_fn`` at ``logits`` when it has a closed form
    (:data:`LOSS_HESSIAN_STRUCTURES`; ``(N, K)`` logits, or any shape for :data:`ELEMENTWISE_LOSSES`),
    else None."""
    if not has_loss_hessian_structure(loss_fn, logits.ndim):
        return None
    return LOSS_HESSIAN_STRUCTURES[hessian_twin(loss_fn)](logits, target)


#: Whether eq. 20's rank-2 part ``B`` is taken exactly (two signed columns) rather than merged into the
#: sampled ones with random signs (see :func:`normalized_cross_entropy_columns`).
EXACT_LOW_RANK = True


def normalized_cross_entropy_columns(
    logits: Tensor,
    target: Tensor,
    num_mc_samples: int = 1,
    generator: torch.Generator | None = None,
    *,
    exact_classes: int = 0,
    exact_low_rank: bool | None = None,
    draws_only: bool = False,
) -> Columns:
    r"""Monte-Carlo columns for eq. 20 (:func:`normalized_softmax_cross_entropy`): two per draw.

    Uses the decomposition of :func:`normalized_cross_entropy_logit_hessian`,
    ``Lambda = J_g Cov[p - e_y] J_g + alpha P + B`` with ``B = Q A Q^T``, ``Q = [r, u]``,
    ``A = [[0, a], [a, b]]``, ``a = -1/(s^2 K)``, ``b = 3 (r.u)/(s^2 K^2)``. ``B`` has (at most) one
    positive and one negative eigenpair ``(lambda_+, e_+), (lambda_-, e_-)``, found from the thin QR of
    ``Q`` and a 2x2 eigenproblem. Per draw, with ``y ~ p``, ``xi, xi'`` Rademacher vectors (so
    ``E[P xi xi^T P] = P``) and independent Rademacher signs ``eps``:

    .. math::

        c_+ = J_g (p - e_y) + \sqrt{\alpha_+}\, P\xi + \varepsilon_1 \sqrt{\lambda_+}\, e_+ \quad (+),
        \qquad c_- = \sqrt{\alpha_-}\, P\xi' + \varepsilon_2 \sqrt{|\lambda_-|}\, e_- \quad (-),

    ``alpha_+ = max(alpha, 0)``, ``alpha_- = max(-alpha, 0)``. The three terms of ``c_+`` are
    independent and the first two have mean zero, so the cross terms vanish in expectation and
    ``E[c_+ c_+^T - c_- c_-^T] = Lambda``. With ``exact_low_rank`` (the default,
    :data:`EXACT_LOW_RANK`) ``B`` is not sampled but taken exactly, as two fixed columns
    ``sqrt(lambda_+) e_+`` (+) and ``sqrt(|lambda_-|) e_-`` (-), and the draws carry only the first two
    terms. ``B``'s eigenvalues are about ``sqrt(K)`` times the diagonal part's and of both signs, so this
    removes much of the variance when the classes are many (measured in ``benchmarks/RESULTS.md``,
    "Sampling eq. 20's logit Hessian"). With ``exact_classes = m`` the CE part is split as in
    :func:`cross_entropy_columns` (``m`` further ``+`` columns ``J_g sqrt(p_c)(e_c - p)``).

    ``draws_only`` leaves the exact columns out (``m`` and those of ``B``; the draws are unchanged: a
    later group of draws, :func:`~lightning_flatness.functional.estimators.gauss_newton_mc.draw_groups`).

    Returns:
        ``(columns (N, K, m [+ 2] + 2 num_mc_samples), signs)``: ``m`` exact ``+`` columns, the two exact
        columns of ``B`` (``exact_low_rank``), then per draw a ``+`` and a ``-`` column; in the logits'
        dtype with ``exact_low_rank`` (float32 below it), else float64.
        Degenerate rows (all logits equal) get zero columns.

    Cost: ``O(N K (m + num_mc_samples))``; no backward pass.
    """
    _check_draws(num_mc_samples)
    _check_class_targets(logits, target, "normalized_cross_entropy_columns")
    if exact_low_rank is None:
        exact_low_rank = EXACT_LOW_RANK
    if exact_low_rank:
        return _normalized_cross_entropy_draws(
            _eq20_terms(logits, target), target, num_mc_samples, exact_classes, generator, draws_only
        )
    u, s, ok = _normalization(logits)
    n, k = u.shape
    p = torch.softmax(u, dim=1)
    inv = 1.0 / (s.squeeze(1) ** 2 * k)  # 1 / (s^2 K)
    r = p - target_probabilities(target, k, p.dtype)
    ru = (r * u).sum(dim=1)
    alpha = -ru * inv
    scale = 1.0 / math.sqrt(num_mc_samples)
    if draws_only:
        raise ValueError("draws_only needs exact_low_rank: the sampled rank-2 part is in every draw.")
    ce = _normalization_jacobian_apply(
        u, s, _softmax_hessian_columns(p, num_mc_samples, exact_classes, generator)
    )
    m = ce.shape[2] - num_mc_samples
    xi = _rademacher((n, k, 2 * num_mc_samples), p, generator)
    pxi = xi - xi.mean(dim=1, keepdim=True)
    lam, vec = _rank_two_part(r, u, ru, inv, k)
    eps = _rademacher((n, 1, 2 * num_mc_samples), p, generator)
    pos = (
        ce[:, :, m:]
        + alpha.clamp_min(0).sqrt().reshape(n, 1, 1) * pxi[:, :, :num_mc_samples] * scale
        + eps[:, :, :num_mc_samples]
        * (lam[:, 1].clamp_min(0).sqrt().reshape(n, 1) * vec[:, :, 1]).unsqueeze(2)
        * scale
    )
    neg = (-alpha).clamp_min(0).sqrt().reshape(n, 1, 1) * pxi[:, :, num_mc_samples:] * scale + eps[
        :, :, num_mc_samples:
    ] * ((-lam[:, 0]).clamp_min(0).sqrt().reshape(n, 1) * vec[:, :, 0]).unsqueeze(2) * scale
    draws = torch.stack([pos, neg], dim=3).reshape(n, k, 2 * num_mc_samples)  # interleaved +, -
    cols = torch.cat([ce[:, :, :m], draws], dim=2).masked_fill_(~ok.reshape(n, 1, 1), 0.0)
    signs = torch.cat(
        [torch.ones(m, dtype=p.dtype), torch.tensor([1.0, -1.0], dtype=p.dtype).repeat(num_mc_samples)]
    )
    return cols, signs.to(p.device)


@dataclass(frozen=True)
class _Eq20Terms:
    """Per-sample pieces of eq. 20's logit Hessian (:func:`normalized_cross_entropy_logit_hessian`) in the
    columns' dtype (the logits', float32 below it): ``u``, ``s``, ``ok`` (:func:`_normalization`), ``p``
    ``(N, K)`` the softmax of ``u``, ``up = u . p`` ``(N, 1)``, and ``ru = r . u``, ``inv = 1 / (s^2 K)``,
    ``alpha = -ru inv`` ``(N,)`` (``r = p - e_y``)."""

    u: Tensor
    s: Tensor
    ok: Tensor
    p: Tensor
    up: Tensor
    ru: Tensor
    inv: Tensor
    alpha: Tensor


def _eq20_terms(logits: Tensor, target: Tensor) -> _Eq20Terms:
    """:class:`_Eq20Terms` of ``(N, K)`` logits and their class targets (indices or probabilities)."""
    dtype = logits.dtype if logits.dtype in (torch.float32, torch.float64) else torch.float32
    u, s, ok = _normalization(logits, dtype)
    k = u.shape[1]
    p = torch.softmax(u, dim=1)
    up = (u * p).sum(dim=1, keepdim=True)
    if target.is_floating_point():  # class probabilities: r = p - target
        ru = up.squeeze(1) - (u * target.to(u.dtype)).sum(dim=1)
    else:  # r = p - e_y, without forming e_y
        ru = up.squeeze(1) - u.gather(1, target.long().unsqueeze(1)).squeeze(1)
    inv = 1.0 / (s.squeeze(1) ** 2 * k)
    return _Eq20Terms(u, s, ok, p, up, ru, inv, -ru * inv)


def _rank_two_columns(t: _Eq20Terms, target: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 20's rank-2 part ``B`` as its ``+`` and ``-`` column, ``(N, K)`` each (:func:`_rank_two_part`)."""
    k = t.u.shape[1]
    lam, vec = _rank_two_part(t.p - target_probabilities(target, k, t.p.dtype), t.u, t.ru, t.inv, k)
    n = lam.shape[0]
    return (
        lam[:, 1].clamp_min(0).sqrt().reshape(n, 1) * vec[:, :, 1],
        (-lam[:, 0]).clamp_min(0).sqrt().reshape(n, 1) * vec[:, :, 0],
    )


def _softmax_part(
    t: _Eq20Terms, draws: int, exact_classes: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor]:
    """The softmax columns ``w (e_c - p)`` through ``J_g``: ``(w/s)(e_c - p - g u)`` with
    ``g = (u_c - u . p) / K`` (``e_c - p`` is centred): ``(classes, w / s, g)``, ``(N, m + D)`` each."""
    classes, weights = _softmax_draws(t.p, draws, exact_classes, generator)
    return classes, weights / t.s, (t.u.gather(1, classes) - t.up) / t.u.shape[1]


def _alpha_roots(t: _Eq20Terms, scale: float) -> Tensor:
    """``(N, 2)``: ``scale sqrt(max(alpha, 0))`` and ``scale sqrt(max(-alpha, 0))``, the weights of the
    normalization's curvature ``alpha P`` in the ``+`` and the ``-`` column (one of them 0 per sample)."""
    return torch.stack([t.alpha.clamp_min(0).sqrt(), (-t.alpha).clamp_min(0).sqrt()], dim=1).mul_(scale)


def _basis(t: _Eq20Terms, *extra: Tensor) -> Tensor:
    """``(N, 3 + len(extra), K)``: ``p``, ``u``, ``1`` and ``extra``, the vectors every column combines."""
    n, k = t.p.shape
    basis = t.p.new_empty(n, 3 + len(extra), k)
    basis[:, 0], basis[:, 1] = t.p, t.u
    basis[:, 2] = 1.0
    for i, vector in enumerate(extra):
        basis[:, 3 + i] = vector
    return basis


def _normalized_cross_entropy_draws(
    t: _Eq20Terms,
    target: Tensor,
    num_mc_samples: int,
    exact_classes: int,
    generator: torch.Generator | None,
    draws_only: bool,
) -> Columns:
    r""":func:`normalized_cross_entropy_columns` with ``B`` exact, written once into one ``(N, C, K)`` block.

    Every column is a combination of three vectors per sample, ``p``, ``u`` and ``1``, plus a one-hot and
    a random part: the softmax column ``w (e_c - p)`` is centred, so ``J_g`` maps it to
    ``(w/s)(e_c - p - u (u_c - u.p)/K)``; the normalization's part is ``sqrt(alpha_pm) P xi / sqrt(D)``
    with ``xi = 2 b - 1`` for fair bits ``b``, i.e. ``2 sqrt(alpha_pm) (b - mean(b)) / sqrt(D)``. So the
    bits are written as they are, scaled per sample, the three vectors added by one batched product
    (``baddbmm``) and the one-hots scattered: a few passes over the columns and one random bit per entry
    (:func:`_random_bits`), instead of a float64 temporary per term. Same distribution as the terms
    formed one by one."""
    n, k = t.u.shape
    m = min(int(exact_classes), k)
    draws = num_mc_samples
    classes, w, g = _softmax_part(t, draws, m, generator)  # (N, m + D) each
    lead = 0 if draws_only else m + 2  # exact CE columns, then B's + and - columns
    if draws_only:
        classes, w, g = classes[:, m:], w[:, m:], g[:, m:]
    cols = t.p.new_empty(n, lead + 2 * draws, k)
    body = cols[:, lead:].view(n, draws, 2, k)
    # one xi per draw, in both slots: alpha has one sign per sample, so one of the two roots below is 0
    body.copy_(_random_bits(n * draws * k, generator, t.p.device).view(torch.uint8).view(n, draws, 1, k))
    bit_mean = body[:, :, :1].sum(dim=3).div_(k)  # (N, D, 1)
    root = _alpha_roots(t, 2.0 / math.sqrt(draws))  # xi - mean xi = 2 (b - mean b)
    body.mul_(root.reshape(n, 1, 2, 1))
    # the dense terms: per column coefficients of (p, u, 1)
    exact = 0 if draws_only else m
    ce_cols = torch.arange(classes.shape[1], device=cols.device)
    ce_slot = torch.where(ce_cols < exact, ce_cols, lead + 2 * (ce_cols - exact))  # exact ones, then each +
    coef = t.p.new_zeros(n, cols.shape[1], 3)
    coef[:, ce_slot, 0] = -w
    coef[:, ce_slot, 1] = -w * g
    coef[:, lead:, 2] = -(root.unsqueeze(1) * bit_mean).reshape(n, 2 * draws)
    basis = _basis(t)
    if not draws_only:
        cols[:, :m].zero_()
        cols[:, m], cols[:, m + 1] = _rank_two_columns(t, target)
        cols[:, :m].baddbmm_(coef[:, :m], basis)
    cols[:, lead:].baddbmm_(coef[:, lead:], basis)
    cols.view(n, -1).scatter_add_(1, ce_slot.unsqueeze(0) * k + classes, w)
    if not bool(t.ok.all()):
        cols.masked_fill_(~t.ok.reshape(n, 1, 1), 0.0)
    signs = [1.0, -1.0] * draws if draws_only else [1.0] * m + [1.0, -1.0] + [1.0, -1.0] * draws
    return cols.transpose(1, 2), torch.tensor(signs, dtype=cols.dtype, device=cols.device)


def normalized_cross_entropy_sketch(
    logits: Tensor,
    target: Tensor,
    num_mc_samples: int,
    num_sketches: int,
    generator: torch.Generator | None = None,
    *,
    exact_classes: int = 0,
) -> Columns:
    r"""The sketches of eq. 20's Monte-Carlo columns formed directly: what
    :func:`~lightning_flatness.functional.estimators.gauss_newton_sketch.sketch_columns` makes of
    :func:`normalized_cross_entropy_columns` (``B`` exact), without its ``m + 2 + 2 D`` columns.

    Sketch ``s`` mixes the ``+`` columns with independent signs ``eps`` and the ``-`` columns with others:

    .. math::

        v^+ = \tfrac{1}{\sqrt S}\Big[\sum_i \varepsilon_i \tfrac{w_i}{s}(e_{c_i} - p - g_i u)
              + \varepsilon_B \sqrt{\lambda_+}\, e_+ + \sqrt{\alpha_+ / D}\; P Z\Big], \qquad
        v^- = \tfrac{1}{\sqrt S}\Big[\varepsilon'_B \sqrt{|\lambda_-|}\, e_- + \sqrt{\alpha_- / D}\; P Z\Big],

    ``i`` over the ``m`` exact classes and the ``D`` draws. The draws' normalization parts
    ``sqrt(alpha / D) P xi_j``, mixed, sum to ``sqrt(alpha / D) P Z`` with ``Z = sum_j eps_j xi_j``: per
    class a sum of ``D`` independent signs, independent of the ``eps`` (``xi`` is), so
    ``Z = 2 Binomial(D, 1/2) - D``, drawn as bit counts (:func:`_binomial_counts`). ``alpha`` has one sign
    per sample, so one ``Z`` serves both columns (one of the two roots is 0). The joint law of each sketch
    is that of the mixed columns; the ``Z`` of different sketches are independent (the mixed columns'
    share their ``xi``), which leaves each sketch unbiased. ``E[sum_s v^+ v^{+T} - v^- v^{-T}] = Lambda``.

    Returns:
        ``(columns (N, K, 2 S), signs [+1, -1] * S)`` in the logits' dtype (float32 below it). Cost
        ``O(N K S)`` and ``D`` random bits per class and sketch, whatever the number of draws' columns.
    """
    _check_draws(num_mc_samples)
    _check_class_targets(logits, target, "normalized_cross_entropy_sketch")
    if not isinstance(num_sketches, int) or num_sketches < 1:
        raise ValueError(f"`num_sketches` must be a positive int, got {num_sketches!r}.")
    t = _eq20_terms(logits, target)
    n, k = t.u.shape
    sketches, draws = num_sketches, num_mc_samples
    cols = t.p.new_empty(n, sketches, 2, k)
    cols.copy_(_binomial_counts(n * sketches * k, draws, generator, t.p.device).view(n, sketches, 1, k))
    count_mean = cols[:, :, :1].sum(dim=3).div_(k)  # (N, S, 1)
    root = _alpha_roots(t, 2.0 / math.sqrt(draws * sketches))  # Z - mean Z = 2 (count - mean count)
    cols.mul_(root.reshape(n, 1, 2, 1))
    classes, w, g = _softmax_part(t, draws, min(int(exact_classes), k), generator)  # (N, C) each
    eps = _rademacher((n, sketches, classes.shape[1] + 2), t.p, generator).div_(math.sqrt(sketches))
    signed = eps[:, :, :-2] * w.unsqueeze(1)  # (N, S, C): each softmax column's sign and weight
    coef = t.p.new_zeros(n, sketches, 2, 5)  # of p, u, 1, e_+, e_-
    coef[:, :, 0, 0] = -signed.sum(dim=2)
    coef[:, :, 0, 1] = -(signed * g.unsqueeze(1)).sum(dim=2)
    coef[:, :, :, 2] = -(root.unsqueeze(1) * count_mean)
    coef[:, :, 0, 3], coef[:, :, 1, 4] = eps[:, :, -2], eps[:, :, -1]
    flat = cols.view(n, 2 * sketches, k)
    flat.baddbmm_(coef.view(n, 2 * sketches, 5), _basis(t, *_rank_two_columns(t, target)))
    plus_slot = (2 * k * torch.arange(sketches, device=cols.device)).view(1, sketches, 1)
    cols.view(n, -1).scatter_add_(1, (plus_slot + classes.unsqueeze(1)).reshape(n, -1), signed.reshape(n, -1))
    if not bool(t.ok.all()):
        flat.masked_fill_(~t.ok.reshape(n, 1, 1), 0.0)
    signs = torch.tensor([1.0, -1.0] * sketches, dtype=cols.dtype, device=cols.device)
    return flat.transpose(1, 2), signs


def _rank_two_part(r: Tensor, u: Tensor, ru: Tensor, inv: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Eq. 20's ``B = Q A Q^T`` (:func:`normalized_cross_entropy_columns`) as eigenpairs: the thin QR
    ``Q = U R``, the ``2 x 2`` eigenproblem of ``R A R^T``, eigenvectors ``U W``; ``((N, 2), (N, K, 2))``,
    eigenvalues ascending (negative, then positive)."""
    n = r.shape[0]
    q, rr = torch.linalg.qr(torch.stack([r, u], dim=2))  # (N, K, 2), (N, 2, 2)
    a_mat = torch.zeros(n, 2, 2, dtype=r.dtype, device=r.device)
    a_mat[:, 0, 1] = a_mat[:, 1, 0] = -inv
    a_mat[:, 1, 1] = 3 * ru * inv / k
    lam, w = torch.linalg.eigh(rr @ a_mat @ rr.transpose(1, 2))
    return lam, q @ w


def autograd_columns(
    loss_fn: LossFn,
    logits: Tensor,
    target: Tensor,
    num_mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Columns:
    r"""Fallback for any loss that is a mean of per-sample losses: two columns per draw.

    ``Lambda_n`` ``(D, D)`` by double backward (``D`` outputs per sample), ``Lambda_n = sum_k s_k u_k
    u_k^T``; per draw, with independent Rademacher ``eps_k``, ``c_+ = sum_{s_k > 0} eps_k sqrt(s_k) u_k``
    (sign ``+``) and ``c_- = sum_{s_k < 0} eps_k sqrt(-s_k) u_k`` (sign ``-``):
    ``E[c_+ c_+^T - c_- c_-^T] = Lambda_n``. Exact (zero variance) when ``Lambda_n`` has rank 1 per sign.

    Cost: ``D`` batched double-backward passes through the loss and an ``O(D^3)`` eigendecomposition
    per sample: it grows with the number of outputs (documented limitation; register a closed form in
    :data:`MC_LOSS_COLUMNS` for large ``D``). The backward columns through the model stay 2 per draw.

    Raises:
        ValueError: the loss is not a mean of per-sample losses (checked on values).
    """
    from lightning_flatness.functional.estimators.exact import _per_sample_loss_hessians

    _check_draws(num_mc_samples)
    hessians, _, issues = _per_sample_loss_hessians(loss_fn, logits.detach(), target)
    if issues:
        raise ValueError(f"the Gauss-Newton matrix needs a per-sample loss: {issues[0]}.")
    s, vec = torch.linalg.eigh(hessians.to(torch.float64))  # (N, D), (N, D, D)
    n, d = s.shape
    root_pos = s.clamp_min(0).sqrt().unsqueeze(1) * vec
    root_neg = (-s).clamp_min(0).sqrt().unsqueeze(1) * vec
    eps = _rademacher((n, d, 2 * num_mc_samples), s, generator) / math.sqrt(num_mc_samples)
    pos = root_pos @ eps[:, :, :num_mc_samples]
    neg = root_neg @ eps[:, :, num_mc_samples:]
    cols = torch.stack([pos, neg], dim=3).reshape(n, d, 2 * num_mc_samples)
    signs = torch.tensor([1.0, -1.0], dtype=torch.float64, device=s.device).repeat(num_mc_samples)
    return cols, signs


#: Base-column entries per chunk of tokens in :func:`token_loss_columns` (bounds their float64 temporaries).
TOKEN_CHUNK_ELEMENTS = 1 << 21
#: Sketch-column entries per chunk of tokens where :data:`MC_LOSS_SKETCHES` forms the sketches directly: their
#: temporaries (the vectors they combine, the random counts) are several columns' worth per token, and chunks
#: that stay in cache were the fastest (5 tokens of GPT-2's vocabulary at one sketch, against 2 and 20:
#: ``benchmarks/RESULTS.md``, round 14).
TOKEN_SKETCH_CHUNK_ELEMENTS = 1 << 19


def token_loss_columns(
    loss_fn: TokenLoss,
    logits: Tensor,
    target: Tensor,
    num_mc_samples: int = 1,
    generator: torch.Generator | None = None,
    *,
    exact_classes: int = 0,
    num_sketches: int | None = None,
    draws_only: bool = False,
) -> Columns:
    r"""Columns for :class:`TokenLoss` on ``(N, T, V)`` logits (or dense ``(N, V, *positions)`` ones,
    ``class_dim=1``): one sequence (image) is one sample.

    The loss is ``(1/M) sum_{valid tokens t} l_t`` (``M`` valid tokens in the batch), so the Hessian
    of sequence ``n``'s share, rescaled to the ``1/N`` convention of the estimators, is
    ``Lambda_n = (N/M) sum_{t in n} E_t Lambda_t E_t^T`` (``E_t`` places token ``t``'s ``V`` logits).
    The base loss's columns ``c_tk`` (slot ``k``, sign ``s_k``) of every valid token are stacked,
    multiplied by independent Rademacher signs ``eps_tk``: ``C_nk = sqrt(N/M) sum_t eps_tk E_t c_tk``.
    ``E[eps_tk eps_t'k] = 0`` for ``t != t'`` removes the cross-token terms, so
    ``E[sum_k s_k C_nk C_nk^T] = Lambda_n`` for any base columns (sampled or exact). Ignored tokens
    (``ignore_index``) and shifted-out positions get zeros.

    With ``num_sketches = S`` the base columns of each token are mixed as
    :func:`~lightning_flatness.functional.estimators.gauss_newton_sketch.sketch_columns` mixes a sample's
    (independent signs per token, slot and sketch; they replace ``eps``): the ``2 S`` (``S`` for a convex
    base loss) sketch columns of each sequence, with the same expectation.

    **Memory.** The tokens are processed in chunks of about :data:`TOKEN_CHUNK_ELEMENTS` entries of the
    base columns (or :data:`TOKEN_SKETCH_CHUNK_ELEMENTS` of the sketches where :data:`MC_LOSS_SKETCHES` forms
    them directly; the first token alone, whose columns set the size), written into one output in the logits'
    dtype: the base columns of all tokens (eq. 20: 18 per token) are never held at once;
    the output holds ``C`` (or ``2 S``) columns of the logits' size, stored column by column (the
    ``(N, D, C)`` result is a view with stride 1 along ``D``, which the backward pass takes as it is).

    Returns:
        ``(columns (N, T * V, C), signs (C,))`` for ``(N, T, V)`` logits (``(N, V, C)`` for ``(N, V)``),
        with ``C`` the base loss's column count (``2 S`` or ``S`` mixed); rows in the order of
        ``logits[n].reshape(-1)`` (:meth:`TokenLoss.output_layout`), in the logits' dtype.

    Cost: the base's, on the ``M`` valid rows.
    """
    n = logits.shape[0]
    flat_index, labels = _token_positions(loss_fn, logits, target)  # (M,) index into the (N * T) rows
    if flat_index.numel() == 0:
        raise ValueError("TokenLoss: every target is ignore_index; the batch has no token to score.")
    if loss_fn.class_dim == 1:  # dense outputs: the rows are the (scored) logits with the classes last
        rows = loss_fn.rows(logits.detach(), target)[0]
        v = rows.shape[1]

        def rows_of(lo: int, hi: int) -> Tensor:
            return rows[lo:hi]

    else:  # (N, V) or (N, T, V): the valid rows of the logits as they lie, a chunk at a time (no copy of all)
        source = logits.detach().reshape(-1, logits.shape[-1])
        v = source.shape[1]

        def rows_of(lo: int, hi: int) -> Tensor:
            return source.index_select(0, flat_index[lo:hi])

    m = flat_index.numel()
    positions = loss_fn.num_positions(logits)
    scale = math.sqrt(n / m)
    direct = None
    if num_sketches is not None:
        from lightning_flatness.functional.estimators.gauss_newton_sketch import sketch_columns

        if EXACT_LOW_RANK and not draws_only:
            direct = MC_LOSS_SKETCHES.get(hessian_twin(loss_fn.base))
    out: Tensor | None = None
    lo, step = 0, 1  # the first token alone: its columns give the chunk size
    while lo < m:
        hi = min(m, lo + step)
        if direct is not None:  # the sketches themselves, without the base columns
            cols, signs = direct(
                rows_of(lo, hi),
                labels[lo:hi],
                num_mc_samples,
                num_sketches,
                generator,
                exact_classes=exact_classes,
            )
            formed = cols.shape[2]
            cols = cols.mul_(scale)
        else:
            cols, signs = sample_loss_hessian_columns(
                loss_fn.base,
                rows_of(lo, hi),
                labels[lo:hi],
                num_mc_samples,
                generator,
                exact_classes=exact_classes,
                draws_only=draws_only,
            )
            formed = cols.shape[2]  # the base columns
            if num_sketches is None:
                cols = cols.mul_(_rademacher((hi - lo, 1, cols.shape[2]), cols, generator).mul_(scale))
            else:
                cols, signs = sketch_columns(cols, signs, num_sketches, generator)
                cols = cols.mul_(scale)
        budget = TOKEN_CHUNK_ELEMENTS if direct is None else TOKEN_SKETCH_CHUNK_ELEMENTS
        step = max(1, budget // (v * formed))  # the next chunks: by the columns formed per token
        if out is None:  # column-major: each column one block of the logits' layout (no copy downstream)
            out = logits.new_empty(cols.shape[2], n * positions, v)
            unscored = torch.ones(n * positions, dtype=torch.bool, device=logits.device)
            unscored[flat_index] = False  # positions without a token to score (ignored, shifted out)
            out.index_fill_(1, unscored.nonzero().squeeze(1), 0.0)
        out.index_copy_(1, flat_index[lo:hi], cols.permute(2, 0, 1).to(out.dtype))
        lo = hi
    assert out is not None
    c = out.shape[0]
    per_position = out.view(c, n, positions, v).permute(1, 2, 3, 0)
    return loss_fn.output_layout(per_position, logits), signs.to(out.dtype)


def _token_positions(loss_fn: TokenLoss, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """For each valid row of ``loss_fn.rows``, its index in the ``(N * P)`` positions of ``logits``
    (:meth:`TokenLoss.num_positions`), and its target: ``((M,), (M,))``, read off the rows of an index
    tensor (no copy of the logits)."""
    n = logits.shape[0]
    index = torch.arange(n * loss_fn.num_positions(logits), device=logits.device, dtype=torch.float64)
    if logits.ndim == 2:
        index = index.reshape(n, 1)
    elif loss_fn.class_dim == 1:  # one "class" ahead of the (scored) positions
        index = index.reshape(n, 1, *(loss_fn.output_size or logits.shape[2:]))
    else:
        index = index.reshape(n, logits.shape[1], 1)
    rows, labels, _ = loss_fn.rows(index, target)
    return rows[:, 0].long(), labels


def elementwise_columns(
    logits: Tensor,
    target: Tensor,
    num_mc_samples: int = 1,
    generator: torch.Generator | None = None,
    *,
    exact_classes: int = 0,
    loss_fn: LossFn = F.mse_loss,
    draws_only: bool = False,
) -> Columns:
    r"""Columns for a loss of :data:`ELEMENTWISE_LOSSES`, whose ``Lambda_n = diag(d_n)`` is known exactly:
    per draw one Rademacher column ``sqrt(d_n) o xi / sqrt(num_mc_samples)`` (sign ``+``,
    ``E[c c^T] = diag(d_n)``), i.e. :meth:`StructuredLossHessian.sketch`. ``(N, D, C)`` for outputs of any
    shape; ``exact_classes`` must be 0 (there are no classes; ``draws_only`` changes nothing: every column
    is a draw). Cost ``O(N D num_mc_samples)``."""
    _check_draws(num_mc_samples)
    if exact_classes:
        raise ValueError(
            f"`exact_classes` applies to the softmax losses only; pass exact_classes=0, got {exact_classes}."
        )
    return LOSS_HESSIAN_STRUCTURES[loss_fn](logits, target).sketch(num_mc_samples, generator)


#: Closed-form column samplers, keyed by the loss function: ``fn(logits, target, num_mc_samples,
#: generator, *, exact_classes, draws_only) -> (columns (N, D, C), signs (C,))``: the exact columns first,
#: then the draws, each draw the same number of columns; ``draws_only`` leaves the exact ones out. Losses
#: not listed use
#: :func:`autograd_columns`.
MC_LOSS_COLUMNS: dict[Callable[..., Tensor], Callable[..., Columns]] = {
    F.cross_entropy: cross_entropy_columns,
    normalized_softmax_cross_entropy: normalized_cross_entropy_columns,
    F.mse_loss: functools.partial(elementwise_columns, loss_fn=F.mse_loss),
    F.binary_cross_entropy_with_logits: functools.partial(
        elementwise_columns, loss_fn=F.binary_cross_entropy_with_logits
    ),
}


#: Closed-form sketches of the Monte-Carlo columns, keyed by the loss function: ``fn(logits, target,
#: num_mc_samples, num_sketches, generator, *, exact_classes) -> (columns (N, D, 2 S), signs (2 S,))``, the
#: law of :func:`~lightning_flatness.functional.estimators.gauss_newton_sketch.sketch_columns` applied to the
#: loss's :data:`MC_LOSS_COLUMNS` without forming them (:func:`token_loss_columns` with ``num_sketches``).
MC_LOSS_SKETCHES: dict[Callable[..., Tensor], Callable[..., Columns]] = {
    normalized_softmax_cross_entropy: normalized_cross_entropy_sketch,
}


#: Default ``exact_classes`` per loss (0 where not listed): for cross-entropy the softmax mass sits on
#: few classes, so taking the two most probable exactly costs little and removes most of the noise; for
#: eq. 20 the curvature of the normalization dominates the noise and it does not help (measured in
#: ``benchmarks/results/bench_gauss_newton_mc.md``).
DEFAULT_EXACT_CLASSES: dict[Callable[..., Tensor], int] = {F.cross_entropy: 2}


def default_exact_classes(loss_fn: LossFn) -> int:
    """The default ``exact_classes`` of ``loss_fn`` (:data:`DEFAULT_EXACT_CLASSES`; a
    :class:`TokenLoss` takes its base loss's)."""
    base = loss_fn.base if isinstance(loss_fn, TokenLoss) else loss_fn
    return DEFAULT_EXACT_CLASSES.get(hessian_twin(base), 0)


#: Default Monte-Carlo draws per sample, per loss (others: 1). Eq. 20's Hessian in the logits is
#: indefinite (``diag(p)/s^2 + alpha I`` plus a low-rank part, ``alpha`` of either sign per sample), so
#: single draws of different samples cancel; 8 draws (16 backward columns whatever K is) were needed to
#: bring the bias of an untrained network near its error bar (``benchmarks/RESULTS.md``, "Sampling
#: eq. 20's logit Hessian").
DEFAULT_MC_SAMPLES: dict[Callable[..., Tensor], int] = {normalized_softmax_cross_entropy: 8}


def default_mc_samples(loss_fn: LossFn) -> int:
    """The default ``num_mc_samples`` of ``loss_fn`` (:data:`DEFAULT_MC_SAMPLES`; a :class:`TokenLoss`
    takes its base loss's)."""
    base = loss_fn.base if isinstance(loss_fn, TokenLoss) else loss_fn
    return DEFAULT_MC_SAMPLES.get(hessian_twin(base), 1)


def sample_loss_hessian_columns(
    loss_fn: LossFn,
    logits: Tensor,
    target: Tensor,
    num_mc_samples: int = 1,
    generator: torch.Generator | None = None,
    *,
    exact_classes: int = 0,
    draws_only: bool = False,
) -> Columns:
    """Signed columns with ``E[sum_k s_k c_nk c_nk^T] = Lambda_n`` for ``loss_fn`` (registry lookup:
    :class:`TokenLoss`, then :data:`MC_LOSS_COLUMNS`, then :func:`autograd_columns`).

    Args:
        loss_fn: ``(logits, target) -> scalar`` mean loss.
        logits: ``(N, ...)`` model outputs (detached here).
        target: targets.
        num_mc_samples: Monte-Carlo draws per sample.
        generator: ``torch.Generator`` on the logits' device, or None for the global RNG.
        exact_classes: for the softmax losses (and :class:`TokenLoss` of them), the most probable
            classes taken exactly (variance reduction, one more column each); 0 for other losses.
        draws_only: only the draws, without the exact columns that come first
            (a later group of draws, with the same expectation of the draws).

    Returns:
        ``(columns (N, D, C), signs (C,))``, float64 (eq. 20 and a :class:`TokenLoss`: the logits' dtype),
        ``D = logits[0].numel()``.

    Raises:
        ValueError: ``exact_classes`` for a loss without a registered closed form.
    """
    _check_draws(num_mc_samples)
    if not isinstance(exact_classes, int) or exact_classes < 0:
        raise ValueError(f"`exact_classes` must be a non-negative int, got {exact_classes!r}.")
    if isinstance(loss_fn, TokenLoss):
        return token_loss_columns(
            loss_fn,
            logits,
            target,
            num_mc_samples,
            generator,
            exact_classes=exact_classes,
            draws_only=draws_only,
        )
    sampler = MC_LOSS_COLUMNS.get(hessian_twin(loss_fn))
    if sampler is not None and (logits.ndim == 2 or hessian_twin(loss_fn) in ELEMENTWISE_LOSSES):
        return sampler(
            logits, target, num_mc_samples, generator, exact_classes=exact_classes, draws_only=draws_only
        )
    if exact_classes:
        raise ValueError(
            f"`exact_classes` applies to the softmax losses of MC_LOSS_COLUMNS only, not to "
            f"{getattr(loss_fn, '__name__', type(loss_fn).__name__)}; pass exact_classes=0."
        )
    return autograd_columns(loss_fn, logits, target, num_mc_samples, generator)
