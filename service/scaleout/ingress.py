"""The ingress deployment's state and actions: routing by adapter, registrations, fan-out of unloads."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..errors import ConflictError, NotFoundError, NotReadyError, ServiceError
from ..inference import Selection, select_adapters
from ..logs import request_id_var
from ..metrics import Metrics
from ..routes.deps import Components
from ..schemas import AdapterRef
from ..settings import Settings
from .asgi import Forwarded, Start, clean_headers
from .catalog import Snapshot

__all__ = ["LokrIngress"]

log = logging.getLogger("lokr_serve.scaleout")

# Per-replica fields of a registry record; the listing shows them under `replicas`.
_PER_REPLICA = ("tier", "resident", "in_use", "hits", "misses", "draining", "loaded_at")


class LokrIngress:
    """Not multiplexed: validates, picks the routing id (the first adapter), forwards to a replica."""

    async def __init__(self, settings: dict[str, Any], replicas: Any, catalog: Any) -> None:  # type: ignore[misc]  # Serve awaits it
        from ray import serve

        self.settings = Settings(**settings)
        self.replicas, self.catalog = replicas, catalog
        self.components = Components(self.settings, Metrics(engine=False))
        self.components.replica = serve.get_replica_context().replica_id.to_full_id_str()
        self.snapshot = Snapshot(0, {})
        for name, source in self.settings.preload_pairs():  # operator-trusted, like `serve --adapter`
            await self.preload(name, Path(source))
        self._watch = asyncio.ensure_future(self._watch_loop())

    def __serve_build_asgi_app__(self) -> Any:
        from .routes import build_ingress_app

        return build_ingress_app(self)

    # ------------------------------------------------------------------------------ inference
    async def forward(self, request: Request, model: str, adapters: Sequence[AdapterRef] | None) -> StreamingResponse:
        """Send the request to a replica chosen by its first adapter; the answer streams back unchanged."""
        sel = self.select(model, adapters)
        request.scope["lokr_adapter"] = sel.label
        routed = adapters[0].name if adapters else ("" if model == self.settings.base_name else model)
        names = [routed, *sorted(sel.names - {routed})] if routed else []
        headers = [(k, v) for k, v in request.headers.items() if k != "x-request-id"]
        headers.append(("x-request-id", request_id_var.get() or ""))  # one id in both apps' logs
        payload = Forwarded(request.method, request.url.path, request.url.query.encode(), headers, await request.body())
        handle = self.replicas.options(multiplexed_model_id=routed, stream=True)
        parts = handle.forward.remote(payload, names)
        try:
            start = await parts.__anext__()
        except Exception as exc:
            raise _replica_gone(exc) from exc
        assert isinstance(start, Start)
        return StreamingResponse(_body(parts), status_code=start.status, headers=dict(clean_headers(start.headers)))

    def select(self, model: str, adapters: Sequence[AdapterRef] | None) -> Selection:
        return select_adapters(model, adapters, self.snapshot.names(), self.settings.base_name)

    # ------------------------------------------------------------------------------ registrations
    async def preload(self, name: str, source: Path) -> None:
        entry = await self.catalog.get.remote(name)
        if entry is not None and entry.source == str(source):
            return  # this ingress restarted: the catalog already has it
        await self.register(name, source)

    async def register(self, name: str, source: Path, owned_dir: Path | None = None) -> dict[str, Any]:
        """Reserve the name, let one replica validate and load it, then make it visible everywhere."""
        version = await self.catalog.reserve.remote(name, str(source), str(owned_dir) if owned_dir else None)
        if version is None:
            raise ConflictError(f"an adapter named {name!r} is already loaded or loading", code="adapter_exists")
        try:
            status, body = await self.replicas.options(multiplexed_model_id=name).admit.remote(
                name, str(source), version
            )
        except Exception as exc:
            await self.catalog.remove.remote(name, version)
            raise _replica_gone(exc) from exc
        if status != 201:
            await self.catalog.remove.remote(name, version)
            raise _remote_error(status, body)
        if not await self.catalog.commit.remote(name, version, body):
            raise NotFoundError(f"adapter {name!r} was unloaded while it loaded", code="adapter_not_found")
        await self.refresh()
        return self.describe(name, {})

    async def unregister(self, name: str, timeout_s: float = 65.0) -> dict[str, Any]:
        """Hide `name` at once, then wait until every live replica has let go of it."""
        removed = await self.catalog.remove.remote(name)
        if removed is None:
            raise NotFoundError(f"adapter {name!r} is not loaded", code="adapter_not_found")
        gen, entry = removed
        await self.refresh()
        pending = await self.catalog.wait_acked.remote(gen, timeout_s)
        if entry.owned_dir and not pending:
            shutil.rmtree(entry.owned_dir, ignore_errors=True)
        if pending:
            log.warning("adapter %s: replicas %s have not unloaded it yet", name, pending)
        return {"id": name, "object": "adapter", "deleted": True, "pending_replicas": pending}

    # ------------------------------------------------------------------------------ listing
    async def listing(self) -> list[dict[str, Any]]:
        held = await self.catalog.holdings.remote()
        return [self.describe(name, held.get(name, {})) for name in self.snapshot.names()]

    async def describe_one(self, name: str) -> dict[str, Any]:
        if name not in self.snapshot.names():
            raise NotFoundError(f"adapter {name!r} is not loaded", code="adapter_not_found")
        held = await self.catalog.holdings.remote()
        return self.describe(name, held.get(name, {}))

    def describe(self, name: str, held: dict[str, Any]) -> dict[str, Any]:
        entry = self.snapshot.entries[name]
        out = {k: v for k, v in entry.info.items() if k not in _PER_REPLICA}
        out.update(source=entry.source, replicas=held)
        return out

    # ------------------------------------------------------------------------------ catalog watch
    async def refresh(self) -> None:
        self.snapshot = await self.catalog.snapshot.remote()

    async def _watch_loop(self) -> None:
        while True:
            try:
                self.snapshot = await self.catalog.sync.remote(self.components.replica, self.snapshot.gen, None, 2.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("catalog watch failed: %s", exc)
                await asyncio.sleep(1.0)

    async def live_replicas(self) -> list[str]:
        replicas: list[str] = await self.catalog.replicas.remote()
        return replicas


async def _body(parts: Any) -> AsyncIterator[bytes]:
    async for chunk in parts:
        yield chunk


def _replica_gone(exc: Exception) -> Exception:
    if isinstance(exc, ServiceError):
        return exc
    log.warning("replica call failed: %r", exc)
    return NotReadyError("the replica serving this request went away; retry", code="replica_unavailable")


def _remote_error(status: int, body: dict[str, Any]) -> ServiceError:
    """A replica's error answer (`{"error": {...}}`) raised again here, unchanged."""
    detail = body.get("error", {})
    err = ServiceError(str(detail.get("message", "adapter load failed")), code=str(detail.get("code", "error")))
    err.status, err.type = status, str(detail.get("type", "invalid_request_error"))
    err.headers = None
    return err
