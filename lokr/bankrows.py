"""The batched factored Linear delta, read straight from a factor bank's gathered rows.

A mixed-adapter decode step runs every adapted Linear layer's delta over a handful of tokens, so each layer's cost is
the number of ops it issues, not their multiply-adds. Here each factor is one strided view of the gathered rows
(transposed where the matmul wants it), the per-entry coefficient scales the first intermediate in place, and the
last matmul accumulates into the base layer's output (`baddbmm_`): the sandwich order is four ops after the gather.
Inference only: intermediates and `out` are written in place.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from .functional import LayerSpec, LinearOrder, linear_order

__all__ = ["LinearRows"]


@dataclass(frozen=True)
class LinearRows:
    """How rows `[scale, *factors]` of one bank layout run a Linear layer `(n1*n2 -> m1*m2)`.

    `columns` maps each factor's short name (`w1`, `w1_a`, `w2_b`, ...) to `(first column, shape)`.
    """

    m1: int
    n1: int
    m2: int
    n2: int
    rank: int | None
    order: LinearOrder
    columns: tuple[tuple[str, int, tuple[int, ...]], ...]

    @staticmethod
    @functools.lru_cache(maxsize=4096)
    def of(parts: tuple[tuple[str, tuple[int, ...], int], ...], spec: LayerSpec) -> LinearRows:
        """From a bank layout's `parts` (`(name, shape, offset)`, PEFT names) and the layer's spec."""
        shapes = {name[5:]: shape for name, shape, _ in parts}
        m1 = (shapes["w1"] if "w1" in shapes else shapes["w1_a"])[0]
        n1 = (shapes["w1"] if "w1" in shapes else shapes["w1_b"])[-1]
        m2, n2 = spec.out_features // m1, spec.in_features // n1
        rank = None if "w2" in shapes else shapes["w2_b"][0]
        order = linear_order(m1, n1, n2, m2, rank)[0]
        return LinearRows(m1, n1, m2, n2, rank, order, tuple((name[5:], off, shape) for name, shape, off in parts))

    def delta(self, x: Tensor, rows: Tensor, coeff: Tensor | None = None, out: Tensor | None = None) -> Tensor:
        """`x (G, ..., n1*n2)`: entry `g` through `rows[g]`'s `scale * coeff[g] * kron(w1, w2)`, `rows (G, D)` (or
        one row for every entry). Returns the delta `(G, ..., m1*m2)`, or `out` (contiguous, that shape) plus it."""
        g = rows.shape[0]
        views = _Views(rows, self.columns)
        c = views.mat("scale", (1, 1))
        if coeff is not None:
            c = c * coeff.view(-1, 1, 1).to(c.dtype)
        shape = (*x.shape[:-1], self.m1 * self.m2)
        k = x.numel() // (g * self.n1 * self.n2)  # rows of x per entry
        xs = x.reshape(g, k * self.n1, self.n2)
        if self.order == "sandwich":
            rank = self.rank
            assert rank is not None
            p = torch.bmm(views.mat("w2_b", (rank, self.n2)), xs.mT).mul_(c)  # (G, r, K*n1)
            q = torch.bmm(p.view(g, rank * k, self.n1), views.w1(self.m1, self.n1).mT)  # (G, r*K, m1)
            return _last(q.view(g, rank, k * self.m1).mT, views.mat("w2_a", (self.m2, rank)).mT, shape, out)
        if self.order == "w1_first":
            w1 = views.w1(self.m1, self.n1)
            u = torch.matmul(w1.unsqueeze(1), xs.view(g, k, self.n1, self.n2))  # (G, K, m1, n2)
            chain = self._w2_chain(views)
            y = u.view(g, k * self.m1, self.n2).mul_(c)
            for w in chain[:-1]:
                y = torch.bmm(y, w)
            return _last(y, chain[-1], shape, out)
        z = xs  # w2_first
        for w in self._w2_chain(views):
            z = torch.bmm(z, w)
        z = z.mul_(c)  # (G, K*n1, m2)
        w1 = views.w1(self.m1, self.n1)
        if k == 1:
            return _last(w1, z, shape, out)
        y = torch.matmul(w1.unsqueeze(1), z.view(g, k, self.n1, self.m2)).view(shape)
        return y if out is None else out.add_(y)

    def _w2_chain(self, views: _Views) -> list[Tensor]:
        """`w2` as the matrices applied to row vectors: `[w2^T]`, or `[w2_b^T, w2_a^T]`."""
        if self.rank is None:
            return [views.mat("w2", (self.m2, self.n2)).mT]
        return [views.mat("w2_b", (self.rank, self.n2)).mT, views.mat("w2_a", (self.m2, self.rank)).mT]


class _Views:
    """Strided views `(G, a, b)` of the factors in `rows (G, D)` (unit stride along dim 1)."""

    def __init__(self, rows: Tensor, columns: tuple[tuple[str, int, tuple[int, ...]], ...]) -> None:
        self.rows, self.stride, self.base = rows, rows.stride(0), rows.storage_offset()
        self.offsets = {name: off for name, off, _ in columns}
        self.offsets["scale"] = 0
        self.shapes = {name: shape for name, _, shape in columns}

    def mat(self, name: str, shape: tuple[int, int]) -> Tensor:
        a, b = shape
        size = (self.rows.shape[0], a, b)
        return self.rows.as_strided(size, (self.stride, b, 1), self.base + self.offsets[name])

    def w1(self, m1: int, n1: int) -> Tensor:
        if "w1" in self.offsets:
            return self.mat("w1", (m1, n1))
        r1 = self.shapes["w1_a"][1]
        return torch.bmm(self.mat("w1_a", (m1, r1)), self.mat("w1_b", (r1, n1)))


def _last(a: Tensor, b: Tensor, shape: tuple[int, ...], out: Tensor | None) -> Tensor:
    """`a @ b` (batched) viewed as `shape`, or accumulated into `out` by the matmul itself."""
    if out is None:
        return torch.bmm(a, b).view(shape)
    out.view(a.shape[0], a.shape[1], b.shape[2]).baddbmm_(a, b)
    return out
