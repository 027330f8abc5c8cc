"""Resizing a factor bank's storage in place, for callers that run every forward and every attach on one thread.

A bank that fills up (or empties past its spare slots) normally moves to a new tensor and re-points every member's
parameters at it: Python work in the number of members (~0.3 s per resize over a 28-layer model's banks at 1,000
adapters), so the attach or unload that resizes stalls a serving engine's next step by that much. Resizing the
tensor's storage instead keeps every parameter (a view of it) valid: growing re-points nothing, shrinking only the
few members moved down from the dropped rows. It frees the old memory at once and moves rows under any plan made
before, so it is only safe when no forward on another thread can be reading the bank: `grow_in_place()` is that
promise, made by a caller (a server's engine thread, which runs the steps and the commands between them), never
assumed.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor

__all__ = ["grow_in_place", "growing_in_place", "resize_rows"]

_IN_PLACE: contextvars.ContextVar[bool] = contextvars.ContextVar("lokr_grow_in_place", default=False)


@contextmanager
def grow_in_place() -> Iterator[None]:
    """Inside the block (this thread / task only), banks that fill up or empty out resize their storage in place.
    Use only where no forward through the same model runs on another thread meanwhile."""
    token = _IN_PLACE.set(True)
    try:
        yield
    finally:
        _IN_PLACE.reset(token)


def growing_in_place() -> bool:
    return _IN_PLACE.get()


def resize_rows(data: Tensor, rows: int) -> bool:
    """Make `data (n, D)` (contiguous, alone in its storage) `(rows, D)` in place: rows past `rows` are dropped, new
    ones are zero; every view of the rows kept stays valid. False, with nothing changed, where its storage cannot be
    resized (shared, foreign memory)."""
    n, width = data.shape
    size = data.element_size()
    storage = data.untyped_storage()
    if not data.is_contiguous() or data.storage_offset() != 0 or storage.nbytes() != n * width * size:
        return False
    try:
        storage.resize_(rows * width * size)
    except RuntimeError:
        return False
    data.set_(storage, 0, (rows, width), (width, 1))
    if rows > n:
        data[n:].zero_()
    return True
