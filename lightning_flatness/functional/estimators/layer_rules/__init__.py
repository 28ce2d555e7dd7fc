"""Layer rules of the per-layer Gauss-Newton contractions, one module per layer kind, registered in
:data:`~.base.LAYER_RULES` (see :mod:`.base`). Built in: ``linear`` (:mod:`.linear`), ``addmm`` (Hugging
Face's ``Conv1D``, :mod:`.addmm`), ``matmul`` by a weight (:mod:`.matmul`),
``conv1d``/``conv2d``/``conv3d`` (:mod:`.conv`), ``conv_transpose1d``/``2d``/``3d``
(:mod:`.conv_transpose`), ``embedding`` tables and bags (:mod:`.embedding`), and the affine parameters of
``batch_norm`` (eval mode), ``layer_norm``, ``group_norm`` and ``rms_norm`` (:mod:`.normalization`), and
offsets added to every sample (a position embedding, a relative position bias: :mod:`.offset`). A weight
used by several calls (a tied LM head, layers shared across depth), or through a function of itself (a
transpose, weight standardization or normalization), is contracted from the sum of its calls' per-sample
gradients, pulled back through the function (:mod:`.shared`). The backward pass that feeds them, with the
``K`` columns folded into the batch, is :mod:`.column_backward`."""

from lightning_flatness.functional.estimators.layer_rules import (  # noqa: F401  (registers)
    addmm,
    conv,
    conv_transpose,
    embedding,
    linear,
    matmul,
    normalization,
    offset,
)
from lightning_flatness.functional.estimators.layer_rules.base import (
    LAYER_RULES,
    LayerCall,
    LayerRule,
    argument,
    register_layer_rule,
)
from lightning_flatness.functional.estimators.layer_rules.contraction import (
    accumulate_layer,
    per_sample_call,
    position_pair_contraction,
)
from lightning_flatness.functional.estimators.layer_rules.shared import (
    SharedCalls,
    accumulate_shared,
    shared_call_groups,
)

__all__ = [
    "LAYER_RULES",
    "LayerCall",
    "LayerRule",
    "SharedCalls",
    "accumulate_layer",
    "accumulate_shared",
    "argument",
    "per_sample_call",
    "position_pair_contraction",
    "register_layer_rule",
    "shared_call_groups",
]
