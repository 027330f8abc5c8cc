"""Run the app under uvicorn with graceful shutdown: SIGTERM flips /ready, drains, exits 0."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

import uvicorn

from .app import create_app
from .settings import Settings

__all__ = ["serve"]


class _Server(uvicorn.Server):
    """uvicorn's Server without its own signal capture (which re-raises the signal: exit code -15)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def serve(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; then stop accepting, finish in-flight requests, exit 0."""
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) or None,
    )
    server = _Server(config)

    def on_signal(signum: int, frame: Any) -> None:
        engine = app.state.components.engine
        if engine is not None:
            engine.stop_accepting()
        server.should_exit = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.run()
    return 0
