r"""Mixture-of-experts layers in dense operations, for the estimators' recorded forward pass only.

A Hugging Face experts module (the ``use_experts_implementation`` decorator: Mixtral, Qwen-MoE, OLMoE,
DeepSeek, GPT-OSS, Granite-MoE, ...) holds its ``E`` experts as weight stacks ``gate_up_proj`` and
``down_proj`` and runs the tokens routed to each expert by ``torch._grouped_mm`` on token rows sorted by
expert (or a loop of ``F.linear`` on gathered rows). The estimators' recorder has no layer rule for that
op, and the sorted rows no longer say which sample they came from, so every estimator fell back to one
backward pass per sample and column (``N`` times the work), and ``auto`` measured the Gauss-Newton
diagonal.

:func:`dense_experts` computes the same function in two Linear layers the per-layer contractions read
(:mod:`~lightning_flatness.functional.estimators.layer_rules.linear`), on the tokens as the model passes
them (``(N T, H)``, sample-major):

.. math:: y_t = \sum_e r_{te}\, D_e\, g(U_e x_t) + \sum_e r_{te}\, b_e
          = D\, \mathrm{vec}_e\big(r_{te}\, g(U x_t)_e\big) + r_t B,

with the routing weights ``r_te`` of the ``top_k`` experts of token ``t`` (0 for the others: the same
values, and the same derivatives of every order, as the routed computation, since the top-``k`` choice is
locally constant), ``U`` the stack ``(E, 2I, H)`` read as one ``(E 2I, H)`` weight (a reshape of the
parameter, pulled back to it exactly), ``g`` the module's own gate (``_apply_gate``, or its activation),
``D`` the down stack ``(E, H, I)`` read as ``(H, E I)`` and ``B`` the bias stack ``(E, H)``. Transposed
stacks (``is_transposed``: GPT-OSS) are read transposed.

Cost: every expert on every token, ``E / top_k`` times the experts' flops and activations of the routed
forward (4x for Mixtral's 8 experts, top 2), in the recorded forward and the per-layer contractions;
against one backward pass per sample and column before. Modules it does not write out keep their forward:
a post-expert normalization (``has_post_expert_norm``), expert parallelism, inputs that are not ``(tokens,
H)``.

**Llama 4** (``Llama4TextMoe``) already runs every expert on every token, but on rows laid out expert by
expert: ``x`` repeated ``E`` times, ``(E T, H)``, each block scaled by the router's sigmoid scores ``s_te``
(0 for the experts not chosen), then ``torch.bmm`` with the stacks. The product of the repeated tokens and
the scores is a product of two weight-dependent tensors whose rows are not grouped by sample, which the
Hessian sketch's node rules cannot read. :func:`llama4_moe_forward` computes the same function token by
token, the score moved through the first (linear) projection,

.. math:: y_t = S(x_t) + \sum_e D_e\big(\mathrm{up}_e \odot \phi(\mathrm{gate}_e)\big), \qquad
          (\mathrm{gate}_e, \mathrm{up}_e) = s_{te}\,(x_t U_e) \;=\; (s_{te} x_t)\, U_e,

with ``U`` ``(E, H, 2I)`` read as one ``(E 2I, H)`` weight and ``D`` ``(E, I, H)`` as ``(H, E I)`` (reshapes
pulled back exactly) and ``S`` the shared expert: the same cost as the model's own forward.

**JetMoE** (``JetMoeMoE``, ``JetMoeMoA``) runs its experts (``JetMoeParallelExperts``: a stack ``(E, O, I)``,
one ``F.linear`` per expert) on token rows sorted by expert and scatters them back with ``index_add``.
:func:`jetmoe_moe_forward` writes the feed-forward mixture as the decorated experts above (``U`` read as
``(E 2I, H)``, ``D`` as ``(H, E I)``, routing weights ``r_te`` the softmax of the chosen router logits, 0
elsewhere). The mixture of attention heads keeps its two methods: :func:`jetmoe_moa_map` projects every token
with every expert's query weights and keeps, for each of its ``k`` slots, the chosen expert's (a product with
the constant one-hot choice ``c_tje``), and :func:`jetmoe_moa_reduce` sums the slots' outputs into their
experts, ``z_te = sum_j r_tj c_tje a_tj``, before one Linear layer ``D`` ``(H, E O)``; ``E`` times the query
projections' flops, ``E / k`` times the output projections'.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_flatness.functional.instance_forwards import instance_methods, replaceable
from lightning_flatness.functional.module_walk import modules_of
from lightning_flatness.functional.parameters import is_experts_module

__all__ = [
    "dense_experts",
    "dense_experts_forward",
    "is_jetmoe_mixture",
    "is_llama4_moe",
    "jetmoe_moa_map",
    "jetmoe_moa_reduce",
    "jetmoe_moe_forward",
    "llama4_moe_forward",
]

_INDEX_NAMES = ("top_k_index", "router_indices")
_WEIGHT_NAMES = ("top_k_weights", "routing_weights")


def _argument(args: tuple, kwargs: dict, position: int, names: tuple[str, ...]) -> Any:
    if len(args) > position:
        return args[position]
    return next((kwargs[n] for n in names if n in kwargs), None)


def _writes_out(module: nn.Module, hidden: Any, index: Any, weights: Any) -> bool:
    """Whether :func:`dense_experts_forward` covers this module and call (module docstring)."""
    stacks = ("gate_up_proj" if module.has_gate else "up_proj", "down_proj")
    return (
        not getattr(module, "has_post_expert_norm", False)
        and not getattr(module, "_is_expert_parallel", False)
        and all(isinstance(getattr(module, name, None), Tensor) for name in stacks)
        and isinstance(hidden, Tensor)
        and hidden.ndim == 2
        and isinstance(index, Tensor)
        and isinstance(weights, Tensor)
        and index.shape == weights.shape
        and index.ndim == 2
        and index.shape[0] == hidden.shape[0]
    )


def dense_experts_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
    """The experts module's function on ``hidden_states`` ``(S, H)`` routed by ``top_k_index`` and
    ``top_k_weights`` ``(S, k)``, as two Linear layers over every expert (module docstring); the class's own
    forward where it is not covered."""
    hidden = _argument(args, kwargs, 0, ("hidden_states",))
    index = _argument(args, kwargs, 1, _INDEX_NAMES)
    weights = _argument(args, kwargs, 2, _WEIGHT_NAMES)
    if not _writes_out(self, hidden, index, weights):
        return type(self).forward(self, *args, **kwargs)
    return _dense(self, hidden, index, weights)


def _dense(experts: Any, hidden: Tensor, index: Tensor, weights: Tensor) -> Tensor:
    """:func:`dense_experts_forward` on a call it covers (``experts``: the module, read by attribute)."""
    num, tokens = int(experts.num_experts), hidden.shape[0]
    choice = F.one_hot(index, num).to(weights.dtype)  # (S, k, E), a constant
    routing = (weights.unsqueeze(-1) * choice).sum(dim=1)  # (S, E): 0 for the experts not chosen
    has_bias = bool(getattr(experts, "has_bias", False))
    up: Tensor = experts.gate_up_proj if experts.has_gate else experts.up_proj  # (E, O, H)
    if experts.is_transposed:  # stored (E, H, O)
        up = up.transpose(1, 2)
    up_bias: Optional[Tensor] = None
    if has_bias:
        up_bias = (experts.gate_up_proj_bias if experts.has_gate else experts.up_proj_bias).reshape(-1)
    projected = F.linear(hidden.to(up.dtype), up.reshape(-1, up.shape[-1]), up_bias).view(tokens, num, -1)
    inner = experts._apply_gate(projected) if experts.has_gate else experts.act_fn(projected)  # (S, E, I)
    inner = inner * routing.unsqueeze(-1).to(inner.dtype)
    down: Tensor = experts.down_proj.transpose(1, 2) if experts.is_transposed else experts.down_proj
    out = F.linear(inner.reshape(tokens, -1), down.permute(1, 0, 2).reshape(down.shape[1], -1))  # (E, H, I)
    if has_bias:
        out = out + routing.to(out.dtype) @ experts.down_proj_bias
    return out.to(hidden.dtype)


def is_llama4_moe(module: nn.Module) -> bool:
    """Whether ``module`` is Llama 4's mixture-of-experts layer (``Llama4TextMoe``: a router returning sigmoid
    scores, experts with stacks ``gate_up_proj`` ``(E, H, 2I)`` and ``down_proj`` ``(E, I, H)``, a shared
    expert), which :func:`llama4_moe_forward` writes out."""
    if type(module).__name__ != "Llama4TextMoe":  # first: the lookups below fail on every other module
        return False
    experts: Any = getattr(module, "experts", None)
    return (
        all(hasattr(module, name) for name in ("router", "shared_expert", "hidden_dim"))
        and isinstance(getattr(experts, "gate_up_proj", None), Tensor)
        and isinstance(getattr(experts, "down_proj", None), Tensor)
        and experts.gate_up_proj.ndim == 3
        and experts.down_proj.ndim == 3
    )


def llama4_moe_forward(self: Any, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
    """Llama 4's ``Llama4TextMoe`` on ``hidden_states`` ``(..., H)``, token by token (module docstring):
    ``(tokens, H)`` and the router logits, as the model's own forward returns them."""
    hidden = hidden_states.reshape(-1, self.hidden_dim)
    scores, router_logits = self.router(hidden)  # (T, E), 0 for the experts not chosen
    experts = self.experts
    up: Tensor = experts.gate_up_proj  # (E, H, 2I)
    num, width = up.shape[0], up.shape[2]
    projected = F.linear(hidden, up.transpose(1, 2).reshape(num * width, -1)).view(-1, num, width)
    projected = projected * scores.unsqueeze(-1).to(projected.dtype)  # (s x) U = s (x U)
    gate, value = projected.chunk(2, dim=-1)
    inner = value * experts.act_fn(gate)  # (T, E, I)
    down: Tensor = experts.down_proj  # (E, I, H)
    routed = F.linear(inner.reshape(inner.shape[0], -1), down.reshape(-1, down.shape[2]).T)
    return self.shared_expert(hidden) + routed, router_logits


