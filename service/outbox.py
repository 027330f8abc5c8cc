"""Events from the engine thread to the asyncio side, handed over once per step instead of once per token.

Each `call_soon_threadsafe` wakes the event loop (a write to its self-pipe) and makes the loop thread and
the engine thread take turns on the GIL; a 32-row decode step would otherwise do that 32 times.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable

from .jobs import Event

__all__ = ["Outbox"]

Deliver = Callable[[Event], None]  # runs on the loop's thread


class Outbox:
    """Collects `(loop, deliver, event)` on one owner thread; `flush` posts one callback per loop.

    Events posted from any other thread (a refused submit, shutdown) go out at once.
    """

    def __init__(self) -> None:
        self._owner: int | None = None
        self._pending: list[tuple[asyncio.AbstractEventLoop, Deliver, Event]] = []

    def bind(self) -> None:
        """Make the calling thread the owner (the engine's worker)."""
        self._owner = threading.get_ident()

    def post(self, loop: asyncio.AbstractEventLoop, deliver: Deliver, event: Event) -> None:
        if threading.get_ident() == self._owner:
            self._pending.append((loop, deliver, event))
        else:
            _call_soon(loop, [(deliver, event)])

    def flush(self) -> None:
        """Hand every pending event to its loop, in order; call on the owner thread."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Deliver, Event]]] = {}
        for loop, deliver, event in pending:
            by_loop.setdefault(loop, []).append((deliver, event))
        for loop, items in by_loop.items():
            _call_soon(loop, items)


def _call_soon(loop: asyncio.AbstractEventLoop, items: list[tuple[Deliver, Event]]) -> None:
    with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody is listening any more
        loop.call_soon_threadsafe(_deliver_all, items)


def _deliver_all(items: list[tuple[Deliver, Event]]) -> None:
    for deliver, event in items:
        deliver(event)
