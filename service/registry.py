"""The adapter registry: names, tiers, budgets and leases. It decides; the engine thread applies.

Every change to the model is a command sent with `engine.call` (attach, restore, offload, delete) and runs
between two steps. Files are read and validated on the caller's thread (load) or on the registry's mover
threads (bringing an adapter back from disk), never on the engine thread and never under the registry's
lock. Lifecycle state lives in one `AdapterRecord` per adapter (see `lifecycle`), changed only under
`_cond`. Budget decisions are pure functions in `tiers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import shutil
import threading
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch

import lokr

from .engine import Engine
from .errors import (
    AdapterBusyError,
    AdapterUnavailableError,
    BadRequestError,
    ConflictError,
    NotFoundError,
    NotReadyError,
    ServiceError,
)
from .lifecycle import AdapterRecord, Lease, Phase, Tier
from .metrics import Metrics
from .scratch import run_in_scratch_thread
from .sources import SourceChangedError, source_digest
from .tiers import Slot, TierLimits, pick_victims

__all__ = ["AdapterRecord", "Lease", "Registry", "TierLimits"]

log = logging.getLogger("lokr_serve.registry")


class Registry:
    """Which adapters exist, where their tensors live and who leases them; load, unload, tier moves."""

    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        *,
        dtype: torch.dtype | None,
        max_bytes: int,
        limits: TierLimits | None = None,
        movers: int = 2,
    ) -> None:
        self.engine, self.metrics = engine, metrics
        self.dtype, self.max_bytes = dtype, max_bytes
        self.limits = limits or TierLimits()
        self._records: dict[str, AdapterRecord] = {}
        self._cond = threading.Condition()
        self._tick = itertools.count(1)
        self._movers = ThreadPoolExecutor(max_workers=movers, thread_name_prefix="lokr-adapter-mover")
        self._pin = engine.device.type == "cuda"

    def close(self) -> None:
        """Start no new moves (moves in flight finish); delete the uploads kept for the adapters still loaded (they
        are kept while loaded, and the server is going)."""
        self._movers.shutdown(wait=False)
        with self._cond:
            owned = [r.owned_dir for r in self._records.values() if r.owned_dir is not None]
        for path in owned:
            shutil.rmtree(path, ignore_errors=True)

    # ---------------------------------------------------------------------------------- queries
    def names(self) -> list[str]:
        with self._cond:
            return [n for n, r in self._records.items() if r.visible]

    def get(self, name: str) -> AdapterRecord:
        with self._cond:
            return self._visible(name)

    def records(self) -> list[AdapterRecord]:
        with self._cond:
            return [r for r in self._records.values() if r.visible]

    def _visible(self, name: str) -> AdapterRecord:
        record = self._records.get(name)
        if record is None or not record.visible:
            raise NotFoundError(f"adapter {name!r} is not loaded", code="adapter_not_found")
        return record

    # ---------------------------------------------------------------------------------- leases
    @asynccontextmanager
    async def lease(self, names: Iterable[str]) -> AsyncIterator[Lease]:
        """`async with registry.lease(names) as lease:` holds `names` for one job.

        Taken at once (no I/O, no thread hop); non-resident adapters are then brought back, awaiting the
        move. Given back on leaving the block (cancellation included) unless a job took `lease.hold()`,
        in which case the last of the two to let go gives it back.
        """
        lease = self._take(frozenset(names))
        try:
            await self._bring_back(lease.names)
            yield lease
        finally:
            lease.drop()

    def _take(self, names: frozenset[str]) -> Lease:
        with self._cond:
            missing = sorted(n for n in names if n not in self._records or not self._records[n].visible)
            if missing:
                loaded = sorted(n for n, r in self._records.items() if r.visible)
                raise NotFoundError(f"adapter(s) {missing} not loaded; loaded: {loaded}", code="adapter_not_found")
            records = [self._records[n] for n in sorted(names)]
            for r in records:
                r.in_use += 1  # leased first: nothing evicts or deletes it from here on
                r.last_used = next(self._tick)
                if r.resident:
                    r.hits += 1
                else:
                    r.misses += 1
            hits = sum(r.resident for r in records)
        if hits:
            self.metrics.adapter_cache.labels("hit").inc(hits)
        return Lease(names, partial(self._give_back, records))

    def _give_back(self, records: list[AdapterRecord]) -> None:
        """The lease ends; a resident it freed may now leave a device tier that leases held over its budget."""
        with self._cond:
            for r in records:
                r.in_use -= 1
            self._cond.notify_all()
            freed = any(r.in_use == 0 and r.tier is Tier.DEVICE for r in records)
            over = freed and not self._device_fits()
        if over:
            with contextlib.suppress(RuntimeError):  # shut down: nothing moves any more
                self._movers.submit(self._rebalance)  # off the caller's thread: offloads wait on the engine

    def _device_fits(self) -> bool:
        """Whether the device tier is within its budget (call holding `_cond`); O(1) while every adapter would fit
        (every lease's end asks, on the engine thread too)."""
        budget = self.limits.device
        if len(self._records) <= budget.adapters and not budget.nbytes:
            return True
        residents = [r for r in self._records.values() if r.tier is Tier.DEVICE]
        return self.limits.device.fits(len(residents), sum(r.device_nbytes for r in residents))

    async def _bring_back(self, names: frozenset[str]) -> None:
        for name in sorted(names):
            with self._cond:
                record = self._records[name]  # leased: it cannot be gone
            while (move := self._move_to_device(record)) is not None:
                await asyncio.shield(asyncio.wrap_future(move))  # the move outlives a cancelled waiter

    def _move_to_device(self, record: AdapterRecord) -> Future[None] | None:
        """None if `record` is resident; else the move in flight, or one started now, to wait for."""
        with self._cond:
            if record.moving is not None:
                return record.moving
            if record.tier is Tier.DEVICE:
                return None
            move = record.moving = Future()
            was = record.tier
            record.tier = Tier.DEVICE
        try:
            self._movers.submit(self._restore, record, move)
        except RuntimeError:  # shut down
            with self._cond:
                record.tier, record.moving = was, None
                self._cond.notify_all()
            raise NotReadyError("the server is shutting down") from None
        return move

    # ---------------------------------------------------------------------------------- tier moves
    def _restore(self, record: AdapterRecord, move: Future[None]) -> None:
        """On a mover thread: host copy or source back onto the model, then rebalance the tiers."""
        host = record.host  # fixed while `moving` is set
        try:
            if host is not None:
                info = self.engine.call(partial(_restore_on, offloaded=host)).result()
            else:
                prepared, _ = run_in_scratch_thread(self._prepare, record.name, record.source, record.digest)
                info = self.engine.call(partial(lokr.attach_prepared, prepared=prepared)).result()
        except BaseException as exc:
            log.warning("could not bring adapter %s back: %s", record.name, exc)
            self._settle(record, Tier.DISK)  # a host copy that failed to restore is not trusted again
            move.set_exception(exc if isinstance(exc, ServiceError) else _unavailable(record.name, exc))
            return
        with self._cond:
            record.info = info
        self._settle(record, Tier.DEVICE)
        self.metrics.adapter_cache.labels("miss_host" if host is not None else "miss_disk").inc()
        try:
            self._rebalance()
        finally:
            move.set_result(None)

    def _offload(self, record: AdapterRecord, move: Future[None]) -> None:
        """Detach `record` into host memory; a failure leaves it where the model says it is."""
        try:
            host = self.engine.call(partial(lokr.offload_adapter, name=record.name, pin_memory=self._pin)).result()
        except Exception as exc:
            log.warning("could not offload adapter %s: %s", record.name, exc)
            self._settle(record, Tier.DEVICE if self._attached(record.name) else Tier.DISK)
        else:
            self._settle(record, Tier.HOST, host)
            self.metrics.adapter_cache.labels("evict_device").inc()
        finally:
            move.set_result(None)

    def _attached(self, name: str) -> bool:
        try:
            return self.engine.call(lambda model: name in lokr.list_adapters(model)).result()
        except Exception:
            return True  # offload_adapter fails before detaching; assume nothing moved

    def _settle(self, record: AdapterRecord, tier: Tier, host: lokr.OffloadedAdapter | None = None) -> None:
        """A move ended: `record` is now in `tier` (with `host` as its host copy, if any)."""
        with self._cond:
            record.tier, record.host, record.moving = tier, host, None
            self._cond.notify_all()

    def _rebalance(self) -> None:
        """Offload idle residents beyond the device budget, then drop host copies beyond the host budget.

        Never raises: a failed offload is logged and the budget is retried on the next rebalance.
        """
        with self._cond:
            slots = [self._slot(r) for r in self._records.values() if r.tier is Tier.DEVICE]
            victims = [self._records[n] for n in pick_victims(slots, self.limits.device)]
            moves: list[Future[None]] = []
            for r in victims:
                r.tier, r.moving = Tier.HOST, Future()
                moves.append(r.moving)
        for r, move in zip(victims, moves):
            self._offload(r, move)
        self._trim_host()
        self._update_gauges()

    def _trim_host(self) -> None:
        with self._cond:
            slots = [self._slot(r) for r in self._records.values() if r.tier is Tier.HOST]
            dropped = pick_victims(slots, self.limits.host)
            for name in dropped:
                self._records[name].tier, self._records[name].host = Tier.DISK, None  # the source stays on disk
        if dropped:
            self.metrics.adapter_cache.labels("evict_host").inc(len(dropped))

    def _slot(self, r: AdapterRecord) -> Slot:
        nbytes = r.device_nbytes if r.tier is Tier.DEVICE else r.host.nbytes if r.host is not None else 0
        movable = r.phase is Phase.LIVE and r.in_use == 0 and r.moving is None
        return Slot(r.name, nbytes, r.last_used, movable)

    # ---------------------------------------------------------------------------------- load / unload
    def _prepare(self, name: str, path: Path, digest: str | None = None) -> tuple[lokr.PreparedAttach, str]:
        """Off the engine thread: read the file, check every module against the model and build them; the engine
        then only attaches (`lokr.attach_prepared`), between two steps. Returns the files' digest too; a re-read
        whose files no longer match the `digest` they had at load fails (`SourceChangedError`)."""
        parsed = lokr.read_adapter(path, max_bytes=self.max_bytes)
        prepared = lokr.prepare_attach(self.engine.model, parsed, name, dtype=self.dtype)
        now = source_digest(path, parsed.files)
        if digest is not None and now != digest:
            raise SourceChangedError(
                f"the files of adapter {name!r} ({path}) changed since it was loaded; the server will not serve other "
                f"weights under the same name: DELETE /v1/adapters/{name} and load it again to serve the new files"
            )
        return prepared, now

    def load(self, name: str, path: Path, *, owned_dir: Path | None = None) -> AdapterRecord:
        """Read and validate on this thread, attach on the engine's; a failure leaves the registry as it was.

        Blocking; call from a thread (or before the engine starts).
        """
        record = AdapterRecord(name, path, owned_dir=owned_dir)
        with self._cond:
            if name in self._records:
                raise ConflictError(f"an adapter named {name!r} is already loaded or loading", code="adapter_exists")
            self._records[name] = record  # LOADING: reserves the name, invisible
        try:
            prepared, digest = run_in_scratch_thread(self._prepare, name, path)
            self._check_fits_device(prepared)
            info = self.engine.call(partial(lokr.attach_prepared, prepared=prepared)).result()
        except BaseException:
            with self._cond:
                del self._records[name]
            self.metrics.adapter_loads.labels("failure").inc()
            raise
        with self._cond:
            record.info, record.phase, record.last_used, record.digest = info, Phase.LIVE, next(self._tick), digest
        self.metrics.adapter_loads.labels("success").inc()
        log.info("loaded adapter %s from %s (%d modules, %d bytes)", name, path, len(info.modules), info.nbytes)
        self._rebalance()
        return record

    def _check_fits_device(self, prepared: lokr.PreparedAttach) -> None:
        """An adapter larger than the whole device budget could only serve over budget, moved back and forth on
        every request: refused, saying which limit to raise."""
        limit = self.limits.device.nbytes
        if 0 < limit < prepared.device_nbytes:
            raise BadRequestError(
                f"adapter {prepared.name!r} takes {prepared.device_nbytes} bytes on the device, more than the whole "
                f"device tier's budget of {limit} bytes (--max-resident-bytes); raise it or load a smaller adapter",
                code="adapter_too_large",
            )

    def unload(self, name: str, timeout_s: float = 60.0) -> None:
        """Hide `name` from new requests, wait for its leases and any move in flight, then free it.

        Blocking; call from a thread.
        """
        with self._cond:
            record = self._visible(name)
            record.phase = Phase.DRAINING
            if not self._cond.wait_for(lambda: record.in_use == 0 and record.moving is None, timeout=timeout_s):
                record.phase = Phase.LIVE
                raise AdapterBusyError(f"adapter {name!r} is still in use after {timeout_s:.0f}s; try again")
            record.moving = Future()  # deleting: no one else moves it
            attached = record.tier is Tier.DEVICE
        try:
            if attached:
                self.engine.call(partial(lokr.delete_adapter, name=name)).result()
        except BaseException:
            with self._cond:
                record.phase, record.moving = Phase.LIVE, None
                self._cond.notify_all()
            raise
        with self._cond:
            record.phase, record.host, record.moving = Phase.GONE, None, None
            del self._records[name]
            self._cond.notify_all()
        if record.owned_dir is not None:
            shutil.rmtree(record.owned_dir, ignore_errors=True)
        self.metrics.adapter_unloads.inc()
        self.metrics.forget_adapter(name)
        self._update_gauges()
        log.info("unloaded adapter %s", name)

    def _update_gauges(self) -> None:
        with self._cond:
            records = [r for r in self._records.values() if r.visible]
            residents = [r for r in records if r.resident]
            host = sum(1 for r in records if r.tier is Tier.HOST)
        self.metrics.adapters_registered.set(len(records))
        self.metrics.adapters_resident.set(len(residents))
        self.metrics.adapter_bytes.set(sum(r.device_nbytes for r in residents))
        self.metrics.adapters_host.set(host)


def _unavailable(name: str, cause: BaseException) -> AdapterUnavailableError:
    """What a request for `name` hears when it cannot be brought back: not the file's path or its defect (the
    server log has both), and not a 4xx: the request was fine."""
    error = AdapterUnavailableError(
        f"adapter {name!r} is registered but could not be brought back into memory (see the server log); "
        "retry later, or ask an operator to reload or unload it"
    )
    error.__cause__ = cause
    return error


# -------------------------------------------------------------------------------------- engine commands
def _restore_on(model: Any, *, offloaded: lokr.OffloadedAdapter) -> lokr.AdapterInfo:
    """Engine thread: put a host copy back; a restore that fails half-way is taken off again."""
    try:
        return lokr.restore_adapter(model, offloaded)
    except lokr.AdapterExistsError:
        raise
    except BaseException:
        if offloaded.name in lokr.list_adapters(model):
            lokr.delete_adapter(model, offloaded.name)
        raise