def is_jetmoe_mixture(module: nn.Module) -> bool:
    """Whether ``module`` is one of JetMoE's mixtures (``JetMoeMoE`` or ``JetMoeMoA``: a top-``k`` router with
    a Linear ``layer``, parallel experts ``input_linear`` and ``output_linear`` holding ``(E, O, I)`` stacks,
    an output bias), which :func:`jetmoe_moe_forward` or :func:`jetmoe_moa_map` and
    :func:`jetmoe_moa_reduce` write out."""
    if type(module).__name__ not in ("JetMoeMoE", "JetMoeMoA"):  # first: the lookups below fail elsewhere
        return False
    router: Any = getattr(module, "router", None)
    stacks = [getattr(getattr(module, n, None), "weight", None) for n in ("input_linear", "output_linear")]
    return (
        isinstance(getattr(router, "layer", None), nn.Linear)
        and isinstance(getattr(router, "top_k", None), int)
        and all(isinstance(w, Tensor) and w.ndim == 3 for w in stacks)
        and isinstance(getattr(module, "bias", None), Tensor)
    )


def _jetmoe_routing(router: Any, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """JetMoE's router (``JetMoeTopKGating``) on ``hidden`` ``(T, H)``: the chosen experts ``(T, k)``, their
    weights ``(T, k)`` (a softmax over the chosen logits, computed in float32 as the router does) and the
    router logits ``(T, E)``, as the model's own forward returns them."""
    logits = router.layer(hidden).float()
    index = logits.topk(router.top_k, dim=1).indices  # a locally constant choice
    weights = torch.softmax(logits.gather(1, index), dim=1).type_as(hidden)
    return index, weights, logits


def _as_columns(stack: Tensor) -> Tensor:
    """An ``(E, O, I)`` expert stack as one ``(O, E I)`` weight (a permuted copy of the parameter that
    autograd pulls back exactly): the output layer of every expert at once."""
    return stack.permute(1, 0, 2).reshape(stack.shape[1], -1)


def jetmoe_moe_forward(self: Any, layer_input: Tensor) -> Tensor:
    """JetMoE's feed-forward mixture (``JetMoeMoE``) on ``layer_input`` ``(B, L, H)``, every expert on every
    token, weighted by its routing weight (0 for the experts not chosen; module docstring): ``(B, L, H)``."""
    batch, length, width = layer_input.shape
    hidden = layer_input.reshape(-1, width)
    index, weights, _ = _jetmoe_routing(self.router, hidden)
    routing = (weights.unsqueeze(-1) * F.one_hot(index, self.router.num_experts).to(weights.dtype)).sum(dim=1)
    up: Tensor = self.input_linear.weight  # (E, 2I, H)
    projected = F.linear(hidden, up.reshape(-1, up.shape[-1])).view(hidden.shape[0], up.shape[0], -1)
    gate, value = projected.chunk(2, dim=-1)
    inner = self.activation(gate) * value * routing.unsqueeze(-1)  # (T, E, I)
    out = F.linear(inner.reshape(hidden.shape[0], -1), _as_columns(self.output_linear.weight))
    return out.view(batch, length, width) + self.bias


def jetmoe_moa_map(self: Any, layer_input: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """JetMoE's mixture of attention heads (``JetMoeMoA.map``) on ``layer_input`` ``(B, L, H)``: each of the
    ``k`` slots' query projections by its chosen expert ``(B, L, k, O)``, the router logits, and the routing
    (choices and weights, read by :func:`jetmoe_moa_reduce` only)."""
    batch, length, width = layer_input.shape
    hidden = layer_input.reshape(-1, width)
    index, weights, logits = _jetmoe_routing(self.router, hidden)
    up: Tensor = self.input_linear.weight  # (E, O, H)
    every = F.linear(hidden, up.reshape(-1, up.shape[-1])).view(hidden.shape[0], up.shape[0], -1)  # (T, E, O)
    choice = F.one_hot(index, up.shape[0]).to(every.dtype)  # (T, k, E), a constant
    slots = (choice.unsqueeze(-1) * every.unsqueeze(1)).sum(dim=2)  # (T, k, O)
    return slots.view(batch, length, self.top_k, -1), logits, (index, weights)


def jetmoe_moa_reduce(self: Any, layer_input: Tensor, topo_info: tuple[Tensor, Tensor]) -> Tensor:
    """``JetMoeMoA.reduce`` after :func:`jetmoe_moa_map`: the slots' outputs ``(B, L, k, O)`` weighted by
    their routing weights and summed into their experts' columns, then every expert's output projection at
    once: ``(B, L, H)``."""
    batch, length, slots, width = layer_input.shape
    index, weights = topo_info
    down: Tensor = self.output_linear.weight  # (E, H, O)
    choice = F.one_hot(index, down.shape[0]).to(layer_input.dtype)  # (T, k, E)
    mixed = choice * weights.unsqueeze(-1).to(layer_input.dtype)  # r_tj c_tje
    per_expert = (mixed.unsqueeze(-1) * layer_input.reshape(-1, slots, 1, width)).sum(dim=1)  # (T, E, O)
    out = F.linear(per_expert.reshape(per_expert.shape[0], -1), _as_columns(down))
    return out.view(batch, length, -1) + self.bias


def _rewrites(module: nn.Module) -> list[tuple[nn.Module, str, Callable[..., Any]]]:
    """The methods of ``module`` :func:`dense_experts` replaces (none where it is not a mixture it writes out,
    or a JetMoE attention mixture of which one of ``map`` and ``reduce`` is replaced already)."""
    if is_llama4_moe(module):
        return [(module, "forward", llama4_moe_forward)]
    if is_experts_module(module):
        return [(module, "forward", dense_experts_forward)]
    if not is_jetmoe_mixture(module):
        return []
    if type(module).__name__ == "JetMoeMoE":
        return [(module, "forward", jetmoe_moe_forward)]
    if replaceable(module, "map") and replaceable(module, "reduce"):  # the two share their routing
        return [(module, "map", jetmoe_moa_map), (module, "reduce", jetmoe_moa_reduce)]
    return []


@contextlib.contextmanager
def dense_experts(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every experts module of ``model``
    (:func:`~lightning_flatness.functional.parameters.is_experts_module`) runs :func:`dense_experts_forward`
    where it covers the call, every Llama 4 mixture-of-experts layer (:func:`is_llama4_moe`) runs
    :func:`llama4_moe_forward`, and JetMoE's mixtures (:func:`is_jetmoe_mixture`) run
    :func:`jetmoe_moe_forward` or :func:`jetmoe_moa_map` and :func:`jetmoe_moa_reduce`; restored exactly on
    exit (:mod:`.instance_forwards`).

    Example:
        >>> import torch
        >>> class Experts(torch.nn.Module):  # the attributes of Hugging Face's experts modules
        ...     num_experts, has_gate, is_transposed, has_bias = 3, False, False, False
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.up_proj = torch.nn.Parameter(torch.randn(3, 4, 2))
        ...         self.down_proj = torch.nn.Parameter(torch.randn(3, 2, 4))
        ...         self.act_fn = torch.nn.ReLU()
        ...     def forward(self, x, index, weights):  # the routed computation
        ...         out = torch.zeros_like(x)
        ...         for t in range(x.shape[0]):
        ...             for j, e in enumerate(index[t].tolist()):
        ...                 h = self.act_fn(self.up_proj[e] @ x[t])
        ...                 out[t] = out[t] + weights[t, j] * (self.down_proj[e] @ h)
        ...         return out
        >>> experts, x = Experts(), torch.randn(5, 2)
        >>> index, weights = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0]]), torch.rand(5, 2)
        >>> with dense_experts(experts):
        ...     dense = experts(x, index, weights)
        >>> torch.allclose(dense, experts(x, index, weights), atol=1e-6)
        True
    """
    with instance_methods(r for m in modules_of(model) for r in _rewrites(m)):
        yield model
