"""Factor banks: the one device copy of every adapter of a layer, one row (slot) per adapter.

Adapters of a layer with the same factor names and shapes, dtype and device share a `FactorBank`. Row `slot` holds
the adapter's scale and then its factors (PEFT's names, flattened in `FACTOR_NAMES` order), and the adapter's
parameters are views of that row: in-place edits, `load_state_dict`, optimiser steps, merges and saves read and write
the bank itself, so nothing needs to be kept in sync. A mixed-adapter step gathers the factors of all its entries with
one `index_select` and runs them through batched matmuls.

Banks keep under 5% spare slots (`SLACK`, `SHRINK_AT`); a bank that grows or shrinks gets a new tensor, every
member's parameters re-pointed at it (`p.data = view`: parameters, and optimisers holding them, stay valid). A forward
holds the tensor it started with, so a concurrent resize cannot free it. Inside `lokr.grow_in_place()` (a caller that
runs no forward on another thread) the tensor is resized in place instead (`lokr.growth`)."""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .bankrows import BankedAdapter, BankLayout, ScaleTally
from .functional import Factors, LayerSpec, factored_cost
from .growth import growing_in_place, resize_rows
from .stamp import Same, Stamp, versions_of

__all__ = ["BankLayout", "BankedAdapter", "FactorBank", "LayerBanks", "Slots", "slot_nbytes"]

SLACK = 32  # a full bank grows by max(1, capacity // SLACK) slots
SHRINK_AT, SHRINK_TO = 20, 64  # it shrinks past capacity // SHRINK_AT spare slots, to members // SHRINK_TO spare:
# spare slots stay under 5% of a bank, and a run of unloads shrinks it once per ~3% of its members, not at each one
FOLD_CACHE = 8  # adapter sets whose kron operands a bank keeps between steps (`fold_operands`)
PLACED_KEPT = 8  # adapter sets whose `LayerBanks.place` answer a layer keeps between steps
_CHANGES = itertools.count(1)  # `LayerBanks.changes`

KronOperands = tuple[Tensor, Tensor, tuple[int, ...]]  # (a, b, shape): dW[e] = (a[e] * b[e]).reshape(weight)
# For a forward: each bank, its `data` at that moment and the `(name, slot)` pairs it holds.
PlaceResult = list[tuple["FactorBank", Tensor, tuple[tuple[str, int], ...]]]


@dataclass(frozen=True)
class Slots:
    """Which rows each entry of a batched delta uses: one slot for all (`index` None) or a slot per entry."""

    slot: int = 0
    index: Tensor | None = None  # (E,) long
    coeff: Tensor | None = None  # (E,) per-entry multiplier on top of each slot's scale; None means 1


def slot_nbytes(adapter: nn.Module) -> int:
    """Device bytes one adapter takes on one layer: its factors plus its scale (one element)."""
    params = [p for p in adapter.parameters()]
    return (sum(p.numel() for p in params) + 1) * params[0].element_size()


def _signature(adapter: BankedAdapter) -> tuple[object, ...]:
    first = next(p for p in adapter._parameters.values() if p is not None)
    return (BankLayout.of(adapter), first.dtype, first.device)


@contextmanager
def _writable() -> Iterator[None]:
    """Bank tensors are plain tensors, written outside autograd and outside inference mode."""
    with torch.inference_mode(False), torch.no_grad():
        yield


