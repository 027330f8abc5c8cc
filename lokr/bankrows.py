"""A factor bank's rows: how one is laid out (`BankLayout`: `[scale, *factors]`), and the batched factored Linear
delta read straight from gathered rows (`LinearRows`).

A mixed-adapter decode step runs every adapted Linear layer's delta over a handful of tokens, so each layer's cost is
the number of ops it issues, not their multiply-adds. Here each factor is one strided view of the gathered rows
(transposed where the matmul wants it), and the last matmul accumulates into the base layer's output (`baddbmm_`)
with the rows' scale as its `alpha` when they all share one; otherwise a multiply scales the first intermediate in
place. The sandwich order is three matmuls after the gather. `LinearRows.operands` reads all that once, for a caller
that runs it again (`lokr.bankpass`), optionally as contiguous copies for the row-major chain of one input row per
entry. Inference only: intermediates and `out` are written in place.
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

from .contract import LinearOrder, kron_rows, linear_order
from .functional import FACTOR_NAMES, LayerSpec

if TYPE_CHECKING:
    from .stacked import LayerBanks

__all__ = ["BankLayout", "BankedAdapter", "LinearRows", "RowOperands", "ScaleTally"]


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
    columns: dict[str, tuple[int, tuple[int, ...]]] = field(compare=False)

    @staticmethod
    @functools.lru_cache(maxsize=4096)
    def of(parts: tuple[tuple[str, tuple[int, ...], int], ...], spec: LayerSpec) -> LinearRows:
        """From a bank layout's `parts` (`(name, shape, offset)`, PEFT names) and the layer's spec."""
        columns = {name[5:]: (offset, shape) for name, shape, offset in parts}
        m1 = columns["w1"][1][0] if "w1" in columns else columns["w1_a"][1][0]
        n1 = columns["w1"][1][1] if "w1" in columns else columns["w1_b"][1][1]
        m2, n2 = spec.out_features // m1, spec.in_features // n1
        rank = None if "w2" in columns else columns["w2_b"][1][0]
        return LinearRows(m1, n1, m2, n2, rank, linear_order(m1, n1, n2, m2, rank)[0], columns)

    def delta(
        self,
        x: Tensor,
        rows: Tensor,
        coeff: Tensor | None = None,
        out: Tensor | None = None,
        common: float | None = None,
    ) -> Tensor:
        """`x (G, ..., n1*n2)`: entry `g` through `rows[g]`'s `scale * coeff[g] * kron(w1, w2)`, `rows (G, D)` (or
        one row for every entry). Returns the delta `(G, ..., m1*m2)`, or `out` (contiguous, that shape) plus it.

        `common`: the scale every row holds, when the caller knows it is one value; with no `coeff` it then rides
        on the last matmul instead of a multiply."""
        return self.operands(rows, coeff, common).run(x, out)

    def operands(
        self,
        rows: Tensor,
        coeff: Tensor | None = None,
        common: float | None = None,
        *,
        index: Tensor | None = None,
        row_major: bool = False,
    ) -> RowOperands:
        """What `delta` multiplies by, read once from `rows (G, D)` (or from the entries `index (G,)` of a bank's
        rows), to run on any number of inputs while `rows` stay as they are: the product of `w1_a` and `w1_b` and the
        per-entry multipliers are made here. Views of `rows`, or with `row_major` (inputs of one row per entry)
        contiguous copies of each factor as the row-major chain takes it, gathered from `index` directly."""
        if index is not None and not row_major:
            rows, index = rows.index_select(0, index), None
        take = functools.partial(self._take, rows, index, row_major)
        times = None
        if coeff is not None or common is None:
            times = take("scale")
            if coeff is not None:
                times = times * coeff.view(-1, 1, 1).to(times.dtype)
        w1 = take("w1") if "w1" in self.columns else torch.bmm(take("w1_a"), take("w1_b"))  # (G, m1, n1)
        # `w2` as the matrices applied to row vectors: `[w2^T]`, or `[w2_b^T, w2_a^T]`.
        chain = [take("w2", True)] if self.rank is None else [take("w2_b", True), take("w2_a", True)]
        return RowOperands(self, w1, chain, times, common, row_major)

    def _take(self, rows: Tensor, index: Tensor | None, row_major: bool, name: str, transposed: bool = False) -> Tensor:
        """Factor `name` as `_mat` views it: of the entries `index` (a contiguous copy), else a view of `rows`,
        contiguous with `row_major`."""
        mat = self._mat(rows, name, transposed)
        if index is not None:
            return mat.index_select(0, index)
        return mat.contiguous() if row_major else mat

    def _mat(self, rows: Tensor, name: str, transposed: bool = False) -> Tensor:
        """Factor `name` of every row as `(G, a, b)` (`(G, b, a)` transposed); `scale` as `(G, 1, 1)`."""
        offset, (a, b) = self.columns[name] if name != "scale" else (0, (1, 1))
        stride = rows.stride(0)
        if transposed:
            return rows.as_strided((rows.shape[0], b, a), (stride, 1, b), rows.storage_offset() + offset)
        return rows.as_strided((rows.shape[0], a, b), (stride, b, 1), rows.storage_offset() + offset)


class RowOperands:
    """`LinearRows` operands read from one set of rows (`LinearRows.operands`): `w1 (G, m1, n1)`, the `w2` chain,
    the per-entry multipliers `times (G, 1, 1)` (None: every entry's scale is `common`); `row_major`: contiguous
    factors, for inputs of one row per entry."""

    __slots__ = ("kernel", "w1", "chain", "times", "common", "row_major")

    def __init__(
        self,
        kernel: LinearRows,
        w1: Tensor,
        chain: list[Tensor],
        times: Tensor | None,
        common: float | None,
        row_major: bool,
    ) -> None:
        self.kernel, self.w1, self.chain, self.times, self.common = kernel, w1, chain, times, common
        self.row_major = row_major

    def run(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """`x (G, ..., n1*n2)` -> the delta `(G, ..., m1*m2)`, or `out` (contiguous, that shape) plus it."""
        kernel, g = self.kernel, self.w1.shape[0]
        times: Tensor | float | None = self.times
        fused = 1.0  # what the accumulating matmul multiplies by
        if times is None and self.common is not None:
            times, fused = (None, self.common) if out is not None else (self.common, 1.0)
        k = x.numel() // (g * kernel.n1 * kernel.n2)  # rows of x per entry
        m1, m2 = kernel.m1, kernel.m2
        into = None if out is None else out.view(g, k * m1, m2)
        xs = x.reshape(g, k, kernel.n1, kernel.n2)
        y = kron_rows(
            xs, self.w1, self.chain, kernel.order, times=times, out=into, alpha=fused, row_major=self.row_major
        )
        return y.view(*x.shape[:-1], m1 * m2) if out is None else out


class ScaleTally:
    """The scale each adapter of a bank holds and how many hold each value: which one they all share, if any."""

    def __init__(self) -> None:
        self._of: dict[str, float] = {}
        self._counts: collections.Counter[float] = collections.Counter()

    def set(self, name: str, scale: float | None) -> None:
        """`name` now holds `scale` (None: it left)."""
        old = self._of.pop(name, None)
        if old is not None:
            self._counts[old] -= 1
            if not self._counts[old]:
                del self._counts[old]
        if scale is not None:
            self._of[name] = scale
            self._counts[scale] += 1

    @property
    def common(self) -> float | None:
        """The scale every adapter holds, when there is one (the usual case: one alpha / r for all)."""
        return next(iter(self._counts)) if len(self._counts) == 1 else None


class BankedAdapter(Protocol):
    """What a bank reads and re-points of an adapter (`LoKrAdapter`)."""

    _parameters: dict[str, nn.Parameter | None]
    swapped: bool

    @property
    def scale(self) -> float: ...

    def _set_home(self, home: tuple[LayerBanks, str] | None) -> None: ...


@dataclass(frozen=True)
class BankLayout:
    """A row: `[scale, *factors flattened]`; `parts` = `(name, shape, offset)` of each factor, in PEFT order."""

    parts: tuple[tuple[str, tuple[int, ...], int], ...]
    swapped: bool

    @classmethod
    def of(cls, adapter: BankedAdapter) -> BankLayout:
        parts, offset = [], 1
        for name in FACTOR_NAMES:
            p = adapter._parameters.get(name)
            if p is not None:
                parts.append((name, tuple(p.shape), offset))
                offset += p.numel()
        return cls(tuple(parts), adapter.swapped)

    @property
    def row_numel(self) -> int:
        name, shape, offset = self.parts[-1]
        return offset + math.prod(shape)

    @property
    def factor_numel(self) -> int:
        return self.row_numel - 1

    @functools.cached_property
    def _columns(self) -> tuple[tuple[str, int, int, tuple[int, ...]], ...]:
        """`(short name, first column, end column, (-1, *shape))` of each factor: `split` runs per layer per step."""
        return tuple((name[5:], offset, offset + math.prod(shape), (-1, *shape)) for name, shape, offset in self.parts)

    def split(self, rows: Tensor) -> dict[str, Tensor]:
        """Views of `rows (G, row_numel)`: `{"scale": (G,), "w1": (G, m1, n1), ...}` (names without `lokr_`)."""
        views = {"scale": rows[:, 0]}
        for name, start, end, shape in self._columns:
            views[name] = rows[:, start:end].view(shape)
        return views

    def row_views(self, row: Tensor) -> Iterator[tuple[str, Tensor]]:
        """`(name, view)` of each factor in one row `(row_numel,)`."""
        for name, shape, offset in self.parts:
            yield name, row[offset : offset + math.prod(shape)].view(shape)
