"""Node rules of the sketched Hessian diagonal (:mod:`..hessian_sketch`): the local curvature of each
nonlinear op kind as random signed columns, one module per kind, registered in
:data:`~.base.NODE_RULES` (see :mod:`~lightning_flatness.functional.estimators.node_rules.base`).
Built in: unary elementwise activations (:mod:`.elementwise`), products of two weight-dependent tensors
(:mod:`.products`), their ``einsum`` (:mod:`.einsum`) and ``baddbmm`` (:mod:`.baddbmm`), division by a
weight-dependent tensor (:mod:`.division`), ``softmax`` /
``log_softmax`` (:mod:`.softmax`), ``layer_norm`` (:mod:`.layer_norm`), ``group_norm``
(:mod:`.group_norm`), ``rms_norm`` (:mod:`.rms_norm`) and ``F.normalize`` (:mod:`.l2_normalize`), the
four normalizations sharing :mod:`.normalization_curvature`; the 2-norm over some dims of each sample
(:mod:`.vector_norm`: ConvNeXt V2's global response normalization); and ``linear`` where its weight is used
twice and its input depends on it (a tied LM head, :mod:`.tied_linear`); a triangular solve with a
weight-dependent system (the gated delta rule's UT transform, :mod:`.triangular_solve`). Nonlinear functions
of one weight alone (weight standardization and normalization) have rules of their own, which give their
curvature's diagonal exactly (:mod:`.weight_functions`)."""

from lightning_flatness.functional.estimators.node_rules import (  # noqa: F401  (registers)
    baddbmm,
    division,
    einsum,
    elementwise,
    group_norm,
    l2_normalize,
    layer_norm,
    products,
    rms_norm,
    softmax,
    tied_linear,
    triangular_solve,
    vector_norm,
    weight_functions,
)
from lightning_flatness.functional.estimators.node_rules.base import (
    NODE_RULES,
    NodeCall,
    NodeRule,
    register_node_rule,
)

__all__ = ["NODE_RULES", "NodeCall", "NodeRule", "register_node_rule"]
