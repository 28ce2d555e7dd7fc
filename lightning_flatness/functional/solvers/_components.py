"""Reduction of eq. 17 to attained problems: the strongly connected components of its arc graph.

Arcs: row ``i -> column j`` where ``A_ij > 0``, column ``j -> row i`` where ``B_ij > 0``. Only terms
inside one component stay in the infimum (see :mod:`.normalized`); this module finds them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["component_layout", "same_layout"]


def component_layout(a: Tensor, b: Tensor) -> tuple[Optional[Tensor], Tensor]:
    """Entries inside a component, and the free (non-representative) rows, for a batch of problems.

    Args:
        a, b: ``(P, m, n)`` non-negative float64 coefficients of ``P`` problems.

    Returns:
        ``keep`` ``(P, m, n)`` bool (row ``i`` and column ``j`` in the same component, the entry has
        a positive term) and ``free`` ``(P, m)`` bool (rows in a component other than its first row,
        which is held fixed as the gauge of that component).

    Cost: ``O(P m n)`` when every ``B`` (or every ``A``) entry of a problem is positive (one
    component: the usual case, batched); otherwise per problem a boolean transitive closure by
    repeated squaring, ``O(m^2 n log d)`` for graph diameter ``d``.
    """
    pos_a, pos_b = a > 0, b > 0
    all_b = pos_b.all(dim=2).all(dim=1)  # (no flattening copy of a transposed view)
    all_a = pos_a.all(dim=2).all(dim=1)
    if bool((all_a | all_b).all()):
        # every column reaches every row (or vice versa): one component of the rows and columns
        # that have an arc of the other kind
        if bool(all_b.all()):  # (no (P, m, n) selection in the usual cases)
            other = pos_a
        elif bool(all_a.all()):
            other = pos_b
        else:
            other = torch.where(all_b[:, None, None], pos_a, pos_b)
        rows, cols = other.any(dim=2), other.any(dim=1)
        if bool(rows.all()) and bool(cols.all()):
            return None, _free_rows(rows)
        keep = rows[:, :, None] & cols[:, None, :] & (pos_a | pos_b)
        return keep, _free_rows(rows)
    keeps, frees = [], []
    for p in range(a.shape[0]):
        found = _two_way_component(pos_a[p], pos_b[p])
        keep, free = found if found is not None else _component_mask(pos_a[p], pos_b[p])
        keeps.append(keep)
        frees.append(free)
    return torch.stack(keeps), torch.stack(frees)


def same_layout(keep: Optional[Tensor], free: Tensor, keep0: Optional[Tensor], free0: Tensor) -> Tensor:
    """``(P,)`` bool: which of ``P`` problems (layout ``keep``, ``free`` from :func:`component_layout`) have
    the components of a reference problem (``keep0`` ``(1, m, n)`` or None, ``free0`` ``(1, m)``): the
    same rows, columns and entries in the same components, the same gauge rows."""
    same = (free == free0).all(dim=1)
    if keep is not None:
        same &= (keep == (True if keep0 is None else keep0)).flatten(1).all(dim=1)
    elif keep0 is not None:
        same &= False
    return same


def _two_way_component(pos_a: Tensor, pos_b: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    """Fast exact path for one problem, or None when it does not apply.

    A row (column) without an outgoing or without an incoming arc lies on no cycle: it is in no
    component (dead units, pruned channels). Among the other rows and columns, entries with both
    ``A > 0`` and ``B > 0`` are 2-cycles; if they connect all of them (checked by label propagation,
    a few ``O(m n)`` boolean matrix-vector products), those rows and columns form one strongly
    connected component, and every arc between two of them lies inside it.
    """
    rows = pos_a.any(dim=1) & pos_b.any(dim=1)  # out- and in-arcs of row i
    cols = pos_a.any(dim=0) & pos_b.any(dim=0)
    if not bool(rows.any()):
        return None
    both = (pos_a & pos_b & rows[:, None] & cols[None, :]).to(torch.float32)
    reached_rows = torch.zeros_like(rows)
    reached_rows[int(rows.nonzero()[0, 0])] = True
    reached_cols = torch.zeros_like(cols)
    for _ in range(64):
        new_cols = (reached_rows.to(torch.float32) @ both) > 0
        new_rows = (both @ new_cols.to(torch.float32)) > 0
        new_rows |= reached_rows
        if torch.equal(new_rows, reached_rows) and torch.equal(new_cols, reached_cols):
            break
        reached_rows, reached_cols = new_rows, new_cols
    if not (torch.equal(reached_rows, rows) and torch.equal(reached_cols, cols)):
        return None
    keep = rows[:, None] & cols[None, :] & (pos_a | pos_b)
    first = torch.cumsum(rows.to(torch.int32), dim=0) == 1
    return keep, rows & ~first


def _free_rows(rows: Tensor) -> Tensor:
    """``rows`` ``(P, m)`` of one component per problem, less its first row."""
    first = torch.cumsum(rows.to(torch.int32), dim=1) == 1
    return rows & ~first


def _component_mask(pos_a: Tensor, pos_b: Tensor) -> tuple[Tensor, Tensor]:
    """``keep`` ``(m, n)`` and ``free`` ``(m,)`` of one problem by boolean closure (float32 products of
    0/1 matrices, thresholded at 0, so rounding cannot matter)."""
    m = pos_a.shape[0]
    fa, fb = pos_a.to(torch.float32), pos_b.to(torch.float32)
    reach = (fa @ fb.T > 0) | torch.eye(m, dtype=torch.bool, device=pos_a.device)  # row -> col -> row
    while True:  # reflexive-transitive closure by squaring: log2(diameter) products
        r = reach.to(torch.float32)
        nxt = r @ r > 0
        if torch.equal(nxt, reach):
            break
        reach = nxt
    r = reach.to(torch.float32)
    row_to_col = r @ fa > 0  # row i ->* row k -> column j
    col_to_row = fb.T @ r > 0  # column j -> row k ->* row i
    keep = row_to_col & col_to_row.T & (pos_a | pos_b)
    mutual = reach & reach.T
    rep = mutual.to(torch.float32).argmax(dim=1)  # first row of the component
    in_component = keep.any(dim=1)
    free = in_component & (rep != torch.arange(m, device=pos_a.device))
    return keep, free
