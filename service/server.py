"""Run the app under uvicorn with graceful shutdown: SIGTERM flips /ready, drains, exits 0."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from .app import create_app, load_model, start_components
from .backend import resolve_device
from .heap import freeze_startup_heap
from .scratch import run_in_scratch_thread
from .security import describe_admin_access
from .settings import Settings

__all__ = ["serve"]

log = logging.getLogger("lokr_serve")


class _Server(uvicorn.Server):
    """uvicorn's Server without its own signal capture (which re-raises the signal: exit code -15)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def serve(settings: Settings, sock: socket.socket, on_ready: Callable[[], None] | None = None) -> int:
    """Serve on the already bound `sock` until SIGTERM/SIGINT; then finish in-flight requests, exit 0.

    The model and the `--adapter` preloads are loaded before uvicorn starts, so their errors reach the CLI
    as exceptions (one line, exit 2) instead of a lifespan traceback.
    """
    resolve_device(settings.device)  # `--device cuda` without a GPU fails before anything loads
    loaded = run_in_scratch_thread(load_model, settings)  # see service.scratch: no OpenMP team left behind
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def ready() -> None:
        log.info(
            "listening on %s (admin API: %s)",
            url,
            describe_admin_access(settings.admin_token, settings.loopback_bind, bool(settings.api_key)),
        )
        if on_ready is not None:
            on_ready()

    app = create_app(settings, loaded, on_ready=ready)
    run_in_scratch_thread(start_components, app)  # `--adapter` preloads read files and attach
    freeze_startup_heap()  # the model and libraries live until exit: later full collections skip them
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=int(settings.shutdown_grace_s) or None)
    server = _Server(config)

    def on_signal(signum: int, frame: Any) -> None:
        engine = app.state.components.engine
        if engine is not None:
            engine.stop_accepting()
        server.should_exit = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.run(sockets=[sock])
    return 0
