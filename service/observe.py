"""The per-request middleware: request id, body-size limit, request metrics, one log line per request.

A plain ASGI middleware rather than `app.middleware("http")`: starlette's `BaseHTTPMiddleware` runs the app in
a task group of its own and relays every body message through a memory stream, one extra task hop per SSE
chunk of every stream, on the event loop thread that the engine thread shares the GIL with.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import PayloadTooLargeError, http_error_for
from .logs import request_id_var

if TYPE_CHECKING:
    from .routes.deps import Components

__all__ = ["ObserveMiddleware"]

log = logging.getLogger("lokr_serve")


class ObserveMiddleware:
    """Tags each HTTP request with an id (`x-request-id`, echoed back, and in log records), answers 413 to a
    declared body over the limit without reading it (and to a chunked one once it passes the limit), stamps
    `x-lokr-replica` (a forwarded answer keeps its replica's), and counts the request (route, adapter, status)
    and its latency to the last body byte."""

    def __init__(self, app: ASGIApp, components: Components, body_limit: int) -> None:
        self.app = app
        self.c = components
        self.body_limit = body_limit  # `Settings.body_limit`; uploads (PUT) have theirs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _request_headers(scope)
        rid = (headers.get(b"x-request-id", b"").decode("latin-1") or uuid.uuid4().hex[:16])[:64]
        started = time.perf_counter()
        status = 500  # what an exception escaping the app becomes (ServerErrorMiddleware, outside)
        replica = self.c.replica.encode("latin-1")

        async def send_tagged(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                out = MutableHeaders(scope=message)
                out["x-request-id"] = rid
                if "x-lokr-replica" not in out:
                    out.raw.append((b"x-lokr-replica", replica))
            await send(message)

        token = request_id_var.set(rid)
        limit = self.c.settings.max_upload_bytes if scope["method"] == "PUT" else self.body_limit
        try:
            declared = headers.get(b"content-length", b"")
            if declared.isdigit() and int(declared) > limit:
                await _too_large(limit)(scope, receive, send_tagged)
            else:
                await self._run_capped(scope, receive, send_tagged, limit)
        finally:
            request_id_var.reset(token)
            self._record(scope, status, time.perf_counter() - started, rid)

    async def _run_capped(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Run the app on a body it may read up to `limit` bytes of (a chunked body declares no length): past
        it, reading fails, and whatever the app answers to that is replaced by the one 413."""
        capped = _CappedBody(receive, limit)
        started = False

        async def send_unless_over(message: Message) -> None:
            nonlocal started
            if not capped.over:
                started = started or message["type"] == "http.response.start"
                await send(message)

        try:
            await self.app(scope, capped.receive, send_unless_over)
        except Exception:
            if not capped.over:
                raise
        if capped.over and not started:
            await _too_large(limit)(scope, receive, send)

    def _record(self, scope: Scope, status: int, elapsed: float, rid: str) -> None:
        route: Any = scope.get("route")
        label = getattr(route, "path", "unmatched")
        self.c.metrics.requests.labels(label, str(scope.get("lokr_adapter", "")), str(status)).inc()
        self.c.metrics.latency.labels(label).observe(elapsed)
        if log.isEnabledFor(logging.INFO):
            path = scope.get("path", "")
            log.info("%s %s -> %d in %.1f ms", scope["method"], path, status, elapsed * 1e3, extra={"request_id": rid})


def _too_large(limit: int) -> ASGIApp:
    err = http_error_for(PayloadTooLargeError(f"request body over the {limit}-byte limit"))
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class _CappedBody:
    """A `receive` that counts the body's bytes and fails once they pass `limit` (`over` then stays True)."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive, self._limit, self._seen = receive, limit, 0
        self.over = False

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self._seen += len(message.get("body", b""))
            if self._seen > self._limit:
                self.over = True
                raise PayloadTooLargeError(f"request body over the {self._limit}-byte limit")
        return message


def _request_headers(scope: Scope) -> dict[bytes, bytes]:
    """The two request headers the middleware reads (names arrive lower-cased in ASGI)."""
    wanted = (b"x-request-id", b"content-length")
    return {name: value for name, value in scope["headers"] if name in wanted}
