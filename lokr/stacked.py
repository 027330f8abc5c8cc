"""Persistent stacked factors for the mixed-adapter Linear forward (vLLM-style slots, LoKr maths).

Every adapter of a Linear layer owns a fixed slot (a row) in the `FactorBank` of its factor shapes: its
factors with the adapter's scale folded into `w1` and, when that is cheap, `w2 = w2_a @ w2_b` built once.
A step then costs one gather by slot and two batched matmuls per bank, whatever the mix of adapters, and a
change in which adapters a batch uses never restacks anything. Slot 0 is all zeros: rows that use no
adapter of a bank point at it, so no per-row mask is needed.

Banks are a cache of the adapters' parameters: a slot is rewritten when its adapter's tensors (storage or
in-place version) or scale change, freed when the adapter leaves the layer, and the whole set is dropped
when the layer moves device or dtype (`LayerBanks.clear`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from .functional import Factors, LinearOrder, kron_rows, linear_order

__all__ = [
    "BankLayout",
    "BankedAdapter",
    "FactorBank",
    "LayerBanks",
    "Slots",
    "signature",
    "stacked_nbytes",
]

Fingerprint = tuple[object, ...]
# For a forward: each bank, its `data` at that moment (a later shrink replaces the tensor, so slots read from
# this one stay valid) and the `(name, slot)` pairs it holds.
PlaceResult = list[tuple["FactorBank", Tensor, tuple[tuple[str, int], ...]]]
MIN_CAPACITY = 4  # slots per bank, the zero slot included; doubles when full, halves when a quarter full


def signature(f: Factors) -> tuple[object, ...]:
    """Adapters with equal signatures share a bank: same factor kinds and shapes, dtype and device."""
    parts = (f.w1, f.w1_a, f.w1_b, f.w2, f.w2_a, f.w2_b, f.t2)
    shapes = tuple(None if t is None else tuple(t.shape) for t in parts)
    first = _first(f)
    return (*shapes, first.dtype, first.device, f.swapped)


def _first(f: Factors) -> Tensor:
    """A factor tensor of `f` (they share dtype and device)."""
    return next(t for t in (f.w1, f.w1_a, f.w2, f.w2_a) if t is not None)


class BankedAdapter(Protocol):
    """What a bank reads of an adapter on one layer (`LoKrAdapter`)."""

    scale: float

    def factors(self) -> Factors: ...

    def state_token(self) -> tuple[object, ...]: ...


def _fingerprint(adapters: list[BankedAdapter]) -> Fingerprint:
    """Each adapter's state token (this runs per layer per step)."""
    return tuple([a.state_token() for a in adapters])


@dataclass(frozen=True)
class Slots:
    """Which weights each entry of a batched delta uses: one slot for all (`index` None) or a slot per entry."""

    slot: int = 0
    index: Tensor | None = None  # (E,) long
    coeff: Tensor | None = None  # (E,) per-entry multiplier; None means 1


@dataclass(frozen=True)
class BankLayout:
    """How one signature's factors are stored: sizes, whether `w2` is built full, the cheaper order."""

    m1: int
    n1: int
    m2: int
    n2: int
    rank: int | None  # of the `w2` chain when kept low-rank
    full_w2: bool
    order: LinearOrder

    @classmethod
    def of(cls, f: Factors) -> BankLayout:
        m1, n1 = f.m1, f.n1
        w2 = f.w2 if f.w2 is not None else f.w2_a
        assert w2 is not None and (f.w2 is not None or f.w2_b is not None)
        m2, n2 = w2.shape[0], (f.w2 if f.w2 is not None else f.w2_b).shape[1]  # type: ignore[union-attr]
        rank = f.w2_rank
        # Building w2 costs FLOPs per token but saves a matmul per step: worth it while it at most doubles them.
        full_w2 = rank is None or m2 * n2 <= 2 * rank * (m2 + n2)
        rank = None if full_w2 else rank
        return cls(m1, n1, m2, n2, rank, full_w2, linear_order(m1, n1, n2, m2, rank)[0])

    @property
    def chain_shapes(self) -> list[tuple[int, int]]:
        """Per-slot shapes of the `w2` stage (transposed, applied to row vectors)."""
        if self.rank is None:
            return [(self.n2, self.m2)]
        return [(self.n2, self.rank), (self.rank, self.m2)]

    @property
    def slot_numel(self) -> int:
        return self.m1 * self.n1 + sum(a * b for a, b in self.chain_shapes)


