"""Which parameters the normalized measures count (Tsuzuku et al. 2020, footnote 5)."""

from __future__ import annotations

from typing import Callable, Iterable, Union

from torch import Tensor, nn

__all__ = ["select_parameters", "ParameterSelection"]

ParameterSelection = Union[None, Iterable[str], Callable[[str, Tensor], bool]]


def select_parameters(model: nn.Module, parameters: ParameterSelection = None) -> dict[str, nn.Parameter]:
    """The weight tensors whose sharpness is measured, keyed by name as in ``model.named_parameters()``.

    Default: every parameter with ``ndim >= 2`` that requires grad (Linear and Conv weights).
    Biases, normalisation scales and other 1-D parameters are left out: with one variance per row
    they reduce to parameter counting (footnote 5). Frozen parameters are skipped. A parameter
    shared between modules appears once, under its first name (``named_parameters`` deduplicates).

    Args:
        model: the network.
        parameters: ``None`` for the default; an iterable of parameter names; or a predicate
            ``(name, parameter) -> bool`` applied to the default candidates' superset (all
            parameters requiring grad).

    Returns:
        Ordered ``{name: parameter}``.

    Raises:
        ValueError: a name is unknown or names a 1-D / frozen parameter, or nothing is selected.
    """
    named = dict(model.named_parameters())
    if parameters is None:
        chosen = {n: p for n, p in named.items() if p.requires_grad and p.ndim >= 2}
    elif callable(parameters):
        chosen = {n: p for n, p in named.items() if p.requires_grad and parameters(n, p)}
    else:
        if isinstance(parameters, str):
            raise TypeError(f"`parameters` must be an iterable of names, got the string {parameters!r}; "
                            f"wrap it in a list: parameters=[{parameters!r}].")
        chosen = {}
        for name in parameters:
            if name not in named:
                raise ValueError(f"`parameters` names {name!r}, which is not a parameter of "
                                 f"{type(model).__name__}; choose from {sorted(named)}.")
            if not named[name].requires_grad:
                raise ValueError(f"parameter {name!r} of {type(model).__name__} does not require grad; "
                                 f"unfreeze it or leave it out of `parameters`.")
            chosen[name] = named[name]
    bad = [n for n, p in chosen.items() if p.ndim < 2]
    if bad:
        raise ValueError(f"normalized sharpness needs weight tensors with ndim >= 2 (rows x columns), "
                         f"but {bad} are 1-D (footnote 5 leaves biases out); drop them from `parameters`.")
    if not chosen:
        raise ValueError(f"found no weight tensors with ndim >= 2 requiring grad in {type(model).__name__}; "
                         f"pass `parameters=` to choose them.")
    return chosen
