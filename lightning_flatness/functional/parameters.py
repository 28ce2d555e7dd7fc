r"""Which parameters the measures count (Tsuzuku et al. 2020, footnote 5 and Sec. 5.1).

Eq. 17 gives a weight tensor :math:`W` one posterior variance per row and per column,
:math:`\sigma_{ij} = s_i s'_j`. That structure is the neuron-wise rescaling symmetry of a weight
that *multiplies* its input: scaling output unit :math:`i` of a ReLU layer by :math:`a_i > 0` and
the next layer's input column :math:`i` by :math:`1/a_i` leaves the network's function unchanged,
and the optimal :math:`s_i, s'_j` absorb exactly these factors (Sec. 5.1). Footnote 5 leaves out
biases: an *added* vector has no input axis, and a variance per entry turns the bound into counting
parameters.

What that means for the tensors of modern networks (the default selection):

- **Counted** -- Linear and Conv weights (rows = output units, columns = input units / channels);
  Hugging Face ``Conv1D`` (GPT-2); **word and token-type embedding tables**: a lookup
  ``E[ids]`` is ``one_hot(ids) @ E``, a linear layer on one-hot inputs whose rows are vocabulary
  entries and columns hidden units, with the same per-unit rescaling structure as a first layer;
  a **tied LM head** is the same tensor, counted once under its first name (its Hessian diagonal
  includes both uses, as it must); any other ``ndim >= 2`` parameter of a module we do not know.
- **Left out** -- **additive offsets**, which behave like biases (footnote 5): timm's ``pos_embed``
  and ``cls_token`` (also ``dist_token``, ``reg_token``, ``mask_token``; DINOv2's ``register_tokens``),
  torchvision's ``class_token`` and ``pos_embedding``, CLIP's ``class_embedding``, Hugging Face learned
  position embeddings (``position_embeddings``, ``wpe``, ``embed_positions``) and relative-position
  bias tables. A position lookup multiplies a one-hot vector that is *the same for every sample*,
  so it is a bias indexed by position; its "rows" are positions, not units of any layer, and no
  rescaling symmetry acts on them. Read as eq. 17 reads an ``ndim >= 3`` tensor (one variance per
  dim 0 and dim 1 entry, the rest a kernel), timm's ``pos_embed`` ``(1, T, D)`` would get a single
  "row" variance, one "column" variance per *position* and none per channel, the one axis that
  is a unit axis; ``cls_token`` ``(1, 1, D)`` a single variance. Counted, they
  would add a few percent to the totals of the tiny zoo models (measured:
  ``benchmarks/results/bench_zoo_residual.md``); and the finite-difference estimator, whose step is
  relative to a tensor's size, breaks down on ``cls_token`` (initialised at scale 1e-6).
- **Trace only** -- 1-D parameters that a layer rule reads
  (:mod:`~lightning_flatness.functional.estimators.layer_rules`): the biases of Linear and Conv
  layers and the affine scales and shifts of BatchNorm, LayerNorm, GroupNorm and RMSNorm. The
  Hessian trace of eq. 5 counts every parameter, so they are selected and enter ``hessian_trace``;
  the normalized measures (eq. 13, 17) skip every 1-D tensor (footnote 5): an added vector has no
  input axis, and a per-channel scale is a diagonal matrix, with one variance per entry parameter
  counting again. Their Gauss-Newton diagonal costs a few elementwise passes (the layer rules keep
  the per-layer fast path). The trace over the weight tensors alone is reported beside it, as
  ``hessian_trace_weights``.
- **Stacks of expert matrices** -- a mixture-of-experts layer stores its experts' weights as one tensor
  ``(E, O, I)`` (Hugging Face's experts modules: Mixtral, Qwen-MoE, OLMoE, DeepSeek, GPT-OSS, ...; Llama 4's
  and JetMoE's experts; found by the module's ``num_experts``), and their biases as ``(E, O)``. Each
  expert is a weight matrix of its own, with its own neuron-wise rescaling symmetry (scaling expert
  ``e``'s hidden unit ``i`` and the matching input column of its output projection leaves the network's
  function unchanged, whatever the other experts do). Read as
  eq. 17 reads an ``ndim >= 3`` tensor, the stack would get one variance per *expert* and per output
  unit shared by all experts, with the input units as a kernel: no symmetry of the network acts on
  those axes, so the value would change under the rescaling of one expert. The measures therefore count
  each expert as its own tensor, ``"<name>.<e>"`` (:func:`matrix_stacks`, :func:`split_matrix_stacks`):
  eq. 13 and 17 per expert matrix (summed in the totals, like any weight matrices), and the bias
  stacks' rows as biases (trace only). The Hessian diagonal is estimated for the whole stack, as the
  model holds it; only the measures' layout changes.
- **Left out** -- 1-D parameters that no layer rule reads, e.g. layer-scale vectors (``gamma``,
  used through an elementwise product): their diagonal would send the estimators to the per-sample
  path (``N K`` backward passes instead of one). ``parameters="all"`` selects them too, at that cost.
  The same holds for vectors stored with unit dims (at most one dim above 1, and not the weight of a
  Linear/Conv or an embedding table): torchvision's ConvNeXt ``layer_scale`` ``(C, 1, 1)``, EdgeNeXt's
  attention ``temperature`` ``(heads, 1, 1)`` (:func:`is_vector_shaped`).

Detection of additive offsets is by name, for parameters that are *not* the weight of a
``Linear``/``Conv``: a name component containing ``pos_embed``, ``position``, ``wpe``,
``cls_token``, ``class_token``, ``class_embedding``, ``dist_token``, ``reg_token``, ``register_token``,
``mask_token``, ``relative_attention_bias`` or ``ngram_embeddings`` (ProphetNet's predicting streams)
(:data:`ADDITIVE_OFFSET_MARKERS`). Linear and Conv weights always count, whatever their name.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Mapping, Union

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

__all__ = [
    "is_experts_module",
    "matrix_stacks",
    "select_parameters",
    "split_matrix_stacks",
    "ParameterSelection",
    "ADDITIVE_OFFSET_MARKERS",
    "is_additive_offset",
    "is_rule_read_vector",
    "is_vector_shaped",
    "uninitialized_parameters",
]

ParameterSelection = Union[None, str, Iterable[str], Callable[[str, Tensor], bool]]
#: ``{name: E}``: parameters that are stacks of ``E`` independent tensors along dim 0 (:func:`matrix_stacks`)
MatrixStacks = dict[str, int]

#: Substrings of a name component that mark an additive offset (position embeddings, class tokens).
ADDITIVE_OFFSET_MARKERS = (
    "pos_embed",
    "position",
    "wpe",
    "cls_token",
    "class_token",
    "class_embedding",
    "dist_token",
    "reg_token",
    "register_token",  # Hugging Face's DINOv2 with registers: (1, registers, D), concatenated to the tokens
    "mask_token",
    "relative_attention_bias",
    "ngram_embeddings",  # ProphetNet's: one row per predicting stream, added to every sample's positions
)

_MULTIPLYING = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)
#: modules whose 1-D parameters a layer rule reads (bias of a Linear/Conv, affine of a normalization)
_RULE_READ_VECTORS = (
    nn.Linear,
    nn.MultiheadAttention,  # in_proj_bias: a Linear bias in the written-out forward (composite_attention)
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
)
_PRESETS = ("weights", "all")


def _submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)`` (``model`` for ``""``), also for a TorchScript module
    (``torch.jit.script``), which has no ``get_submodule``: its submodules by walking the attributes."""
    if not path:
        return model
    if not isinstance(model, torch.jit.ScriptModule):
        return model.get_submodule(path)
    owner = model
    for part in path.split("."):
        owner = getattr(owner, part)
    return owner


