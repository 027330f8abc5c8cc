"""Shared route dependencies: the app's components and the auth checks.

All `async def`: they never block, and FastAPI runs a plain `def` dependency in its thread pool, two thread
hops per request on the event loop that the engine thread shares the GIL with.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

import anyio
from fastapi import Depends, Request

from ..engine import Engine
from ..errors import NotReadyError
from ..inference import Inference
from ..metrics import Metrics
from ..registry import Registry
from ..security import check_bearer, require_admin
from ..settings import Settings

if TYPE_CHECKING:
    from ..images.front import ImageFront

__all__ = ["AdminAuth", "ApiAuth", "Components", "Deps", "process_replica_id"]

UNLOAD_THREADS = 1024  # unloads waiting at once on their adapters' leases (each a mostly idle thread)


def process_replica_id() -> str:
    """A stable name for this server process: `hostname:pid` (Ray replicas use their Serve replica id)."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Components:
    """Everything a route may use; built once per app in the lifespan."""

    settings: Settings
    metrics: Metrics
    engine: Engine | None = None
    registry: Registry | None = None
    inference: Inference | None = None
    replica: str = field(default_factory=process_replica_id)  # sent as `x-lokr-replica`
    images: ImageFront | None = None  # an image pipeline's front (then `inference` is None)
    created: int = field(default_factory=lambda: int(time.time()))  # the base model's `created` in /v1/models
    _unloads: anyio.CapacityLimiter | None = None

    def unload_limiter(self) -> anyio.CapacityLimiter:
        """The threads unloads wait on their adapters' leases in (made on first use, in the event loop)."""
        if self._unloads is None:
            self._unloads = anyio.CapacityLimiter(UNLOAD_THREADS)
        return self._unloads

    def ready_registry(self) -> Registry:
        """The registry (any model kind), or a 503 while the model is still loading."""
        if self.registry is None or (self.inference is None and self.images is None):
            raise NotReadyError("the model is still loading; retry shortly")
        return self.registry

    def running(self) -> tuple[Registry, Inference]:
        """The registry and inference front, or a 503 while the model is still loading."""
        if self.registry is None or self.inference is None:
            raise NotReadyError("the model is still loading; retry shortly")
        return self.registry, self.inference


async def get_components(request: Request) -> Components:
    components: Components = request.app.state.components
    return components


async def api_auth(request: Request) -> None:
    keys = request.app.state.components.settings.api_key
    if keys:
        check_bearer(request.headers.get("authorization"), keys, "this API")


async def admin_auth(request: Request) -> None:
    settings: Settings = request.app.state.components.settings
    require_admin(
        request.headers.get("authorization"), settings.admin_token, settings.loopback_bind, bool(settings.api_key)
    )


Deps = Annotated[Components, Depends(get_components)]
ApiAuth = Depends(api_auth)
AdminAuth = Depends(admin_auth)
