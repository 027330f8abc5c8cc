"""Adapter lifecycle: validated loads, in-use leases, draining unloads. Blocking; call from a thread."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import lokr

from .engine import Engine
from .errors import AdapterBusyError, ConflictError, NotFoundError
from .metrics import Metrics

__all__ = ["AdapterRecord", "Registry"]

log = logging.getLogger("lokr_serve.registry")


@dataclass
class AdapterRecord:
    name: str
    info: lokr.AdapterInfo
    source: str
    loaded_at: float = field(default_factory=time.time)
    in_use: int = 0
    draining: bool = False
    owned_dir: Path | None = None  # an upload dir deleted with the adapter

    def to_dict(self) -> dict[str, Any]:
        out = self.info.to_dict()
        out.update(source=self.source, loaded_at=int(self.loaded_at), in_use=self.in_use, draining=self.draining)
        return out


class Registry:
    """Which adapters exist, who is using them, and safe load / unload against the engine's model."""

    def __init__(self, engine: Engine, metrics: Metrics, *, dtype: torch.dtype | None, max_bytes: int) -> None:
        self.engine, self.metrics = engine, metrics
        self.dtype, self.max_bytes = dtype, max_bytes
        self._records: dict[str, AdapterRecord] = {}
        self._pending: set[str] = set()
        self._cond = threading.Condition()

    # ---------------------------------------------------------------------------------- queries
    def names(self) -> list[str]:
        with self._cond:
            return [n for n, r in self._records.items() if not r.draining]

    def get(self, name: str) -> AdapterRecord:
        with self._cond:
            record = self._records.get(name)
            if record is None or record.draining:
                raise NotFoundError(f"adapter {name!r} is not loaded", code="adapter_not_found")
            return record

    def records(self) -> list[AdapterRecord]:
        with self._cond:
            return [r for r in self._records.values() if not r.draining]

    # ---------------------------------------------------------------------------------- leases
    def acquire(self, names: set[str]) -> None:
        """Mark `names` in use by one job; unknown or unloading names are a 404."""
        with self._cond:
            missing = sorted(n for n in names if n not in self._records or self._records[n].draining)
            if missing:
                raise NotFoundError(
                    f"adapter(s) {missing} not loaded; loaded: {sorted(self.names())}", code="adapter_not_found"
                )
            for n in names:
                self._records[n].in_use += 1

    def release(self, names: set[str]) -> None:
        with self._cond:
            for n in names:
                if n in self._records:
                    self._records[n].in_use -= 1
            self._cond.notify_all()

    # ---------------------------------------------------------------------------------- load / unload
    def load(self, name: str, path: Path, *, owned_dir: Path | None = None) -> AdapterRecord:
        """Read and validate off the model lock, then attach under it; a failure changes nothing."""
        with self._cond:
            if name in self._records or name in self._pending:
                raise ConflictError(f"an adapter named {name!r} is already loaded or loading", code="adapter_exists")
            self._pending.add(name)
        try:
            parsed = lokr.read_adapter(path, max_bytes=self.max_bytes)
            with self.engine.model_lock:
                info = lokr.attach_adapter(self.engine.model, parsed, name, dtype=self.dtype)
        except BaseException:
            self.metrics.adapter_loads.labels("failure").inc()
            with self._cond:
                self._pending.discard(name)
            raise
        record = AdapterRecord(name, info, str(path), owned_dir=owned_dir)
        with self._cond:
            self._pending.discard(name)
            self._records[name] = record
        self.metrics.adapter_loads.labels("success").inc()
        self._update_gauges()
        log.info("loaded adapter %s from %s (%d modules, %d bytes)", name, path, len(info.modules), info.nbytes)
        return record

    def unload(self, name: str, timeout_s: float = 60.0) -> None:
        """Hide `name` from new requests, wait for its running jobs, then free it."""
        with self._cond:
            record = self._records.get(name)
            if record is None or record.draining:
                raise NotFoundError(f"adapter {name!r} is not loaded", code="adapter_not_found")
            record.draining = True
            if not self._cond.wait_for(lambda: record.in_use == 0, timeout=timeout_s):
                record.draining = False
                raise AdapterBusyError(f"adapter {name!r} is still in use after {timeout_s:.0f}s; try again")
        with self.engine.model_lock:
            lokr.delete_adapter(self.engine.model, name)
        with self._cond:
            del self._records[name]
        if record.owned_dir is not None:
            shutil.rmtree(record.owned_dir, ignore_errors=True)
        self.metrics.adapter_unloads.inc()
        self._update_gauges()
        log.info("unloaded adapter %s", name)

    def _update_gauges(self) -> None:
        records = self.records()
        self.metrics.adapters_resident.set(len(records))
        self.metrics.adapter_bytes.set(sum(r.info.nbytes for r in records))
