"""Per-row adapter selection: which adapter(s), at which scale, each row of the next forward uses.

`accumulate` / `scatter_add` / `per_row` add a delta computed for some rows back into the batch's result.

A selection is scoped (`adapter_batch`) and lives in a `ContextVar`, so it is visible only to the
thread / task that opened the scope, and it is gone when the scope ends, even on error.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .errors import AdapterNotFoundError, ConfigError
from .stacked import Slots

__all__ = [
    "RowGroup",
    "RowPlan",
    "RowSpec",
    "accumulate",
    "current_plan",
    "forget_prepared",
    "per_row",
    "restrict_rows",
    "scatter_add",
    "selection_scope",
]

# One row's selection: None (base model), an adapter name, or (name, scale) pairs summed.
RowSpec = None | str | Sequence[tuple[str, float]] | Mapping[str, float]


@dataclass
class RowGroup:
    """The rows that use one adapter, with each row's scale. Index tensors are cached per device."""

    name: str
    rows: list[int] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    whole: bool = False  # every row of the batch (rows are ascending and unique): no gather / scatter
    unit: bool = True  # every scale is 1.0: no per-row multiply
    _index: dict[torch.device, Tensor] = field(default_factory=dict, repr=False)
    _scale: dict[tuple[torch.device, torch.dtype], Tensor] = field(default_factory=dict, repr=False)

    def index(self, device: torch.device) -> Tensor:
        if device not in self._index:
            self._index[device] = torch.tensor(self.rows, dtype=torch.long, device=device)
        return self._index[device]

    def scale_tensor(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """`(len(rows),)` per-row scales."""
        key = (device, dtype)
        if key not in self._scale:
            self._scale[key] = torch.tensor(self.scales, dtype=dtype, device=device)
        return self._scale[key]


@dataclass
class RowPlan:
    """Rows grouped by adapter: the forward loops over adapters, never over rows."""

    num_rows: int
    groups: dict[str, RowGroup]
    tokens: bool = False  # rows are the positions of dim 1 of a batch of one (a packed sequence)
    fold: int = 0  # folded weight copies each layer may keep between blocks (`lokr.foldcache`; 0: none)
    _entries: dict[tuple[tuple[tuple[str, int], ...], torch.device], tuple[Tensor | None, Slots]] = field(
        default_factory=dict, repr=False
    )
    _indexes: dict[tuple[tuple[int, ...], torch.device], Tensor] = field(default_factory=dict, repr=False)
    # Per layer (by id), what its inference forward needs (`layer._Prepared`), prepared as the scope opens.
    prepared: dict[int, Any] = field(default_factory=dict, repr=False)
    # What layers derive from the plan alone and share (`merged.plan_merge`'s row selections), by key.
    shared: dict[Any, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_rows(cls, rows: Sequence[RowSpec], tokens: bool = False, fold: int = 0) -> RowPlan:
        if isinstance(rows, str):  # a string is a sequence too: "ab" would be rows "a" and "b"
            raise ConfigError(f"rows holds one selection per row, not one name ({rows!r}); e.g. [{rows!r}] * batch")
        groups: dict[str, RowGroup] = {}
        resolved: dict[object, list[tuple[RowGroup, float]]] = {}  # rows repeat specs (a packed step: one per token)
        for i, spec in enumerate(rows):
            key = spec if spec is None or isinstance(spec, str) else id(spec)  # every row's spec is alive: ids differ
            terms = resolved.get(key)
            if terms is None:
                terms = resolved[key] = [(groups.setdefault(n, RowGroup(n)), s) for n, s in _normalise(spec)]
            for group, scale in terms:
                group.rows.append(i)
                group.scales.append(scale)
        groups = dict(sorted(groups.items()))  # stable order: the same adapters give the same bank-entry cache key
        for group in groups.values():  # decided once per batch, not in every layer's forward
            group.whole = len(group.rows) == len(rows)
            group.unit = all(s == 1.0 for s in group.scales)
        return cls(len(rows), groups, tokens, fold)

    def row_index(self, values: list[int], device: torch.device) -> Tensor:
        """`values` as a long tensor on `device`, made once per plan (layers share it)."""
        key = (tuple(values), device)
        index = self._indexes.get(key)
        if index is None:
            index = self._indexes[key] = torch.tensor(values, dtype=torch.long, device=device)
        return index

    @property
    def adapter_names(self) -> set[str]:
        return set(self.groups)

    def bank_entries(self, pairs: tuple[tuple[str, int], ...], device: torch.device) -> tuple[Tensor | None, Slots]:
        """`(rows, slots)` for one factor bank holding the adapters `pairs` = `((name, slot), ...)`.

        One adapter on every row at scale 1: no rows, one shared slot. Exactly one of them on every row: `rows`
        is None and the slots are in row order. Otherwise one entry per (row, adapter) pair, to be scattered back
        by `rows`. Cached per plan and device.
        """
        key = (pairs, device)
        cached = self._entries.get(key)
        if cached is None:
            cached = self._entries[key] = self._bank_entries(pairs, device)
        return cached

    def _bank_entries(self, pairs: tuple[tuple[str, int], ...], device: torch.device) -> tuple[Tensor | None, Slots]:
        groups = [self.groups[name] for name, _ in pairs]
        if len(groups) == 1 and groups[0].whole and groups[0].unit:
            return None, Slots(pairs[0][1])
        triples = [(r, slot, s) for g, (_, slot) in zip(groups, pairs) for r, s in zip(g.rows, g.scales, strict=True)]
        rows = [r for r, _, _ in triples]
        if sorted(rows) == list(range(self.num_rows)):  # one adapter of the bank per row: row order, no scatter
            triples.sort()
            row_tensor = None
        else:
            row_tensor = torch.tensor(rows, dtype=torch.long, device=device)
        slots, scales = [slot for _, slot, _ in triples], [s for _, _, s in triples]
        coeff = None if all(s == 1.0 for s in scales) else torch.tensor(scales, dtype=torch.float32, device=device)
        return row_tensor, Slots(0, torch.tensor(slots, dtype=torch.long, device=device), coeff)


def restrict_rows(rows: Sequence[RowSpec], names: Container[str]) -> list[RowSpec]:
    """`rows` with only the adapters in `names` (the ones one layer has), for a scope over that layer alone: a row
    left with none runs the base op there. Rows repeat their specs (a packed step: one per token); each is read
    once."""
    out: dict[int, RowSpec] = {}  # by id: every spec is alive while `rows` is
    kept: list[RowSpec] = []
    for spec in rows:
        if spec is None or isinstance(spec, str):
            kept.append(spec if spec is None or spec in names else None)
            continue
        if id(spec) not in out:
            out[id(spec)] = [(n, s) for n, s in _normalise(spec) if n in names] or None
        kept.append(out[id(spec)])
    return kept


def _normalise(spec: RowSpec) -> list[tuple[str, float]]:
    if spec is None:
        return []
    if isinstance(spec, str):
        return [(spec, 1.0)]
    if not isinstance(spec, (Mapping, Sequence)):
        raise ConfigError(f"a row selection must be None, a name, or (name, scale) pairs; got {spec!r}")
    pairs = list(spec.items()) if isinstance(spec, Mapping) else list(spec)
    out: dict[str, float] = {}
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)):
            raise ConfigError(f"a row selection must be None, a name, or (name, scale) pairs; got {pair!r}")
        name, scale = pair[0], _scale(pair)
        if scale != scale or scale in (float("inf"), float("-inf")):
            raise ConfigError(f"scale for adapter {name!r} must be finite, got {scale}")
        out[name] = out.get(name, 0.0) + scale  # the same adapter twice: scales add (deltas are linear)
    return [(n, s) for n, s in out.items() if s != 0.0]


