"""Mixed-adapter Linear delta as a few batched matmuls over stacked factors (no loop over adapters).

Entries are (row, adapter slot, coefficient) triples: a row composing two adapters is two entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .functional import Factors, _w2_first_is_cheaper

__all__ = ["StackedFactors", "apply_linear_stacked", "signature", "stack_factors"]


def signature(f: Factors) -> tuple[object, ...]:
    """Adapters with equal signatures can be stacked: same factor kinds, shapes and dtype."""
    parts = (f.w1, f.w1_a, f.w1_b, f.w2, f.w2_a, f.w2_b, f.t2)
    shapes = tuple(None if t is None else tuple(t.shape) for t in parts)
    dtype = next(t.dtype for t in parts if t is not None)
    return (*shapes, dtype, f.swapped)


@dataclass(frozen=True)
class StackedFactors:
    """Factors of A adapters with one signature: `w1 (A, m1, n1)`, `chain` = `[w2]` or `[w2_b, w2_a]`
    (each `(A, out, in)`, applied in order on the last dim), adapter scales `(A,)`."""

    w1: Tensor
    chain: tuple[Tensor, ...]
    scale: Tensor
    w2_first: bool


def stack_factors(factors: list[Factors], scales: list[float]) -> StackedFactors:
    """Stack Linear factors sharing one `signature` (full or LoRA-style `w2`, no CP)."""
    first = factors[0]
    w1 = torch.stack([f.w1_full() for f in factors])
    if first.w2 is not None:
        chain: tuple[Tensor, ...] = (torch.stack([f.w2 for f in factors]),)  # type: ignore[misc]
    else:
        chain = (torch.stack([f.w2_b for f in factors]), torch.stack([f.w2_a for f in factors]))  # type: ignore[misc]
    m1, n1 = w1.shape[1:]
    n2 = chain[0].shape[-1]
    scale = torch.tensor(scales, dtype=w1.dtype, device=w1.device)
    return StackedFactors(w1, chain, scale, _w2_first_is_cheaper(first, m1, n1, n2))


def apply_linear_stacked(x: Tensor, stacked: StackedFactors, slot: Tensor, coeff: Tensor) -> Tensor:
    """`x (E, ..., n1*n2)` -> `(E, ..., m1*m2)`: entry `e` uses adapter `slot[e]`, times `coeff[e]`."""
    coeff = coeff.to(stacked.w1.dtype) * stacked.scale.index_select(0, slot)
    w1 = stacked.w1.index_select(0, slot) * coeff.view(-1, 1, 1)  # (E, m1, n1)
    chain = [w.index_select(0, slot) for w in stacked.chain]
    entries, (m1, n1) = x.shape[0], w1.shape[1:]
    lead, n2 = x.shape[1:-1], x.shape[-1] // n1
    rows = x.reshape(entries, -1, n1, n2)  # (E, N, n1, n2)
    tokens = rows.shape[1]
    if stacked.w2_first:
        z = _apply_chain(rows.reshape(entries, tokens * n1, n2), chain).reshape(entries, tokens, n1, -1)
        y = torch.matmul(w1.unsqueeze(1), z)  # (E, N, m1, m2)
    else:
        u = torch.matmul(w1.unsqueeze(1), rows)  # (E, N, m1, n2)
        y = _apply_chain(u.reshape(entries, tokens * m1, n2), chain).reshape(entries, tokens, m1, -1)
    return y.reshape(entries, *lead, -1)


def _apply_chain(rows: Tensor, chain: list[Tensor]) -> Tensor:
    """`rows (E, K, in)` through each `(E, out, in)` matrix: `(E, K, out)`."""
    for w in chain:
        rows = torch.bmm(rows, w.transpose(1, 2))
    return rows
