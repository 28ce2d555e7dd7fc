"""Node rules of the sketched Hessian diagonal (:mod:`..hessian_sketch`): the local curvature of each
nonlinear op kind as random signed columns, one module per kind, registered in
:data:`~.base.NODE_RULES` (see :mod:`~lightning_flatness.functional.estimators.node_rules.base`).
Built in: unary elementwise activations
(:mod:`.elementwise`), products of two weight-dependent tensors (:mod:`.products`), ``softmax`` /
``log_softmax`` (:mod:`.softmax`) and ``layer_norm`` (:mod:`.layer_norm`)."""

from lightning_flatness.functional.estimators.node_rules import (  # noqa: F401  (registers)
    elementwise,
    layer_norm,
    products,
    softmax,
)
from lightning_flatness.functional.estimators.node_rules.base import (
    NODE_RULES,
    NodeCall,
    NodeRule,
    register_node_rule,
)

__all__ = ["NODE_RULES", "NodeCall", "NodeRule", "register_node_rule"]