class FactorBank:
    """The rows of every adapter with one signature on one layer; `data (capacity, row_numel)`."""

    def __init__(self, layout: BankLayout, dtype: torch.dtype, device: torch.device) -> None:
        self.layout, self.dtype, self.device = layout, dtype, device
        self.data = torch.zeros((0, layout.row_numel), dtype=dtype, device=device)
        self.slots: dict[str, int] = {}
        self.members: dict[str, BankedAdapter] = {}
        self._free: list[int] = []  # popped from the end: lowest slot first
        self._cost: dict[LayerSpec, int] = {}
        self._folds: dict[tuple[LayerSpec, tuple[int, ...]], tuple[Stamp, KronOperands]] = {}  # `fold_operands`
        self.scales = ScaleTally()  # the members' scales (their rows' column 0)

    @property
    def capacity(self) -> int:
        return self.data.shape[0]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def add(self, name: str, adapter: BankedAdapter) -> None:
        """Copy `adapter`'s scale and factors into a free row and make its parameters views of it."""
        if not self._free:
            self._grow(self.capacity + max(1, self.capacity // SLACK))
        slot = self._free.pop()
        row = self.data[slot]
        row[0] = adapter.scale
        self.scales.set(name, adapter.scale)
        for pname, view in self.layout.row_views(row):
            view.copy_(adapter._parameters[pname])  # type: ignore[arg-type]
        self.slots[name], self.members[name] = slot, adapter
        self._bind((name,))

    def remove(self, name: str) -> None:
        """Give `name`'s parameters their own copy, zero its row (nothing of it is kept) and free the slot."""
        slot, adapter = self.slots.pop(name), self.members.pop(name)
        self.scales.set(name, None)
        base = self.data.untyped_storage().data_ptr()
        for pname, _, _ in self.layout.parts:
            p = adapter._parameters.get(pname)
            if p is not None and p.untyped_storage().data_ptr() == base:
                p.data = p.data.clone()
        self.data[slot].zero_()
        self._free.append(slot)
        if self.slots and len(self._free) > max(1, self.capacity // SHRINK_AT):
            self._shrink(len(self.slots) + len(self.slots) // SHRINK_TO)

    def at_home(self, name: str) -> bool:
        """True while `name`'s parameters are still the views of its row (not replaced, moved or cast)."""
        adapter, row = self.members[name], self.data[self.slots[name]]
        return all(
            (p := adapter._parameters.get(pname)) is not None
            and p.data_ptr() == view.data_ptr()
            and p.dtype == view.dtype
            and p.shape == view.shape
            for pname, view in self.layout.row_views(row)
        ) and len([p for p in adapter._parameters.values() if p is not None]) == len(self.layout.parts)

    def set_scale(self, name: str, scale: float) -> None:
        self.data[self.slots[name], 0] = scale
        self.scales.set(name, scale)

    def apply_(self, fn: Callable[[Tensor], Tensor]) -> None:
        """`fn` (a module `_apply` function: `.to()`, `.half()`...) on the data; members follow."""
        self.data = fn(self.data)
        self.dtype, self.device = self.data.dtype, self.data.device
        self._folds = {}
        self._bind(self.members)

    def _bind(self, names: Iterable[str]) -> None:
        """Point the parameters of `names` at their rows: a row of one `(capacity, *shape)` view per factor each
        (for a quarter of the rows or more, all rows' views made at once: half the Python time of one at a time)."""
        names = list(names)
        for pname, shape, offset in self.layout.parts:
            full = self.data[:, offset : offset + math.prod(shape)].view(-1, *shape)
            rows = full.unbind(0) if 4 * len(names) > len(full) else full
            for name in names:
                params, row = self.members[name]._parameters, rows[self.slots[name]]
                param = params[pname]
                if param is not None and versions_of((param,)) is not None:
                    param.data = row  # the same object: optimizers and hooks may hold it
                else:  # made under inference mode it keeps no version counter, which views and caches need
                    params[pname] = nn.Parameter(row, requires_grad=False)

    def _grow(self, capacity: int) -> None:
        """`capacity` rows; in place where the caller allows it (`lokr.growth`): members stay where they are."""
        old = self.capacity
        if growing_in_place() and old and resize_rows(self.data, capacity):
            self._free, self._folds = list(range(capacity - 1, old - 1, -1)), {}
        else:
            self._resize(capacity)

    def _shrink(self, capacity: int) -> None:
        """`capacity` rows (at least the members); in place where the caller allows it: members in the rows dropped
        move down into free ones first, and only they are re-pointed."""
        if growing_in_place():
            movers = sorted((s, n) for n, s in self.slots.items() if s >= capacity)
            holes = sorted(s for s in self._free if s < capacity)[: len(movers)]
            if movers:
                src = torch.tensor([s for s, _ in movers], dtype=torch.long, device=self.device)
                dst = torch.tensor(holes, dtype=torch.long, device=self.device)
                self.data.index_copy_(0, dst, self.data.index_select(0, src))
                self.slots.update((n, hole) for (_, n), hole in zip(movers, holes, strict=True))
                self._bind([n for _, n in movers])
            if resize_rows(self.data, capacity):
                taken = set(self.slots.values())
                self._free = [s for s in range(capacity - 1, -1, -1) if s not in taken]
                self._folds = {}
                return
        self._resize(capacity)

    def _resize(self, capacity: int) -> None:
        """A new `data` of `capacity` rows, members packed to the lowest slots in slot order; re-point them."""
        order = sorted(self.slots, key=self.slots.__getitem__)
        data = self.data.new_zeros((capacity, self.data.shape[1]))
        if order:
            index = torch.tensor([self.slots[n] for n in order], dtype=torch.long, device=self.device)
            data[: len(order)] = self.data.index_select(0, index)
        self.data, self._folds = data, {}
        self.slots = {name: i for i, name in enumerate(order)}
        self._free = list(range(capacity - 1, len(order) - 1, -1))
        self._bind(order)

    # ---------------------------------------------------------------------------- compute
    def _rows(self, slots: Slots, data: Tensor | None) -> Tensor:
        """The rows of the entries `(G, row_numel)`: G = 1 for a shared slot (a view), else gathered."""
        data = self.data if data is None else data
        return data[slots.slot : slots.slot + 1] if slots.index is None else data.index_select(0, slots.index)

    def kron_operands(self, slots: Slots, spec: LayerSpec, data: Tensor | None = None) -> KronOperands:
        """`(a, b, shape)` with `dW = (a[e] * b[e]).reshape(weight_shape)` for each entry `e` (its coefficient
        included), and `shape` the view of the weight that `a[e] * b[e]` broadcasts to, as PEFT lays `dW` out."""
        parts = self.layout.split(self._rows(slots, data))
        coeff = parts.pop("scale") if slots.coeff is None else parts.pop("scale") * slots.coeff.to(self.dtype)
        w1 = parts["w1"] if "w1" in parts else torch.bmm(parts["w1_a"], parts["w1_b"])
        w1 = w1 * coeff.view(-1, 1, 1)
        groups, (m1, n1) = w1.shape[0], w1.shape[1:]
        if "w2" in parts:
            w2 = parts["w2"]
        elif "t2" in parts:
            w2 = torch.einsum("g i j k l, g i p, g j r -> g p r k l", parts["t2"], parts["w2_a"], parts["w2_b"])
        else:
            w2 = torch.bmm(parts["w2_a"], parts["w2_b"])
        m2 = w2.shape[1]
        w2 = w2.reshape(groups, m2, -1, *spec.kernel)  # (G, m2, n2, *k)
        n2, k, pad = w2.shape[2], spec.kernel, (1,) * len(spec.kernel)
        if self.layout.swapped:  # PEFT's Conv1d full-w2 layout: kron(w2, w1[..., None])
            return w2.view(groups, m2, 1, n2, 1, *k), w1.view(groups, 1, m1, 1, n1, *pad), (m2, m1, n2, n1, *k)
        return w1.view(groups, m1, 1, n1, 1, *pad), w2.view(groups, 1, m2, 1, n2, *k), (m1, m2, n1, n2, *k)

    def fold_operands(
        self, slots: tuple[int, ...], names: tuple[str, ...], spec: LayerSpec, data: Tensor
    ) -> KronOperands:
        """`kron_operands` of the entries at `slots` (adapters `names`), kept from step to step while their `stamp`
        holds, so a steady selection is not rebuilt."""
        made_from = self.stamp(data, slots, names)
        key = (spec, slots)
        cached = self._folds.get(key)
        if cached is not None and made_from is not None and cached[0] == made_from:
            return cached[1]
        index = torch.tensor(slots, dtype=torch.long, device=data.device)
        operands = self.kron_operands(Slots(0, index), spec, data)
        if made_from is not None:
            if len(self._folds) >= FOLD_CACHE:
                self._folds.clear()
            self._folds[key] = (made_from, operands)
        return operands

    def stamp(self, data: Tensor, slots: tuple[int, ...], names: tuple[str, ...]) -> Stamp | None:
        """What a result from `names` at `slots` of `data` was made from: that very tensor (held: its memory is not
        reused) at its version, the slots, the members' parameter versions, inference mode. None: a name left."""
        versions = self.member_versions(names)
        if versions is None:
            return None
        return (Same(data), data._version, slots, versions, torch.is_inference_mode_enabled())

    def member_versions(self, names: tuple[str, ...]) -> tuple[int, ...] | None:
        """The version counters of `names`' parameters; None when one has left the bank since or keeps no counter
        (no caching)."""
        out: list[int] = []
        for name in names:
            member = self.members.get(name)
            if member is None:
                return None
            versions = versions_of(p for p in member._parameters.values() if p is not None)
            if versions is None:
                return None
            out.extend(versions)
        return tuple(out)

    def factored_cost(self, spec: LayerSpec) -> int:
        """Multiply-adds per output position of one member's factored delta on a layer of `spec`."""
        cost = self._cost.get(spec)
        if cost is None:
            parts = {name: t[0] for name, t in self.layout.split(self.data[:1]).items() if name != "scale"}
            cost = self._cost[spec] = factored_cost(Factors(**parts, swapped=self.layout.swapped), spec)
        return cost


class LayerBanks:
    """One layer's banks, by signature, and where each adapter sits. Thread-safe; copies start empty. `changes`
    (class-wide) moves on whenever an adapter comes, goes, moves, is cast, re-scaled or refreshed on any layer."""

    changes = 0

    @classmethod
    def _changed(cls) -> None:
        cls.changes = next(_CHANGES)

    def __init__(self) -> None:
        self._banks: dict[tuple[object, ...], FactorBank] = {}
        self._where: dict[str, FactorBank] = {}
        self._placed: dict[tuple[str, ...], PlaceResult] = {}  # recent `place` answers, until anything moves
        self._lock = threading.RLock()

    def __reduce__(self) -> tuple[type[LayerBanks], tuple[()]]:
        return LayerBanks, ()  # copies and unpickled ones start empty: their layer re-homes its (copied) adapters

    @property
    def nbytes(self) -> int:
        return sum(bank.nbytes for bank in self._banks.values())

    def bank_of(self, name: str) -> FactorBank | None:
        return self._where.get(name)

    def add(self, name: str, adapter: BankedAdapter) -> None:
        """Home `adapter` as `name` (an adapter already there under that name leaves first)."""
        with self._lock, _writable():
            self._remove(name)
            self._placed = {}
            LayerBanks._changed()
            key = _signature(adapter)
            bank = self._banks.get(key)
            if bank is None:
                bank = self._banks[key] = FactorBank(key[0], key[1], key[2])  # type: ignore[arg-type]
            bank.add(name, adapter)
            self._where[name] = bank
            adapter._set_home((self, name))

    def remove(self, name: str) -> None:
        """`name` leaves: its parameters get their own storage (same values), its row is zeroed."""
        with self._lock, _writable():
            self._remove(name)

    def _remove(self, name: str) -> None:
        bank = self._where.pop(name, None)
        if bank is None:
            return
        self._placed = {}
        LayerBanks._changed()
        adapter = bank.members[name]
        bank.remove(name)
        adapter._set_home(None)
        if not bank.slots:
            self._banks = {k: b for k, b in self._banks.items() if b is not bank}

    def rehome(self, name: str) -> None:
        """After `name`'s parameters were replaced, moved or cast: put them back into (the right) bank."""
        with self._lock:
            bank = self._where.get(name)
            if bank is None:
                return
            if bank.at_home(name):
                return
            adapter = bank.members[name]
            self.add(name, adapter)

    def set_scale(self, name: str, scale: float) -> None:
        with self._lock, _writable():
            self._where[name].set_scale(name, scale)
            LayerBanks._changed()

    def refresh(self) -> None:
        """Re-home every adapter whose parameters were given other storage; forget every bank's kron operands."""
        with self._lock:
            LayerBanks._changed()
            for name in list(self._where):
                self.rehome(name)
            for bank in self._banks.values():
                bank._folds = {}

    def place(self, names: list[str]) -> PlaceResult:
        """Banks holding `names` now, with their data and each one's `(name, slot)` pairs (name order); kept for
        the next steps with the same names until an adapter comes, goes or moves."""
        key = tuple(names)
        with self._lock:
            if (result := self._placed.get(key)) is None:
                placed: dict[int, tuple[FactorBank, list[tuple[str, int]]]] = {}
                for name in names:
                    bank = self._where[name]
                    placed.setdefault(id(bank), (bank, []))[1].append((name, bank.slots[name]))
                result = [(bank, bank.data, tuple(pairs)) for bank, pairs in placed.values()]
                self._placed = {} if len(self._placed) >= PLACED_KEPT else self._placed
                self._placed[key] = result
            return result

    def apply_(self, fn: Callable[[Tensor], Tensor]) -> None:
        """A module `_apply` (`.to()`, `.half()`...): every bank's data through `fn`, members re-pointed."""
        with self._lock, _writable():
            LayerBanks._changed()
            banks, self._banks, self._placed = list(self._banks.values()), {}, {}
            for bank in banks:
                bank.apply_(fn)
                key = (bank.layout, bank.dtype, bank.device)
                if key not in self._banks:
                    self._banks[key] = bank
                    continue
                for name, adapter in list(bank.members.items()):  # two banks became one signature: merge
                    self._where.pop(name)
                    bank.remove(name)
                    self.add(name, adapter)
