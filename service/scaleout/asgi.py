"""Run one HTTP request through an ASGI app in-process and stream its response back as plain data.

A replica runs the very app the single-process server runs (same routes, validation, errors, SSE), so
the ingress only has to move bytes: `Forwarded` in, `Start` then body chunks out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

__all__ = ["Forwarded", "Start", "call_app", "clean_headers"]

# Hop-by-hop or recomputed headers that must not be copied between the two HTTP legs.
_SKIP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


@dataclass(frozen=True)
class Forwarded:
    """An HTTP request as the ingress received it."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(frozen=True)
class Start:
    """Status and headers of the response; body chunks (bytes) follow."""

    status: int
    headers: list[tuple[str, str]]


def clean_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower() not in _SKIP]


async def call_app(app: Any, request: Forwarded) -> AsyncIterator[Start | bytes]:
    """Yield `Start`, then each non-empty body chunk as the app sends it (streaming passes through).

    Closing the iterator early (the client went away) tells the app the client disconnected.
    """
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "root_path": "",
        "query_string": request.query,
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in clean_headers(request.headers)]
        + [(b"content-length", str(len(request.body)).encode())],
        "client": ("ray-ingress", 0),
        "server": ("lokr-replica", 0),
    }
    sent: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await sent.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await sent.put(None)

    task = asyncio.ensure_future(run())
    try:
        while (message := await sent.get()) is not None:
            if message["type"] == "http.response.start":
                headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
                yield Start(message["status"], clean_headers(headers))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    break
    finally:
        disconnected.set()  # an unfinished stream (client gone) stops like a dropped HTTP connection
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError, Exception):
            await asyncio.wait_for(task, 10)  # the app has already answered and logged any error itself