def _parameter(model: nn.Module, name: str) -> nn.Parameter:
    """``model.get_parameter(name)``, also for a TorchScript module (see :func:`_submodule`)."""
    owner_path, _, leaf = name.rpartition(".")
    return getattr(_submodule(model, owner_path), leaf)


def _is(owner: nn.Module, classes: Union[type, tuple[type, ...]]) -> bool:
    """``isinstance(owner, classes)``, with a TorchScript module (scripted or traced) taken for the
    ``torch.nn`` module it was compiled from (its ``original_name``: ``"Linear"``, ``"Conv2d"``, ...), so
    that a compiled network's parameters are selected as the eager network's are."""
    if isinstance(owner, torch.jit.ScriptModule):
        eager = getattr(nn, str(getattr(owner, "original_name", "")), None)
        return isinstance(eager, type) and issubclass(eager, classes)
    return isinstance(owner, classes)


def is_additive_offset(model: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` of ``model`` is an additive offset (position embedding, class
    token; module docstring): not the weight of a Linear/Conv, and a name component contains one of
    :data:`ADDITIVE_OFFSET_MARKERS`."""
    owner_path, _, leaf = name.rpartition(".")
    owner = _submodule(model, owner_path)
    return _is_additive_offset(owner, name, _unpruned(owner, leaf))


def _unpruned(owner: nn.Module, leaf: str) -> str:
    """The attribute a parameter of ``torch.nn.utils.prune`` stands for: ``weight_orig`` beside the buffer
    ``weight_mask`` (a pruned ``weight``, Lightning's ``ModelPruning`` prunes biases too) -> ``weight``;
    any other name as it is. The layer rules read the masked tensor, a function of the parameter."""
    base = leaf.removesuffix("_orig")
    return base if base != leaf and f"{base}_mask" in getattr(owner, "_buffers", {}) else leaf


def _is_additive_offset(owner: nn.Module, name: str, leaf: str) -> bool:
    if _is(owner, _MULTIPLYING) and leaf == "weight":
        return False
    return any(marker in part.lower() for part in name.split(".") for marker in ADDITIVE_OFFSET_MARKERS)


def is_vector_shaped(model: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` is a vector stored with unit dims (at most one dim above 1, e.g. a
    layer scale ``(C, 1, 1)``) and not the weight of a Linear/Conv or an embedding table: a per-channel
    scale or offset, left out of the default selection like a 1-D one (module docstring)."""
    owner_path, _, leaf = name.rpartition(".")
    owner = _submodule(model, owner_path)
    return _is_vector_shaped(owner, _unpruned(owner, leaf), _parameter(model, name))


def _is_vector_shaped(owner: nn.Module, leaf: str, param: Tensor) -> bool:
    if sum(size > 1 for size in param.shape) > 1:
        return False
    return not (_is(owner, (*_MULTIPLYING, nn.Embedding)) and leaf == "weight")


def is_rule_read_vector(model: nn.Module, name: str) -> bool:
    """Whether 1-D parameter ``name`` is the bias of a ``Linear``/``Conv`` (or the input projection's of an
    ``nn.MultiheadAttention``) or an affine parameter of a
    ``BatchNorm``/``LayerNorm``/``GroupNorm``/``RMSNorm`` (subclasses included): a parameter a layer
    rule reads, so that its Hessian diagonal keeps the estimators' per-layer fast path. Another vector a
    subclass of these modules adds (Dory's ``DoryLMHead``, a ``Linear`` with a per-token ``logit_scale``
    multiplying its output) is not read by a rule."""
    owner_path, _, leaf = name.rpartition(".")
    owner = _submodule(model, owner_path)
    return _is_rule_read_vector(owner, _unpruned(owner, leaf))


def _is_rule_read_vector(owner: nn.Module, leaf: str) -> bool:
    if _is(owner, nn.MultiheadAttention):
        return leaf == "in_proj_bias"
    if _is(owner, (nn.Linear, nn.modules.conv._ConvNd)):
        return leaf == "bias"  # not another vector a subclass adds (Dory's per-token logit scale)
    return _is(owner, _RULE_READ_VECTORS) and leaf in ("weight", "bias")


def _named_parameters_with_owners(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
    """``(name, owning module, attribute, parameter)`` in the order and with the deduplication of
    ``model.named_parameters()``, in one walk of the modules (no lookup of each owner by its path)."""
    if isinstance(model, torch.jit.ScriptModule) or type(model).named_parameters is not _NAMED_PARAMETERS:
        for name, p in model.named_parameters():  # a wrapper's own naming (FSDP1), TorchScript's modules
            owner_path, _, leaf = name.rpartition(".")
            yield name, _submodule(model, owner_path), leaf, p
        return
    seen: set[Tensor] = set()
    for path, module in model.named_modules():
        for leaf, p in module._parameters.items():
            if p is None or p in seen:
                continue
            seen.add(p)
            yield (f"{path}.{leaf}" if path else leaf), module, leaf, p


_NAMED_PARAMETERS = nn.Module.named_parameters


def uninitialized_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``model`` that lazy modules (``nn.LazyLinear``, ...) have not
    created yet (``torch.nn.parameter.is_lazy``): their first forward creates them."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, t in tensors if is_lazy(t)]


def select_parameters(model: nn.Module, parameters: ParameterSelection = None) -> dict[str, nn.Parameter]:
    """The tensors whose Hessian diagonal (and sharpness) is measured, keyed as in
    ``model.named_parameters()``.

    Frozen parameters, and parameters without entries (a dim of size 0: MobileBERT's LM-head extension where
    its embedding is as wide as its hidden state), are skipped by the presets and the predicate. A parameter
    shared between modules (a tied LM head) appears once, under its first name (``named_parameters``
    deduplicates).
    This function does not require ``ndim >= 2``: any parameter has a Hessian diagonal. The
    normalized measures (eq. 13, 17) need ``ndim >= 2`` and say so (:func:`sharpness_measures`).

    Args:
        model: the network.
        parameters: one of

            - ``None`` (default): every parameter with ``ndim >= 2`` that requires grad, except
              additive offsets (position embeddings, class tokens) and vectors stored with unit
              dims (:func:`is_vector_shaped`): the weights that multiply their
              input, embedding tables included; and the 1-D parameters a layer rule reads (biases
              of Linear/Conv, affine parameters of normalization layers), which enter the Hessian
              trace (eq. 5) only (module docstring: the reasoning);
            - ``"weights"``: every parameter with ``ndim >= 2`` that requires grad (the default
              before additive offsets were left out; counts ``pos_embed`` and ``cls_token``);
            - ``"all"``: every parameter that requires grad (the normalized measures skip the
              1-D ones; layer-scale vectors and class tokens cost the per-sample path);
            - an iterable of parameter names (an empty or frozen one is refused);
            - a predicate ``(name, parameter) -> bool`` applied to every parameter requiring grad.

    Returns:
        Ordered ``{name: parameter}``.

    Raises:
        ValueError: a name is unknown or names a frozen parameter, an unknown preset, or nothing is
            selected.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> list(select_parameters(model, "weights")), len(select_parameters(model))
        (['0.weight', '2.weight'], 4)
    """
    if parameters is not None and not isinstance(parameters, str) and not callable(parameters):
        parameters = list(parameters)  # names: read twice below
    try:
        owned = [
            (n, owner, leaf, p)
            for n, owner, leaf, p in _named_parameters_with_owners(model)
            if p.numel() > 0 or _named_explicitly(parameters, n)
        ]
    except ValueError:  # UninitializedParameter.numel()
        lazy = uninitialized_parameters(model)
        if not lazy:
            raise
        raise ValueError(
            f"the model's lazy modules have not created their parameters yet ({lazy[:5]}, "
            f"{len(lazy)} in all): a lazy module creates them in its first forward; run the model on a "
            "batch once before measuring it."
        ) from None
    named = {n: p for n, _, _, p in owned}
    if parameters is None:
        chosen = {
            n: p
            for n, owner, leaf, p in owned
            if p.requires_grad
            and (
                p.ndim >= 2
                and not _is_additive_offset(owner, n, _unpruned(owner, leaf))
                and not _is_vector_shaped(owner, _unpruned(owner, leaf), p)
                or p.ndim < 2
                and _is_rule_read_vector(owner, _unpruned(owner, leaf))
            )
        }
    elif isinstance(parameters, str):
        if parameters not in _PRESETS:
            raise ValueError(
                f"`parameters` got the string {parameters!r}; the presets are {_PRESETS} (or None "
                f"for the default). To choose one tensor by name wrap it in a list: "
                f"parameters=[{parameters!r}]."
            )
        chosen = {n: p for n, p in named.items() if p.requires_grad and (parameters == "all" or p.ndim >= 2)}
    elif callable(parameters):
        chosen = {n: p for n, p in named.items() if p.requires_grad and parameters(n, p)}
    else:
        chosen = {}
        for name in parameters:
            if name not in named:
                raise ValueError(
                    f"`parameters` names {name!r}, which is not a parameter of "
                    f"{type(model).__name__}; choose from {sorted(named)}."
                )
            if not named[name].requires_grad:
                raise ValueError(
                    f"parameter {name!r} of {type(model).__name__} does not require grad; "
                    f"unfreeze it or leave it out of `parameters`."
                )
            if named[name].numel() == 0:
                raise ValueError(
                    f"parameter {name!r} of {type(model).__name__} has no entries (shape "
                    f"{tuple(named[name].shape)}): it has no curvature; leave it out of `parameters`."
                )
            chosen[name] = named[name]
    if not chosen:
        raise ValueError(
            f"found no parameters to measure in {type(model).__name__} (the default takes "
            f"weight tensors with ndim >= 2 that require grad and are not position embeddings or class "
            f"tokens, and the biases and normalization parameters beside them); pass `parameters=` to "
            f"choose them."
        )
    return chosen


def _named_explicitly(parameters: ParameterSelection, name: str) -> bool:
    """Whether ``parameters``, a list of names, holds ``name`` (an empty tensor named there is refused with a
    clear error; the presets and predicates skip empty tensors)."""
    return isinstance(parameters, list) and name in parameters


def is_experts_module(module: nn.Module) -> bool:
    """A mixture-of-experts container as Hugging Face's ``use_experts_implementation`` decorator builds it:
    an int ``num_experts`` and the decorator's ``has_gate`` and ``is_transposed`` flags (a router, which
    has ``num_experts`` too, is a plain Linear-like layer and has neither)."""
    return (
        isinstance(_plain_attribute(module, "num_experts"), int)
        and isinstance(_plain_attribute(module, "has_gate"), bool)
        and isinstance(_plain_attribute(module, "is_transposed"), bool)
    )


def _plain_attribute(module: nn.Module, name: str) -> object:
    """``getattr(module, name, None)`` for an attribute that is neither a parameter, a buffer nor a submodule
    (an int, a flag): read from the instance or its class, without ``nn.Module.__getattr__``'s failed lookups
    (an exception per module without it, in a walk over every module of a network)."""
    value = module.__dict__.get(name, _MISSING)
    return getattr(type(module), name, None) if value is _MISSING else value


_MISSING = object()


def matrix_stacks(model: nn.Module, names: Iterable[str]) -> MatrixStacks:
    """The parameters among ``names`` that are stacks of independent expert tensors along dim 0 (module
    docstring): ``{name: E}`` for each parameter with ``E = num_experts`` (an int attribute of the module
    that holds it) rows along dim 0 and either ``ndim >= 3`` (a weight stack: Hugging Face's experts
    modules, Llama 4's, JetMoE's parallel experts) or ``ndim == 2`` in one of Hugging Face's decorated
    experts modules (:func:`is_experts_module`: a bias stack; elsewhere an ``(E, H)`` weight is a router's,
    a Linear layer with one output per expert). Empty for other models.

    Example:
        >>> import torch
        >>> class Experts(torch.nn.Module):  # the attributes of Hugging Face's experts modules
        ...     num_experts, has_gate, is_transposed = 4, True, False
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.gate_up_proj = torch.nn.Parameter(torch.zeros(4, 6, 5))
        >>> model = torch.nn.ModuleDict({"experts": Experts(), "router": torch.nn.Linear(5, 4)})
        >>> matrix_stacks(model, ["experts.gate_up_proj", "router.weight"])
        {'experts.gate_up_proj': 4}
    """
    stacks: MatrixStacks = {}
    for name in names:
        owner_path, _, leaf = name.rpartition(".")
        owner = _submodule(model, owner_path)
        param = getattr(owner, leaf, None)
        experts = getattr(owner, "num_experts", None)
        if (
            isinstance(experts, int)
            and isinstance(param, Tensor)
            and param.ndim >= 2
            and param.shape[0] == experts
            and (param.ndim >= 3 or is_experts_module(owner))
        ):
            stacks[name] = experts
    return stacks


def split_matrix_stacks(
    tensors: Mapping[str, Tensor], stacks: MatrixStacks, dim: int = 0
) -> dict[str, Tensor]:
    """``tensors`` with each stack of :func:`matrix_stacks` replaced by its ``E`` slices along ``dim``, named
    ``"<name>.<e>"`` (views, no copy; ``dim=1`` for per-group estimates ``(G, E, ...)``), in place of the
    stack and in its order: what the measures count (module docstring).

    Example:
        >>> import torch
        >>> out = split_matrix_stacks({"a": torch.zeros(3), "w": torch.zeros(2, 4, 5)}, {"w": 2})
        >>> {k: tuple(v.shape) for k, v in out.items()}
        {'a': (3,), 'w.0': (4, 5), 'w.1': (4, 5)}
    """
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        if name in stacks:
            if t.shape[dim] != stacks[name]:
                raise ValueError(
                    f"{name!r} is a stack of {stacks[name]} expert tensors, but its dim {dim} has size "
                    f"{t.shape[dim]} (shape {tuple(t.shape)})."
                )
            out.update({f"{name}.{e}": part for e, part in enumerate(t.unbind(dim))})
        else:
            out[name] = t
    return out