def stacked_nbytes(f: Factors) -> int:
    """Bytes one adapter's slot takes in its bank (the stacked copy kept beside its parameters)."""
    element = _first(f).element_size()
    return BankLayout.of(f).slot_numel * element


class FactorBank:
    """Factors of up to `capacity - 1` adapters with one signature, at fixed slots (slot 0 = zeros).

    One row of `data (C, slot_numel)` per slot, so a step gathers every factor of its entries at once. A row
    holds `w1 (m1, n1)` pre-multiplied by the adapter's scale, then the `w2` stage as matrices applied to row
    vectors (transposed): `(n2, m2)` for a full `w2`, or `(n2, r)` and `(r, m2)` for a low-rank one.
    """

    def __init__(self, first: Factors) -> None:
        self.layout = layout = BankLayout.of(first)
        self._shapes = [(layout.m1, layout.n1), *layout.chain_shapes]
        self.dtype, self.device = _first(first).dtype, _first(first).device
        self.names: dict[str, int] = {}
        self._free = list(range(MIN_CAPACITY - 1, 0, -1))  # popped from the end: lowest slot first
        self.data = torch.zeros((MIN_CAPACITY, layout.slot_numel), dtype=self.dtype, device=self.device)

    @property
    def capacity(self) -> int:
        return self.data.shape[0]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def _split(self, rows: Tensor) -> list[Tensor]:
        """Views of `rows (G, slot_numel)`: `[w1 (G, m1, n1), *chain (G, in, out)]`."""
        views, start = [], 0
        for a, b in self._shapes:
            views.append(rows[:, start : start + a * b].view(-1, a, b))
            start += a * b
        return views

    def write(self, name: str, factors: Factors, scale: float) -> int:
        """Put `name`'s factors in its slot (a free one if new); returns the slot."""
        slot = self.names.get(name)
        if slot is None:
            if not self._free:
                self._grow()
            slot = self.names[name] = self._free.pop()
        if self.layout.full_w2:
            parts = [factors.w1_full() * scale, factors.w2_matrix().T]
        else:
            assert factors.w2_a is not None and factors.w2_b is not None
            parts = [factors.w1_full() * scale, factors.w2_b.T, factors.w2_a.T]
        for view, part in zip(self._split(self.data[slot : slot + 1]), parts, strict=True):
            view.copy_(part.unsqueeze(0))
        return slot

    def release(self, name: str) -> None:
        """Free `name`'s slot; shrink (moving slots) when at most a quarter of the capacity is used."""
        slot = self.names.pop(name, None)
        if slot is None:
            return
        self.data[slot].zero_()  # freed slots stay zero: nothing of a removed adapter is kept
        self._free.append(slot)
        if self.capacity > MIN_CAPACITY and len(self.names) + 1 <= self.capacity // 4:
            self._shrink(self.capacity // 2)

    def _grow(self) -> None:
        """Double the capacity; slots keep their numbers."""
        old = self.capacity
        data = self.data.new_zeros((2 * old, self.data.shape[1]))
        data[:old] = self.data
        self.data = data
        self._free = list(range(2 * old - 1, old - 1, -1))

    def _shrink(self, capacity: int) -> None:
        """`capacity` slots, live slots packed to 1..n in slot order (slot numbers change)."""
        order = sorted(self.names, key=self.names.__getitem__)
        index = torch.tensor([0, *(self.names[n] for n in order)], dtype=torch.long, device=self.device)
        data = self.data.new_zeros((capacity, self.data.shape[1]))
        data[: index.numel()] = self.data.index_select(0, index)
        self.data = data
        self.names = {name: i + 1 for i, name in enumerate(order)}
        self._free = list(range(capacity - 1, len(order), -1))

    def apply(self, x: Tensor, slots: Slots, data: Tensor | None = None) -> Tensor:
        """`x (E, ..., n1*n2) -> (E, ..., m1*m2)`: entry `e` through `coeff[e] * kron(w1, w2)` of its slot
        (slots of `data`, by default the bank's current tensor)."""
        data = self.data if data is None else data
        if slots.index is None:
            assert slots.coeff is None, "a shared slot takes no per-entry coefficients"
            w1, *chain = self._split(data[slots.slot : slots.slot + 1])
        else:
            w1, *chain = self._split(data.index_select(0, slots.index))
        if slots.coeff is not None:
            w1 = w1 * slots.coeff.to(w1.dtype).view(-1, 1, 1)
        groups = w1.shape[0]  # weight sets: 1 (shared) or E
        layout = self.layout
        rows = x.reshape(groups, -1, layout.n1, layout.n2)
        return kron_rows(rows, w1, chain, layout.order).reshape(*x.shape[:-1], layout.m1 * layout.m2)


class LayerBanks:
    """One layer's banks, by signature, and where each adapter sits. Thread-safe; copies start empty."""

    def __init__(self) -> None:
        self._banks: dict[tuple[object, ...], FactorBank] = {}
        self._where: dict[str, tuple[FactorBank, int, Fingerprint]] = {}  # name -> bank, slot, state
        self._lock = threading.Lock()
        # The last `place` call's adapters, their fingerprint and the answer; reset whenever a slot changes.
        self._last: tuple[list[Any], Fingerprint, PlaceResult] | None = None

    def __deepcopy__(self, memo: dict[int, object]) -> LayerBanks:
        return LayerBanks()  # a cache: the copy rebuilds it from its own adapters

    def __getstate__(self) -> dict[str, object]:
        return {}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__()  # type: ignore[misc]

    @property
    def nbytes(self) -> int:
        return sum(bank.nbytes for bank in self._banks.values())

    def place(self, names: list[str], adapters: list[BankedAdapter]) -> PlaceResult:
        """Banks holding `adapters` (named `names`; Linear factors, no CP core) now, with their data and each
        one's `(name, slot)` pairs. A slot is rewritten when its adapter's fingerprint changed since it was
        written."""
        with self._lock:
            fingerprint = (names, *_fingerprint(adapters))
            last = self._last
            if last is not None and last[0] == adapters and last[1] == fingerprint:
                return last[2]  # steady decode: the same adapters, unchanged
            for name, adapter in zip(names, adapters, strict=True):
                self._slot(name, adapter)
            placed: dict[int, tuple[FactorBank, list[tuple[str, int]]]] = {}
            for name in names:  # read back after all writes: a release above may have moved slots
                bank, slot, _ = self._where[name]
                placed.setdefault(id(bank), (bank, []))[1].append((name, slot))
            result = [(bank, bank.data, tuple(pairs)) for bank, pairs in placed.values()]
            self._last = (list(adapters), fingerprint, result)  # holds the adapters: their ids stay unique
        return result

    def _slot(self, name: str, adapter: BankedAdapter) -> None:
        """Make `name`'s slot current (written from `adapter` unless its fingerprint is unchanged)."""
        state = _fingerprint([adapter])
        where = self._where.get(name)
        if where is not None and where[2] == state:
            return
        factors = adapter.factors()
        if factors.t2 is not None or factors.swapped:
            raise ValueError(f"adapter {name!r}: CP or swapped factors have no stacked Linear form")
        key = signature(factors)
        if where is not None and self._banks.get(key) is not where[0]:  # new shapes: its old slot goes
            self._release(name)
        with torch.inference_mode(False), torch.no_grad():  # banks are plain tensors, writable in any mode
            bank = self._banks.get(key)
            if bank is None:
                bank = self._banks[key] = FactorBank(factors)
            slot = bank.write(name, factors, adapter.scale)
        self._where[name] = (bank, slot, state)

    def release(self, name: str) -> None:
        with self._lock:
            self._release(name)

    def _release(self, name: str) -> None:
        self._last = None
        where = self._where.pop(name, None)
        if where is None:
            return
        bank = where[0]
        with torch.inference_mode(False), torch.no_grad():
            bank.release(name)
        if not bank.names:
            self._banks = {k: b for k, b in self._banks.items() if b is not bank}
        else:  # a shrink may have moved slots
            for other, slot in bank.names.items():
                self._where[other] = (bank, slot, self._where[other][2])

    def clear(self) -> None:
        with self._lock:
            self._last = None
            self._banks.clear()
            self._where.clear()
