"""The one place where Hessian-diagonal estimators are registered.

Each estimator is one module with one function of the contract in ``docs/design.md``
(``fn(model, loss_fn, inputs, target, params, **options) -> {name: diag}``) and one
:class:`EstimatorSpec` entry in :data:`ESTIMATORS`; :func:`~.api.hessian_diagonal_groups` looks the
method up here instead of branching on its name. Adding an estimator is one file plus one
:func:`register_estimator` call (BackPACK's module-extension dicts are the model).

The function is imported lazily (``"package.module:function"``), so registering costs nothing and
optional dependencies of one estimator never block the others.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

__all__ = ["ESTIMATORS", "EstimatorSpec", "OPTION_NAMES", "OnePassGroups", "register_estimator"]

#: Keyword options that :func:`~.api.hessian_diagonal_groups` can pass on to an estimator function.
OPTION_NAMES = ("num_probes", "generator", "strict", "relative_step", "num_mc_samples", "num_sketches")


class OnePassGroups(NamedTuple):
    """What an :attr:`EstimatorSpec.groups_target` function returns where its one pass applies.

    Attributes:
        groups: ``{name: (G, *shape)}``, each group's estimate of the Hessian diagonal of its mean loss.
        max_samples: the most samples of this model (and loss) that one pass takes: the pass's own bound on
            its size (memory and speed), from which a caller may fetch larger batches than this one.
    """

    groups: dict[str, Any]
    max_samples: int


@dataclass(frozen=True)
class EstimatorSpec:
    """What the front door needs to know about one estimator.

    Attributes:
        name: the ``method=`` string.
        target: ``"module.path:function"`` implementing the estimator contract.
        quantity: what the estimate's expectation is: ``"hessian"`` (the Hessian diagonal) or
            ``"gauss_newton"`` (the generalized Gauss-Newton diagonal, equal to the Hessian
            diagonal only for networks linear in each weight). Logged with the values, so a curve
            says which curvature it shows.
        stochastic: whether it draws random probes (then it takes ``num_probes``/``generator`` or
            ``num_mc_samples``/``generator``, and its error bars include probe noise).
        options: the names in :data:`OPTION_NAMES` that the function accepts.
        splits_probes: whether ``num_probes`` counts probes over all sample groups (divided among
            them, so it must be a multiple of the number of groups).
        groups_target: optionally, ``"module.path:function"`` estimating several contiguous sample groups
            of one batch in one pass, ``fn(model, loss_fn, inputs, target, params, num_groups) ->``
            :class:`OnePassGroups`, or ``None`` where it does not apply (then the groups go one by one to
            ``target``); equal, up to rounding, to ``target`` on each group.
    """

    name: str
    target: str
    quantity: str
    stochastic: bool
    options: tuple[str, ...] = ()
    splits_probes: bool = False
    groups_target: Optional[str] = None

    def __post_init__(self) -> None:
        if self.quantity not in ("hessian", "gauss_newton"):
            raise ValueError(
                f"EstimatorSpec {self.name!r}: quantity must be 'hessian' or 'gauss_newton', "
                f"got {self.quantity!r}."
            )
        unknown = set(self.options) - set(OPTION_NAMES)
        if unknown:
            raise ValueError(
                f"EstimatorSpec {self.name!r} names unknown options {sorted(unknown)}; "
                f"choose from {OPTION_NAMES}."
            )
        for target in (self.target, self.groups_target):
            if target is not None and ":" not in target:
                raise ValueError(
                    f"EstimatorSpec {self.name!r}: targets must be 'module.path:function', got {target!r}."
                )

    def load(self) -> Callable:
        """The estimator function (imported on first use)."""
        return _imported(self.target)

    def load_groups(self) -> Optional[Callable]:
        """The function of ``groups_target`` (imported on first use), or None."""
        return None if self.groups_target is None else _imported(self.groups_target)


def _imported(target: str) -> Callable:
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


#: ``{method name: spec}``, in the order the methods are documented.
ESTIMATORS: dict[str, EstimatorSpec] = {}


def register_estimator(spec: EstimatorSpec, *, replace: bool = False) -> EstimatorSpec:
    """Add ``spec`` to :data:`ESTIMATORS` (``replace=True`` to override an existing name)."""
    if spec.name in ESTIMATORS and not replace:
        raise ValueError(
            f"an estimator named {spec.name!r} is already registered; pass replace=True to "
            "override it or choose another name."
        )
    ESTIMATORS[spec.name] = spec
    return spec


_PKG = "lightning_flatness.functional.estimators"
register_estimator(
    EstimatorSpec(
        "exact",
        f"{_PKG}.exact:exact_hessian_diagonal",
        "hessian",
        stochastic=False,
        options=("strict",),
        groups_target=f"{_PKG}.exact_groups:exact_hessian_diagonal_groups",
    )
)
register_estimator(
    EstimatorSpec(
        "ggn_hutchinson",
        f"{_PKG}.ggn_hutchinson:ggn_hutchinson_hessian_diagonal",
        "hessian",
        stochastic=True,
        options=("num_probes", "generator"),
        splits_probes=True,
    )
)
register_estimator(
    EstimatorSpec(
        "hutchinson",
        f"{_PKG}.hutchinson:hutchinson_hessian_diagonal",
        "hessian",
        stochastic=True,
        options=("num_probes", "generator"),
        splits_probes=True,
    )
)
register_estimator(
    EstimatorSpec(
        "finite_difference",
        f"{_PKG}.finite_difference:finite_difference_hessian_diagonal",
        "hessian",
        stochastic=True,
        options=("num_probes", "generator", "relative_step"),
        splits_probes=True,
    )
)
register_estimator(
    EstimatorSpec(
        "gauss_newton_mc",
        f"{_PKG}.gauss_newton_mc:gauss_newton_mc_diagonal",
        "gauss_newton",
        stochastic=True,
        options=("num_mc_samples", "generator"),
    )
)
register_estimator(
    EstimatorSpec(
        "gauss_newton", f"{_PKG}.gauss_newton:gauss_newton_exact_diagonal", "gauss_newton", stochastic=False
    )
)
register_estimator(
    EstimatorSpec(
        "gauss_newton_sketch",
        f"{_PKG}.gauss_newton_sketch:gauss_newton_sketch_diagonal",
        "gauss_newton",
        stochastic=True,
        options=("num_mc_samples", "generator", "num_sketches"),
    )
)
register_estimator(
    EstimatorSpec(
        "hessian_sketch",
        f"{_PKG}.hessian_sketch:hessian_sketch_diagonal",
        "hessian",
        stochastic=True,
        options=("num_mc_samples", "generator", "num_sketches"),
    )
)
