"""Mixed-adapter Linear delta as a few batched matmuls over stacked factors (no loop over adapters).

Entries are (row, adapter slot, coefficient) triples: a row composing two adapters is two entries.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import Factors, _w2_first_is_cheaper

__all__ = ["apply_linear_stacked", "signature"]


def signature(f: Factors) -> tuple[object, ...]:
    """Adapters with equal signatures can be stacked: same factor kinds, shapes and dtype."""
    parts = (f.w1, f.w1_a, f.w1_b, f.w2, f.w2_a, f.w2_b, f.t2)
    shapes = tuple(None if t is None else tuple(t.shape) for t in parts)
    dtype = next(t.dtype for t in parts if t is not None)
    return (*shapes, dtype, f.swapped)


def apply_linear_stacked(x: Tensor, factors: list[Factors], slot: Tensor, coeff: Tensor) -> Tensor:
    """`x (E, ..., n1*n2)` -> `(E, ..., m1*m2)`: entry `e` uses `factors[slot[e]]` scaled by `coeff[e]`.

    All `factors` share one `signature` and a full or LoRA-style `w2` (Linear: no CP).
    """
    first = factors[0]
    w1 = torch.stack([f.w1_full() for f in factors]).index_select(0, slot) * coeff.view(-1, 1, 1)  # (E, m1, n1)
    entries, (m1, n1) = x.shape[0], w1.shape[1:]
    lead, n2 = x.shape[1:-1], x.shape[-1] // n1
    chain = _w2_chain(factors, slot)
    rows = x.reshape(entries, -1, n1, n2)  # (E, N, n1, n2)
    tokens = rows.shape[1]
    if _w2_first_is_cheaper(first, m1, n1, n2):
        z = _apply_chain(rows.reshape(entries, tokens * n1, n2), chain).reshape(entries, tokens, n1, -1)
        y = torch.matmul(w1.unsqueeze(1), z)  # (E, N, m1, m2)
    else:
        u = torch.matmul(w1.unsqueeze(1), rows)  # (E, N, m1, n2)
        y = _apply_chain(u.reshape(entries, tokens * m1, n2), chain).reshape(entries, tokens, m1, -1)
    return y.reshape(entries, *lead, -1)


def _w2_chain(factors: list[Factors], slot: Tensor) -> list[Tensor]:
    """Per-entry matrices applied right to left on the last dim: `[w2]` or `[w2_b, w2_a]`, each `(E, out, in)`."""
    if factors[0].w2 is not None:
        return [torch.stack([f.w2 for f in factors]).index_select(0, slot)]  # type: ignore[misc]
    w2_b = torch.stack([f.w2_b for f in factors]).index_select(0, slot)  # type: ignore[misc]
    w2_a = torch.stack([f.w2_a for f in factors]).index_select(0, slot)  # type: ignore[misc]
    return [w2_b, w2_a]


def _apply_chain(rows: Tensor, chain: list[Tensor]) -> Tensor:
    """`rows (E, K, in)` through each `(E, out, in)` matrix: `(E, K, out)`."""
    for w in chain:
        rows = torch.bmm(rows, w.transpose(1, 2))
    return rows
