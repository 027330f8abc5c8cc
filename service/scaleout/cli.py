"""`lokr-serve ray`: start (or join) Ray, deploy the application, tear it down on SIGTERM."""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

from ..settings import Settings
from .app import Scale, build_application

__all__ = ["RAY_FLAGS", "run"]

APP_NAME = "lokr-serve"

RAY_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--num-replicas", {"type": int, "help": "replicas of the engine (fixed, or the initial count when autoscaling)"}),
    ("--address", {"help": "join this Ray cluster (default: start a local Ray instance)"}),
    ("--min-replicas", {"type": int, "help": "autoscaling lower bound"}),
    ("--max-replicas", {"type": int, "help": "autoscaling upper bound"}),
    ("--target-ongoing-requests", {"type": float, "help": "autoscaling target per replica"}),
    ("--replica-cpus", {"type": float, "help": "CPUs reserved per replica (default 1)"}),
    ("--num-cpus", {"type": int, "help": "CPUs of a local Ray instance (default: all)"}),
    ("--object-store-bytes", {"type": int, "help": "object store size of a local Ray instance"}),
]


class _Stop(Exception):
    """SIGTERM/SIGINT arrived while deploying."""


def run(settings: Settings, args: Any) -> int:
    """Deploy and block until SIGTERM/SIGINT; then delete the app and stop the Ray instance we started."""
    import ray
    from ray import serve

    scale = Scale.for_settings(
        settings,
        num_replicas=args.num_replicas,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests,
        replica_cpus=args.replica_cpus,
    )
    # this run's uploads in a folder of its own, deleted at exit (the catalog that knew them is gone by then)
    uploads = Path(tempfile.mkdtemp(prefix="ray-run-", dir=settings.upload_root()))
    settings = settings.model_copy(update={"upload_dir": uploads})
    application = build_application(settings, scale)  # flag errors before anything starts
    stop, deployed = threading.Event(), threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()
        if not deployed.is_set():
            raise _Stop()

    def install() -> None:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    install()
    started = not args.address
    local = {"num_cpus": args.num_cpus, "object_store_memory": args.object_store_bytes} if started else {}
    context: Any = ray.init(address=args.address, include_dashboard=False, **local)
    install()  # again: Ray's core worker installs a fatal-signal handler that would abort on SIGTERM
    _event("ray_started" if started else "ray_joined", address=context.address_info["gcs_address"])
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(application, name=APP_NAME, route_prefix="/", blocking=False)
        deployed.set()
        _event("ready", url=f"http://{settings.host}:{settings.port}", replicas=scale.num_replicas)
        while not stop.wait(1.0):
            pass
    except _Stop:
        pass
    finally:
        deployed.set()  # a second signal during teardown must not interrupt it
        _event("stopping")
        try:
            _teardown(started)
        finally:
            shutil.rmtree(uploads, ignore_errors=True)
        _event("stopped")
    return 0


def _teardown(started: bool) -> None:
    import ray
    from ray import serve

    try:
        serve.delete(APP_NAME)  # replicas drain (graceful_shutdown_timeout_s = --shutdown-grace-s)
        if started:
            serve.shutdown()
    finally:
        ray.shutdown()  # a local instance we started stops with it; a joined cluster keeps running


def _event(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)
