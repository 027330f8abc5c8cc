"""A client that closes its connection cancels its work: the engine jobs of an answer nobody will read."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

from starlette.requests import Request

from .errors import ClientGoneError

__all__ = ["unless_gone", "until_disconnected"]

T = TypeVar("T")


async def until_disconnected(request: Request) -> None:
    """Wait on the request's ASGI channel until it says `http.disconnect` (the body was read already).

    A blocking receive, not `request.is_disconnected()` polling: behind a `BaseHTTPMiddleware` the poll's
    instantly cancelled receive never sees the disconnect.
    """
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_gone(work: Awaitable[T], gone: Callable[[], Awaitable[None]], what: str) -> T:
    """`work`'s result; when `gone()` ends first (the client left), `work` is cancelled and `ClientGoneError`
    raised, saying `what` was cancelled."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            raise ClientGoneError(f"the client closed the connection; {what} cancelled")
        return task.result()
    finally:
        watcher.cancel()
        task.cancel()
        for future in (task, watcher):  # each outcome read: no "exception was never retrieved"
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await future
