"""Adapter lifecycle and memory tiers: device (attached to the model) -> host (offloaded) -> disk (source).

A registered adapter is always answerable: a request for one that is not resident brings it back from
host memory, or re-reads its source off the engine's critical path. Adapters in use are never evicted.
Blocking; call from a thread.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

import lokr

from .engine import Engine
from .errors import AdapterBusyError, ConflictError, NotFoundError
from .metrics import Metrics

__all__ = ["AdapterRecord", "Registry", "TierLimits"]

log = logging.getLogger("lokr_serve.registry")


@dataclass(frozen=True)
class TierLimits:
    """Budgets; 0 bytes means no byte limit."""

    device_adapters: int = 128
    device_bytes: int = 0
    host_adapters: int = 512
    host_bytes: int = 0


@dataclass
class AdapterRecord:
    name: str
    info: lokr.AdapterInfo
    source: Path
    loaded_at: float = field(default_factory=time.time)
    in_use: int = 0
    draining: bool = False
    resident: bool = True
    host: lokr.OffloadedAdapter | None = None
    hits: int = 0
    misses: int = 0
    owned_dir: Path | None = None  # an upload dir deleted with the adapter
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def tier(self) -> str:
        return "device" if self.resident else "host" if self.host is not None else "disk"

    def to_dict(self) -> dict[str, Any]:
        out = self.info.to_dict()
        out.update(
            source=str(self.source), loaded_at=int(self.loaded_at), in_use=self.in_use, draining=self.draining,
            tier=self.tier, resident=self.resident, hits=self.hits, misses=self.misses,
        )  # fmt: skip
        return out


class Registry:
    """Which adapters exist, where their tensors live, who uses them; safe load / unload / eviction."""

    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        *,
        dtype: torch.dtype | None,
        max_bytes: int,
        limits: TierLimits | None = None,
    ) -> None:
        self.engine, self.metrics = engine, metrics
        self.dtype, self.max_bytes = dtype, max_bytes
        self.limits = limits or TierLimits()
        self._records: dict[str, AdapterRecord] = {}
        self._pending: set[str] = set()
        self._lru: OrderedDict[str, None] = OrderedDict()  # device residents, least recently used first
        self._host_lru: OrderedDict[str, None] = OrderedDict()
        self._cond = threading.Condition()
        self._pin = engine.device.type == "cuda"

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
    def try_acquire(self, names: set[str]) -> bool:
        """Take a lease without any I/O: True if every name is resident (a hit), else nothing is taken."""
        with self._cond:
            records = self._lookup(names)
            if not all(r.resident for r in records):
                return False
            for r in records:
                r.in_use += 1
                r.hits += 1
                self._lru.move_to_end(r.name)
            self.metrics.adapter_cache.labels("hit").inc(len(records))
            return True

    def acquire(self, names: set[str]) -> None:
        """Take a lease on `names` for one job, bringing non-resident ones back (may read from disk)."""
        with self._cond:
            records = self._lookup(names)
            for r in records:
                r.in_use += 1  # leased before loading: nothing can evict it in between
        try:
            for r in records:
                self._make_resident(r)
        except BaseException:
            self.release(names)
            raise
        self._evict_to_budget()

    def release(self, names: set[str]) -> None:
        with self._cond:
            for n in names:
                if n in self._records:
                    self._records[n].in_use -= 1
            self._cond.notify_all()

    def _lookup(self, names: set[str]) -> list[AdapterRecord]:
        missing = sorted(n for n in names if n not in self._records or self._records[n].draining)
        if missing:
            raise NotFoundError(
                f"adapter(s) {missing} not loaded; loaded: {sorted(self.names())}", code="adapter_not_found"
            )
        return [self._records[n] for n in sorted(names)]

    # ---------------------------------------------------------------------------------- tiers
    def _make_resident(self, record: AdapterRecord) -> None:
        with record.lock:  # one loader per adapter; later callers find it resident
            if record.resident:
                with self._cond:
                    record.hits += 1
                    self._lru.move_to_end(record.name)
                self.metrics.adapter_cache.labels("hit").inc()
                return
            host = record.host
            parsed = None if host is not None else lokr.read_adapter(record.source, max_bytes=self.max_bytes)
            if host is not None:
                self.engine.run(lambda model: lokr.restore_adapter(model, host))
            else:
                self.engine.run(lambda model: lokr.attach_adapter(model, parsed, record.name, dtype=self.dtype))  # type: ignore[arg-type]
            with self._cond:
                record.resident, record.host, record.misses = True, None, record.misses + 1
                self._host_lru.pop(record.name, None)
                self._lru[record.name] = None
            self.metrics.adapter_cache.labels("miss_host" if host is not None else "miss_disk").inc()
        self._update_gauges()

    def _evict_to_budget(self) -> None:
        """Offload least recently used idle residents until the device budget holds (in-use ones stay)."""
        while True:
            with self._cond:
                victim = self._pick_victim()
                if victim is None:
                    break
                victim.resident = False  # a request for it now waits on its lock, then restores it
                self._lru.pop(victim.name, None)
            try:
                victim.host = self.engine.run(partial(lokr.offload_adapter, name=victim.name, pin_memory=self._pin))
            finally:
                victim.lock.release()
            with self._cond:
                self._host_lru[victim.name] = None
                self._trim_host()
            self.metrics.adapter_cache.labels("evict_device").inc()
        self._update_gauges()

    def _pick_victim(self) -> AdapterRecord | None:
        residents = [self._records[n] for n in self._lru]
        count, size = len(residents), sum(r.info.device_nbytes for r in residents)
        over = count > self.limits.device_adapters or (0 < self.limits.device_bytes < size)
        if not over:
            return None
        for r in residents:  # least recently used first; the victim's lock is taken (released by the caller)
            if r.in_use == 0 and r.lock.acquire(blocking=False):
                return r
        return None

    def _trim_host(self) -> None:
        """Drop host copies (least recently used first) beyond the host budget; their source stays on disk."""
        while self._host_lru:
            copies = [self._records[n] for n in self._host_lru]
            size = sum(r.host.nbytes for r in copies if r.host is not None)
            if len(copies) <= self.limits.host_adapters and not (0 < self.limits.host_bytes < size):
                return
            name, _ = self._host_lru.popitem(last=False)
            self._records[name].host = None
            self.metrics.adapter_cache.labels("evict_host").inc()

    # ---------------------------------------------------------------------------------- load / unload
    def load(self, name: str, path: Path, *, owned_dir: Path | None = None) -> AdapterRecord:
        """Read and validate off the model lock, then attach under it; a failure changes nothing."""
        with self._cond:
            if name in self._records or name in self._pending:
                raise ConflictError(f"an adapter named {name!r} is already loaded or loading", code="adapter_exists")
            self._pending.add(name)
        try:
            parsed = lokr.read_adapter(path, max_bytes=self.max_bytes)
            info = self.engine.run(lambda model: lokr.attach_adapter(model, parsed, name, dtype=self.dtype))
        except BaseException:
            self.metrics.adapter_loads.labels("failure").inc()
            with self._cond:
                self._pending.discard(name)
            raise
        record = AdapterRecord(name, info, path, owned_dir=owned_dir)
        with self._cond:
            self._pending.discard(name)
            self._records[name] = record
            self._lru[name] = None
        self.metrics.adapter_loads.labels("success").inc()
        log.info("loaded adapter %s from %s (%d modules, %d bytes)", name, path, len(info.modules), info.nbytes)
        self._evict_to_budget()
        return record

    def unload(self, name: str, timeout_s: float = 60.0) -> None:
        """Hide `name` from new requests, wait for its running jobs, then free it from every tier."""
        with self._cond:
            record = self._records.get(name)
            if record is None or record.draining:
                raise NotFoundError(f"adapter {name!r} is not loaded", code="adapter_not_found")
            record.draining = True
            if not self._cond.wait_for(lambda: record.in_use == 0, timeout=timeout_s):
                record.draining = False
                raise AdapterBusyError(f"adapter {name!r} is still in use after {timeout_s:.0f}s; try again")
        with record.lock:
            if record.resident:
                self.engine.run(lambda model: lokr.delete_adapter(model, name))
        with self._cond:
            del self._records[name]
            self._lru.pop(name, None)
            self._host_lru.pop(name, None)
        if record.owned_dir is not None:
            shutil.rmtree(record.owned_dir, ignore_errors=True)
        self.metrics.adapter_unloads.inc()
        self._update_gauges()
        log.info("unloaded adapter %s", name)

    def _update_gauges(self) -> None:
        with self._cond:
            records = [r for r in self._records.values() if not r.draining]
        residents = [r for r in records if r.resident]
        self.metrics.adapters_registered.set(len(records))
        self.metrics.adapters_resident.set(len(residents))
        self.metrics.adapter_bytes.set(sum(r.info.device_nbytes for r in residents))
        self.metrics.adapters_host.set(sum(1 for r in records if r.host is not None))
