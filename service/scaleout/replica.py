"""The replica deployment: the single-process app (same engine, registry, routes) run in-process.

Adapters come from the catalog on first use (`@serve.multiplexed` records them for Serve's
adapter-affinity routing); a background long-poll on the catalog unloads what was removed there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio.to_thread
from fastapi.concurrency import run_in_threadpool

from ..app import create_app
from ..errors import AdapterBusyError, HttpError, NotFoundError, NotReadyError, http_error_for
from ..registry import Registry
from ..settings import Settings
from .asgi import Forwarded, Start, call_app
from .catalog import Snapshot

__all__ = ["LokrReplica"]

log = logging.getLogger("lokr_serve.scaleout")


class LokrReplica:
    """Holds the model, our registry and our engine; the ingress calls `forward` and `admit`."""

    async def __init__(self, settings: dict[str, Any], catalog: Any) -> None:  # type: ignore[misc]  # Serve awaits it
        from ray import serve

        # Auth and preloads are the ingress's job; the replica serves what it is given.
        self.settings = Settings(**{**settings, "adapter": [], "api_key": [], "cors_origin": []})
        self.catalog = catalog
        self.id = serve.get_replica_context().replica_id.to_full_id_str()
        self.app = create_app(self.settings)
        self.app.state.components.replica = self.id
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # loads the model and starts the engine, as `serve` does
        self._versions: dict[str, int] = {}  # adapters registered here -> their catalog version
        self._lock = asyncio.Lock()  # orders registrations against removals
        self._leaving: dict[str, asyncio.Event] = {}  # unloads under way: set once the name is free again
        self._seen = 0
        self._resident = serve.multiplexed(max_num_models_per_replica=self.settings.max_resident_adapters)(_held)
        self._sync = asyncio.ensure_future(self._sync_loop())

    @property
    def registry(self) -> Registry:
        """The app's registry (a causal LM's or an image pipeline's)."""
        registry: Registry | None = self.app.state.components.registry
        if registry is None:
            raise NotReadyError("the model is still loading; retry shortly")
        return registry

    # ------------------------------------------------------------------------------ requests
    async def forward(self, request: Forwarded, names: list[str]) -> AsyncIterator[Start | bytes]:
        """Stream the app's answer to `request`; `names` are the adapters it uses (the first routed it)."""
        from ray import serve

        routed = serve.get_multiplexed_model_id()
        for name in names:
            err = await self._ensure(name)
            if err is None and name == routed:
                await self._resident(name)  # Serve's LRU of what this replica holds (a hit after `_ensure`)
            if err is not None:
                yield Start(err.status, [("content-type", "application/json"), ("x-lokr-replica", self.id)])
                yield _json(err.body())
                return
        async for part in call_app(self.app, request):
            yield part

    async def admit(self, name: str, source: str, version: int) -> tuple[int, dict[str, Any]]:
        """Validate and load a newly registered adapter here: `(201, record)` or `(status, error body)`."""
        async with self._lock:
            try:
                record = await run_in_threadpool(self.registry.load, name, Path(source))
            except Exception as exc:
                err = http_error_for(exc)
                return err.status, err.body()
            self._versions[name] = version
        await self._resident(name)  # tell Serve's router that this replica holds it
        return 201, record.to_dict()

    async def _ensure(self, name: str) -> HttpError | None:
        """Register `name` here from the catalog unless it already is (tiers then bring it on device)."""
        if name in self._versions:
            return None
        if (leaving := self._leaving.get(name)) is not None:  # a replaced adapter: its old version leaves first
            await leaving.wait()
        async with self._lock:
            if name in self._versions:
                return None
            entry = await self.catalog.get.remote(name)
            if entry is None or not entry.ready:
                return http_error_for(NotFoundError(f"adapter {name!r} is not loaded", code="adapter_not_found"))
            try:
                await run_in_threadpool(self.registry.load, name, Path(entry.source))
            except Exception as exc:
                log.warning("adapter %s could not be loaded from %s: %s", name, entry.source, exc)
                return http_error_for(exc)
            self._versions[name] = entry.version
            return None

    # ------------------------------------------------------------------------------ catalog sync
    async def _sync_loop(self) -> None:
        while True:
            try:
                snap = await self.catalog.sync.remote(self.id, self._seen, self._holdings(), 2.0)
                await self._reconcile(snap)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the catalog restarting: retry
                log.warning("catalog sync failed: %s", exc)
                await asyncio.sleep(1.0)

    async def _reconcile(self, snap: Snapshot) -> None:
        """Unload adapters the catalog removed (or replaced); entries newer than `snap` are left alone. The
        unloads wait for their running requests outside the lock, so loads and other adapters go on meanwhile."""
        async with self._lock:
            gone = {}
            for name, version in list(self._versions.items()):
                entry = snap.entries.get(name)
                if not (version > snap.gen or (entry is not None and entry.version == version)):
                    gone[name] = self._versions.pop(name)
            self._seen = snap.gen
            for name in gone:
                self._leaving[name] = asyncio.Event()
        await asyncio.gather(*(self._unload(name, version) for name, version in gone.items()))

    async def _unload(self, name: str, version: int) -> None:
        """Unload `name` here; one still busy after the registry's wait is put back, for the next sync to retry."""
        limiter = self.app.state.components.unload_limiter()
        try:
            await anyio.to_thread.run_sync(self.registry.unload, name, limiter=limiter)
        except NotFoundError:
            pass
        except AdapterBusyError:
            async with self._lock:
                self._versions.setdefault(name, version)
        finally:
            self._leaving.pop(name).set()

    def _holdings(self) -> dict[str, dict[str, Any]]:
        return {
            r.name: {"tier": r.tier, "hits": r.hits, "misses": r.misses, "in_use": r.in_use}
            for r in self.registry.records()
        }

    async def check_health(self) -> None:
        """Serve's health check: the engine must still accept work."""
        engine = self.app.state.components.engine
        if engine is None or not engine.accepting:
            raise RuntimeError("the engine is not accepting work")

    async def __del__(self) -> None:
        """Graceful shutdown (Serve calls it): drain the engine, then stop it."""
        self._sync.cancel()
        with contextlib.suppress(Exception):  # the catalog may already be gone
            await self.catalog.forget.remote(self.id)
        await self._lifespan.__aexit__(None, None, None)


async def _held(name: str) -> str:
    """Serve's multiplexed "loader": its LRU (as large as our device tier) only steers routing; our
    registry owns the memory, and callers `_ensure` the adapter first, so this cannot fail."""
    return name


def _json(body: dict[str, Any]) -> bytes:
    import json

    return json.dumps(body).encode()
