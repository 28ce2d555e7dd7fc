"""Layer rules of the per-layer Gauss-Newton contractions, one module per layer kind, registered in
:data:`~.base.LAYER_RULES` (see :mod:`.base`). Built in: ``linear`` (:mod:`.linear`) and
``conv1d``/``conv2d``/``conv3d`` (:mod:`.conv`), ``embedding`` tables (:mod:`.embedding`), and the
affine parameters of ``batch_norm`` (eval
mode), ``layer_norm``, ``group_norm`` and ``rms_norm`` (:mod:`.normalization`). The backward pass that
feeds them, with the ``K`` columns folded into the batch, is :mod:`.column_backward`."""

from lightning_flatness.functional.estimators.layer_rules import (  # noqa: F401  (registers)
    conv,
    embedding,
    linear,
    normalization,
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

__all__ = [
    "LAYER_RULES",
    "LayerCall",
    "LayerRule",
    "accumulate_layer",
    "argument",
    "per_sample_call",
    "position_pair_contraction",
    "register_layer_rule",
]
