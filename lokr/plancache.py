"""The last `adapter_batch` plan of each model, kept for the next block with the same rows.

A decode loop or a denoising loop opens one block per step, most of them with the rows of the step before. Building
the plan and every layer's share of it (`LoKrLayer.prepare_rows`) costs some 30 us of Python per adapted layer: 0.9 ms
per step on the serving benchmark's 28-layer Llama, 8 ms on an SD 1.5 UNet's 282 layers, time in which a GPU waits.
A kept plan is reused while nothing its layers prepared from has changed anywhere: an adapter attached, removed,
moved, cast, re-scaled or refreshed (`LayerBanks.changes`), or a module wrapped or unwrapped (`layout_epoch`). Each
layer still checks its own share as the block opens (its base op's hooks, its folded weight's stamp), so edits made
through the adapters' parameters are seen from the next block on, as before.

Plans are kept outside the model (a weak map), so copying or pickling a model never carries one.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from .batch import RowPlan, RowSpec
from .inject import layout_epoch
from .stacked import LayerBanks

__all__ = ["forget_plan", "kept_plan", "rows_key"]

_MAPPING = object()  # marks a frozen mapping in a key: no row selection a caller writes can equal it


@dataclass
class _Kept:
    key: Hashable
    state: tuple[int, int]
    plan: RowPlan
    open: int = 0  # blocks running on it now: a kept plan serves one block at a time


class _Plans:
    """Model -> its kept plan, for as long as the model lives."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_model: weakref.WeakKeyDictionary[nn.Module, _Kept] = weakref.WeakKeyDictionary()


_PLANS = _Plans()


def rows_key(rows: Sequence[RowSpec], tokens: bool, fold: int) -> Hashable | None:
    """What a plan is built from, hashable; None when a selection cannot be frozen (that plan is not kept)."""
    key: tuple[object, ...] = tuple(rows)
    try:
        hash(key)
    except TypeError:
        frozen = tuple(_frozen(spec) for spec in rows)
        try:
            hash(frozen)
        except TypeError:
            return None
        key = frozen
    return (key, tokens, fold)


def _frozen(spec: RowSpec) -> object:
    if spec is None or isinstance(spec, str):
        return spec
    if isinstance(spec, Mapping):
        return (_MAPPING, tuple(spec.items()))
    return tuple(tuple(pair) if isinstance(pair, list) else pair for pair in spec)


@contextmanager
def kept_plan(model: nn.Module, rows: Sequence[RowSpec], *, tokens: bool, fold: int) -> Iterator[RowPlan]:
    """The plan for `rows`: the model's kept one when it was built from the same rows and nothing has changed since
    (its layers' shares come with it), else a new one, kept for the next block."""
    key = rows_key(rows, tokens, fold)
    state = (LayerBanks.changes, layout_epoch())  # read before building: a change made meanwhile fails the next check
    kept = _take(model, key, state)
    if kept is None:
        kept = _Kept(key, state, RowPlan.from_rows(rows, tokens=tokens, fold=fold), open=1)
        if key is not None:
            with _PLANS.lock:
                current = _PLANS.by_model.get(model)
                if current is None or not current.open:
                    _PLANS.by_model[model] = kept
    try:
        yield kept.plan
    finally:
        with _PLANS.lock:
            kept.open -= 1


def _take(model: nn.Module, key: Hashable | None, state: tuple[int, int]) -> _Kept | None:
    if key is None:
        return None
    with _PLANS.lock:
        kept = _PLANS.by_model.get(model)
        if kept is None or kept.open or kept.state != state or kept.key != key:
            return None
        kept.open += 1
        return kept


def forget_plan(model: nn.Module) -> None:
    """Drop `model`'s kept plan (it holds the tensors its layers ran on): after adapters leave, their memory is
    freed now, not at the next block."""
    with _PLANS.lock:
        _PLANS.by_model.pop(model, None)
