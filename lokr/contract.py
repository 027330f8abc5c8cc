"""The factored Linear delta `w1 @ X @ w2^T` (`X` = a token viewed `(n1, n2)`): the cheapest contraction order and
the batched matmuls that run it, for one adapter (`G` = 1) or one adapter per group of rows (the factor banks).

Shapes: `w1 (m1, n1)`, `w2 (m2, n2)` or low-rank `w2_a (m2, r) @ w2_b (r, n2)`; `dW = kron(w1, w2)` is
`(m1 * m2, n1 * n2)` and is never built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["LinearOrder", "kron_rows", "linear_order"]

LinearOrder = Literal["w2_first", "w1_first", "sandwich"]


def linear_order(m1: int, n1: int, n2: int, m2: int, rank: int | None) -> tuple[LinearOrder, int]:
    """The cheapest contraction order of the factored Linear delta `w1 @ X @ w2^T` and its multiply-adds per token.

    `rank` is the rank of a LoRA-style `w2 = w2_a @ w2_b` (None for a full `w2`). `w2_first` / `w1_first` apply
    `w2` (as one or two thin matmuls) before / after `w1`; `sandwich` (low-rank only) is `w1 @ (X @ w2_b^T) @ w2_a^T`,
    whose intermediates are all rank-sized.
    """
    c2 = n2 * m2 if rank is None else rank * (n2 + m2)
    costs: dict[LinearOrder, int] = {"w2_first": n1 * c2 + m1 * n1 * m2, "w1_first": m1 * n1 * n2 + m1 * c2}
    if rank is not None:
        costs["sandwich"] = rank * (n1 * n2 + m1 * n1 + m1 * m2)
    order = min(costs, key=costs.__getitem__)
    return order, costs[order]


def kron_rows(
    rows: Tensor,
    w1: Tensor,
    chain: Sequence[Tensor],
    order: LinearOrder,
    *,
    times: Tensor | float | None = None,
    out: Tensor | None = None,
    alpha: float = 1.0,
    row_major: bool = False,
) -> Tensor:
    """`rows (G, K, n1, n2) -> (G, K, m1, m2)`: the K rows of group `g` through `kron(w1[g], w2[g])`.

    `w1 (G, m1, n1)`; `w2` as the matrices applied to row vectors, `(G, in, out)` each: `[w2^T]` or, low-rank,
    `[w2_b^T, w2_a^T]` (the only form `sandwich` takes). G is 1 for one adapter, or one per entry.
    Inference only (they write in place): `times` (`(G, 1, 1)` or a number) multiplies the first intermediate,
    and `out` (`(G, K * m1, m2)`, contiguous) gets `alpha` times the result added by the last matmul (returned).
    `row_major`: the factors are contiguous matrices (batch strides aside), as `LinearRows.operands(row_major=True)`
    makes them; with one row per group the low-rank chain then runs row-major.
    """
    g, k, n1, n2 = rows.shape
    m1 = w1.shape[1]
    if order == "w2_first":
        z = _times(_chain(rows.reshape(g, k * n1, n2), chain), times)  # (G, K*n1, m2)
        if k == 1:
            return _last(w1, z, out, alpha).view(g, 1, m1, -1)
        y = torch.matmul(w1.unsqueeze(1), z.view(g, k, n1, -1))
        if out is None:
            return y if alpha == 1.0 else y.mul_(alpha)
        return out.add_(y.view(out.shape), alpha=alpha).view(y.shape)
    if order == "w1_first":
        u = _times(torch.matmul(w1.unsqueeze(1), rows).reshape(g, k * m1, n2), times)  # (G, K*m1, n2)
        u = _chain(u, chain[:-1])
        return _last(u, chain[-1], out, alpha).view(g, k, m1, -1)
    # Sandwich, rank-major: each rank-sized intermediate is the wide side of its product, `(G, r, K * n1)` then
    # `(G, r * K, m1)`, and transposes are strides that the matmuls take as they are. The row-major form
    # (`X @ w2_b^T` first, `(G, K * n1, r)`) ran 1.1-2.5x slower on CPU: BLAS handles an r-wide output poorly.
    w2_bt, w2_at = chain
    r = w2_bt.shape[-1]
    if row_major and k == 1:  # `(G, n1, r)` then `(G, m1, r)`: 31 against 47 us at 16 groups, 2-core CPU
        p = _times(torch.bmm(rows.reshape(g, n1, n2), w2_bt), times)
        return _last(torch.bmm(w1, p), w2_at, out, alpha).view(g, 1, m1, -1)
    p = _times(torch.bmm(w2_bt.transpose(1, 2), rows.reshape(g, k * n1, n2).transpose(1, 2)), times)  # (G, r, K*n1)
    q = torch.bmm(p.view(g, r * k, n1), w1.transpose(1, 2))  # (G, r*K, m1)
    return _last(q.view(g, r, k * m1).transpose(1, 2), w2_at, out, alpha).view(g, k, m1, -1)


def _times(t: Tensor, by: Tensor | float | None) -> Tensor:
    """`t * by` in place (`t` is a fresh intermediate); `t` as it is for None."""
    return t if by is None else t.mul_(by)


def _last(a: Tensor, b: Tensor, out: Tensor | None, alpha: float) -> Tensor:
    """`alpha * (a @ b)` (batched), or added into `out` by the matmul itself."""
    if out is None:
        y = torch.bmm(a, b)
        return y if alpha == 1.0 else y.mul_(alpha)
    return out.baddbmm_(a, b, alpha=alpha)


def _chain(rows: Tensor, chain: Sequence[Tensor]) -> Tensor:
    """`rows (G, K, in)` through each `(G, in, out)` matrix: `(G, K, out)`."""
    for w in chain:
        rows = torch.bmm(rows, w)
    return rows
