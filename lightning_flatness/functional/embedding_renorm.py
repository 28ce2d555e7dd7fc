r"""Embedding tables with ``max_norm``: renormalised once for a measurement, and put back bit for bit after.

``nn.Embedding(max_norm=c)`` and ``nn.EmbeddingBag(max_norm=c)`` change their table in their own
``forward``: ``F.embedding`` first rescales, in place and without gradient (``torch.embedding_renorm_``),
every row the input looks up whose ``norm_type``-norm exceeds ``c`` to norm ``c``, then looks the rows up.
Autograd differentiates the lookup at the rescaled rows, not the rescaling; that is the gradient training
follows. A measurement that ran such a ``forward`` would rescale the live table's rows its samples look
up: the weights, and with them the rest of training, would change (``SharpnessMonitor`` promises they do
not).

:func:`renormalised_tables` holds, for the duration of a block, every such table at ``renorm(W)``: each row
rescaled as a lookup would rescale it (all rows, so that the point measured does not depend on which rows
the samples happen to look up), with the module's ``max_norm`` set to ``None`` so that the measurement's
forwards change nothing and its lookups are plain ones (the exact method's per-layer rule for
``embedding``, not the per-sample fallback). Measured, therefore: the curvature of the loss in the table at
``renorm(W)``, as training's next forward uses it, with ``renorm(W)`` as the weight of eq. 13 and 17.
A row no sample looks up has no curvature; eq. 17 leaves it out (its row variance grows without bound),
eq. 13 counts its norm. On exit the original values (a copy taken on entry) and ``max_norm`` go back,
also on error.

Cost: a copy of each such table per block, and one ``embedding_renorm_`` over its rows.

``F.embedding(ids, table, max_norm=c)`` called directly in a ``forward`` (no module to find) is not
covered; :func:`~lightning_flatness.functional.measurement_context.measurement_context` notices the change
it makes to a parameter and says so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lightning_flatness.functional.module_walk import modules_of

__all__ = ["renormalised_tables"]


@contextlib.contextmanager
def renormalised_tables(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every ``nn.Embedding`` / ``nn.EmbeddingBag`` of ``model`` with ``max_norm`` holds
    its renormalised rows and has ``max_norm=None`` (module docstring); both go back on exit.

    Example:
        >>> import torch
        >>> table = torch.nn.Embedding(3, 2, max_norm=1.0)
        >>> with torch.no_grad():
        ...     _ = table.weight.copy_(torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 2.0]]))
        >>> with renormalised_tables(table):
        ...     inside = table.weight.norm(dim=1).tolist()
        ...     _ = table(torch.tensor([0, 2]))  # changes nothing now
        >>> [round(v, 4) for v in inside], table.weight.tolist(), table.max_norm
        ([1.0, 0.5, 1.0], [[3.0, 4.0], [0.30000001192092896, 0.4000000059604645], [0.0, 2.0]], 1.0)
    """
    held: list[tuple[nn.Embedding | nn.EmbeddingBag, float, Tensor]] = []
    try:
        for module in modules_of(model):
            if not isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or module.max_norm is None:
                continue
            table = module.weight.detach()
            if type(table) is not Tensor:  # a sharded or otherwise wrapped table: left as it is
                continue
            held.append((module, module.max_norm, table.clone()))
            rows = torch.arange(table.shape[0], device=table.device)
            with torch.no_grad():
                torch.embedding_renorm_(table, rows, module.max_norm, module.norm_type)
            module.max_norm = None
        yield model
    finally:
        for table_module, max_norm, values in reversed(held):
            table_module.max_norm = max_norm
            with torch.no_grad():
                table_module.weight.detach().copy_(values)
