"""Folded weights `W + dW` kept from step to step, per layer (`adapter_batch`'s `fold`).

A step whose rows use the same adapters as the step before (a decode loop on one adapter, a denoising loop whose
requests keep their adapters for every step) then runs its ops on weights folded once, not once per step.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .batch import RowPlan
from .functional import LayerSpec
from .stacked import FactorBank, Slots
from .stamp import versions_of

__all__ = ["FoldCache", "Gather", "stamp"]

Gather = tuple[FactorBank, Tensor, tuple[int, ...], tuple[str, ...]]  # a bank, its data, slots and adapter names


@dataclass(frozen=True)
class _Entry:
    stamp: tuple[Any, ...]
    tensor: Tensor
    copies: int  # weight copies held (capacity units)
    names: frozenset[str]


def stamp(gathers: tuple[Gather, ...], weight: Tensor, only: frozenset[str] | None = None) -> tuple[Any, ...] | None:
    """What folded weights of these adapters (those named in `only`, if given) were made from: the base weight's
    storage and version, inference mode, and each bank's `FactorBank.stamp` of the adapters. None when an adapter
    has left its bank, or a version cannot be read (nothing is kept)."""
    version = versions_of((weight,))
    if version is None:
        return None
    parts: list[Any] = [weight.data_ptr(), version[0], torch.is_inference_mode_enabled()]
    for bank, data, slots, names in gathers:
        if only is not None:
            picked = [(slot, name) for slot, name in zip(slots, names, strict=True) if name in only]
            if not picked:
                continue
            slots, names = tuple(slot for slot, _ in picked), tuple(name for _, name in picked)
        made_from = bank.stamp(data, slots, names)
        if made_from is None:
            return None
        parts.append(made_from)
    return tuple(parts)


class FoldCache:
    """One layer's folded weights, most recently used first, `capacity` weight copies at most in all.

    Entries: an adapter run alone over a whole batch at scale 1 (key: its name, one copy), and the stacked
    weights `(S, *weight.shape)` of a mixed step's `S` row selections (key: their terms, `S` copies). An entry whose
    stamp (`stamp`) no longer matches is folded again. Thread-safe (per-row batches may run from several threads)."""

    def __init__(self) -> None:
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._lock = threading.RLock()

    def __reduce__(self) -> tuple[type[FoldCache], tuple[()]]:
        return FoldCache, ()  # copies and unpickled layers start with nothing folded

    def get(
        self,
        key: Hashable,
        made_from: tuple[Any, ...] | None,
        copies: int,
        capacity: int,
        build: Callable[[], Tensor],
        names: frozenset[str],
    ) -> Tensor:
        """The entry `key` if it was made from `made_from`, else `build()`, kept when `copies` fit `capacity`."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and made_from is not None and hit.stamp == made_from:
                self._entries.move_to_end(key)
                return hit.tensor
            tensor = build()
            self._entries.pop(key, None)
            if made_from is not None and copies <= capacity:
                self._entries[key] = _Entry(made_from, tensor, copies, names)
                self.trim(capacity)
            return tensor

    def weight(self, name: str, placed: Any, spec: LayerSpec, weight: Tensor, capacity: int) -> Tensor:
        """`W + kron(w1, w2) * scale` of `name` (`placed`: its bank, the bank's data and its `((name, slot),)`)."""
        bank, data, ((_, slot),) = placed

        def build() -> Tensor:
            a, b, shape = bank.kron_operands(Slots(slot), spec, data)
            return torch.addcmul(weight.view(shape), a[0], b[0]).view(weight.shape)

        made_from = stamp(((bank, data, (slot,), (name,)),), weight)
        return self.get(name, made_from, 1, capacity, build, frozenset((name,)))

    def hot(self, plan: RowPlan, present: list[str], placed: Any, spec: LayerSpec, weight: Tensor) -> Tensor | None:
        """The folded weight when `plan` runs one adapter at scale 1 on every row and may keep folds
        (`present`: the layer's adapters in `plan`; `placed`: their `LayerBanks.place(present)`)."""
        self.trim(plan.fold)
        if plan.fold <= 0 or len(plan.groups) != 1 or len(present) != 1:
            return None
        group = plan.groups[present[0]]
        if not (group.whole and group.unit):
            return None
        return self.weight(present[0], placed[0], spec, weight, plan.fold)

    def trim(self, capacity: int) -> None:
        """Forget the least recently used entries until at most `capacity` weight copies are held."""
        with self._lock:
            held = sum(entry.copies for entry in self._entries.values())
            while held > capacity:
                _, entry = self._entries.popitem(last=False)
                held -= entry.copies

    def drop(self, name: str | None = None) -> None:
        """Forget every entry that folds `name` in (every entry with None)."""
        with self._lock:
            for key in [key for key, entry in self._entries.items() if name is None or name in entry.names]:
                del self._entries[key]

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.tensor.numel() * e.tensor.element_size() for e in self._entries.values())
