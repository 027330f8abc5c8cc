"""Server-sent events: the streamed answers' response class and event text."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

__all__ = ["STREAMABLE", "SseResponse", "sse_event"]

# The OpenAPI document of a route that answers JSON, or SSE with `"stream": true`.
STREAMABLE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {}, "text/event-stream": {}}, "description": "JSON, or SSE when streaming"}
}


def sse_event(data: Any, event: str | None = None) -> str:
    """One event: `data` as JSON, under the event name `event` where given."""
    head = "" if event is None else f"event: {event}\n"
    return f"{head}data: {json.dumps(data)}\n\n"


class SseResponse(StreamingResponse):
    """A streamed answer that runs `on_close` however it ends: finished, failed, or its client gone before the
    first byte (when the body's generator never starts, its own cleanup never runs)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
