"""Run the app under uvicorn with graceful shutdown: SIGTERM flips /ready, drains, exits 0."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from .app import STOP_JOIN_S, create_app, load_model, start_components
from .backend import resolve_device
from .engine import Engine
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


def _end_within(engine: Engine, grace_s: float) -> None:
    """Requests still running `grace_s` after the signal end with a 503 (streams: an error event), so their
    clients hear why and the HTTP server's wait ends with them."""
    if not engine.drain(grace_s):
        log.warning("requests still running %.0fs after the signal end with a 503", grace_s)
        engine.stop(STOP_JOIN_S)


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
    # uvicorn's own wait must outlast ours: when it runs out it cancels every request task, and the 503s that
    # `_end_within` makes the engine send would never reach their clients
    outlast = math.ceil(settings.shutdown_grace_s + STOP_JOIN_S) + 2
    config = uvicorn.Config(app, log_config=None, log_level="warning", timeout_graceful_shutdown=outlast)
    server = _Server(config)

    def on_signal(signum: int, frame: Any) -> None:
        engine = app.state.components.engine
        if server.should_exit:  # a second Ctrl-C / SIGTERM: stop waiting
            server.force_exit = True
        elif engine is not None:
            engine.stop_accepting()
            threading.Thread(
                target=_end_within, args=(engine, settings.shutdown_grace_s), name="lokr-shutdown", daemon=True
            ).start()
        server.should_exit = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.run(sockets=[sock])
    return 0
