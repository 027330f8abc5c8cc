"""One factor bank's share of a Linear layer's rows in an open `adapter_batch`, kept from step to step.

A decode step runs each adapted Linear layer's bank delta over a handful of tokens, so the Python and view ops
around its three small matmuls cost as much as the matmuls (measured on a 2-core CPU, 16 rows over 16 adapters,
a 512x512 layer: ~45 us of them against ~25 us of matmuls). A `BankPass` of a plan that runs again and again
(`lokr.plancache`: a decode loop over the same rows, a denoising loop) reads its operands (the gathered rows, as
contiguous row-major matrices for one token per entry) once and then runs the matmuls alone. What it keeps is read
again after a write: the bank's version counter is checked at every forward (a scale set, a row written), its
adapters' parameters' counters (writes through a parameter do not move the bank's) as a kept plan opens the next
block, as the kept plan's folded weights are.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor

from .bankrows import LinearRows, RowOperands
from .batch import accumulate, scatter_add
from .functional import LayerSpec
from .stacked import FactorBank, Slots
from .stamp import versions_of

__all__ = ["BankPass", "parameters_unwritten"]

READ_EACH_TIME = 2  # forwards of a pass that read their operands and keep nothing (see `BankPass.operands`)
_UNWRITTEN: contextvars.ContextVar[bool] = contextvars.ContextVar("lokr_parameters_unwritten", default=False)


@contextmanager
def parameters_unwritten() -> Iterator[None]:
    """Inside the block (this thread / task only), the caller promises that adapter parameters are written only
    through lokr's own API, which writes the banks (whose version every forward checks): kept bank passes then skip
    re-reading every adapter parameter's version as each block opens (`BankPass.recheck`: measured 0.6 ms of a
    16-row decode step over 16 adapters on a 28-layer model, ~4%). A serving engine makes it; code that trains or
    edits parameters in place between forwards must not."""
    token = _UNWRITTEN.set(True)
    try:
        yield
    finally:
        _UNWRITTEN.reset(token)


class BankPass:
    """`bank`'s adapters `names` in one row plan of a Linear layer: `rows` (None: one entry per row, in row order;
    else where each entry's delta goes) and `slots` (which bank rows each entry reads, and its multiplier)."""

    __slots__ = ("bank", "data", "names", "rows", "slots", "entries", "_kept", "_version", "_watched", "_forwards")

    def __init__(self, bank: FactorBank, data: Tensor, names: list[str], rows: Tensor | None, slots: Slots) -> None:
        self.bank, self.data, self.names, self.rows, self.slots = bank, data, names, rows, slots
        self.entries = 1 if slots.index is None else slots.index.numel()
        self._kept: dict[bool, RowOperands] = {}  # by row-major
        self._version = -1  # the bank data's version counter when `_kept` was read
        self._watched: list[tuple[Tensor, int]] = []  # the adapters' parameters and their versions, then
        self._forwards = 0

    def add_to(self, result: Tensor, x: Tensor, spec: LayerSpec) -> Tensor:
        """`result (E, ..., out)` plus this bank's delta of `x (E, ..., in)`: in place where it can be."""
        bank, rows = self.bank, self.rows
        xs = x if x.dtype == bank.dtype else x.to(bank.dtype)
        if rows is not None:
            xs = xs.index_select(0, rows)
        operands = self.operands(spec, one_row_each=xs.numel() == self.entries * spec.in_features)
        if rows is not None:
            return scatter_add(result, rows, operands.run(xs))
        if result.dtype == bank.dtype and result.is_contiguous():
            return operands.run(xs, out=result)
        return accumulate(result, operands.run(xs))

    def operands(self, spec: LayerSpec, one_row_each: bool) -> RowOperands:
        """The entries' operands. A pass's first `READ_EACH_TIME` forwards read views of one gather and keep
        nothing (a serving engine's plans mostly run once or twice: rows join and leave; keeping costs more reads
        than it saves then); later ones keep what they read, contiguous copies for inputs of one row per entry,
        until the bank's data is written (checked here) or an adapter's parameters are (checked by `recheck` as a
        kept plan opens a block)."""
        self._forwards += 1
        if self._forwards <= READ_EACH_TIME:
            return self._read(spec, row_major=False)
        if self.data._version != self._version:
            self._kept.clear()
        row_major = one_row_each
        operands = self._kept.get(row_major)
        if operands is None:
            if not self._kept:
                params = self._parameters()
                versions = versions_of(params)
                if versions is None:  # writes to them cannot be seen: read every time
                    self._forwards = 0
                    return self._read(spec, row_major=False)
                self._version = self.data._version
                self._watched = list(zip(params, versions, strict=True))
            operands = self._kept[row_major] = self._read(spec, row_major)
        return operands

    def recheck(self) -> None:
        """As a kept plan opens a new block: forget what was read if an adapter's parameters were written since
        (they view the bank's rows, but count their writes apart from it); not under `parameters_unwritten`."""
        if _UNWRITTEN.get():
            return
        if any(p._version != version for p, version in self._watched):
            self._kept.clear()
            self._watched = []

    def _read(self, spec: LayerSpec, row_major: bool) -> RowOperands:
        bank, slots = self.bank, self.slots
        kernel = LinearRows.of(bank.layout.parts, spec)
        common = bank.scales.common if slots.coeff is None else None
        index = slots.index  # a gather is left to `operands`, which may take each factor from it directly
        rows = self.data if index is not None else bank._rows(slots, self.data)
        return kernel.operands(rows, slots.coeff, common, index=index, row_major=row_major)

    def _parameters(self) -> list[Tensor]:
        members = self.bank.members
        return [
            p for name in self.names if name in members for p in members[name]._parameters.values() if p is not None
        ]