def _scale(pair: Sequence[Any]) -> float:
    try:
        return float(pair[1])
    except (TypeError, ValueError):
        raise ConfigError(f"scale for adapter {pair[0]!r} must be a number, got {pair[1]!r}") from None


@dataclass(frozen=True)
class _Scope:
    layer_ids: frozenset[int]
    plan: RowPlan


_SCOPES: contextvars.ContextVar[tuple[_Scope, ...]] = contextvars.ContextVar("lokr_row_scopes", default=())


def current_plan(layer: object) -> RowPlan | None:
    """The innermost plan whose scope covers `layer`, if any."""
    for scope in reversed(_SCOPES.get()):
        if id(layer) in scope.layer_ids:
            return scope.plan
    return None


@contextmanager
def selection_scope(layers: Sequence[object], plan: RowPlan, known: Callable[[str], bool]) -> Iterator[RowPlan]:
    """Make `plan` visible to `layers` for the duration of the `with` block (this context only)."""
    unknown = sorted(n for n in plan.adapter_names if not known(n))
    if unknown:
        raise AdapterNotFoundError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
    token = _SCOPES.set((*_SCOPES.get(), _Scope(frozenset(id(m) for m in layers), plan)))
    try:
        yield plan
    finally:
        _SCOPES.reset(token)


def forget_prepared(layers: Sequence[object]) -> None:
    """Drop what the open plans of this context prepared for `layers`; each prepares again on its next forward."""
    ids = {id(layer) for layer in layers}
    for scope in _SCOPES.get():
        for key in ids & scope.plan.prepared.keys():
            del scope.plan.prepared[key]


# ------------------------------------------------------------------------------------------ combining rows
def accumulate(result: Tensor, delta: Tensor) -> Tensor:
    """`result + delta`, in place when nothing needs the graph and no dtype promotion is involved."""
    if torch.is_grad_enabled() or result.dtype != delta.dtype or result.shape != delta.shape:
        return result + delta
    return result.add_(delta)


def scatter_add(result: Tensor, index: Tensor, delta: Tensor) -> Tensor:
    """`result[index] += delta` (rows of dim 0), promoting dtype like `+`; in place when no graph is needed."""
    result = result.to(torch.promote_types(result.dtype, delta.dtype))
    if torch.is_grad_enabled():
        return result.index_add(0, index, delta.to(result.dtype))
    return result.index_add_(0, index, delta.to(result.dtype))


def per_row(scales: Tensor, like: Tensor) -> Tensor:
    """`(rows,)` scales shaped to broadcast over `like (rows, ...)`."""
    return scales.view(-1, *([1] * (like.dim() - 1)))
