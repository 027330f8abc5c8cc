"""One adapter's lifecycle state, in one record, and the scoped lease a job holds on adapters.

    loading ──> live ──> draining ──> gone        (phase: who may name the adapter)
                 device <──> host <──> disk       (tier: where its tensors are; `moving` while in flight)

A record only changes under the registry's lock. A move (attach, restore, offload) runs outside the lock;
while it is in flight `moving` holds its future and nothing else moves, evicts or deletes the adapter.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lokr

__all__ = ["AdapterRecord", "Lease", "Phase", "Tier"]


class Phase(enum.Enum):
    LOADING = "loading"  # reserved name, first read and attach in progress; invisible
    LIVE = "live"
    DRAINING = "draining"  # unload asked: invisible to new requests, waits for leases and moves
    GONE = "gone"


class Tier(enum.Enum):
    DEVICE = "device"  # attached to the model
    HOST = "host"  # offloaded factors kept in host memory (pinned on CUDA)
    DISK = "disk"  # only the source; a request re-reads and re-validates it


@dataclass(eq=False)
class AdapterRecord:
    """Everything the registry knows about one adapter; fields change only under the registry's lock."""

    name: str
    source: Path
    owned_dir: Path | None = None  # an upload dir deleted with the adapter
    digest: str | None = None  # of the source's files as loaded (`sources.source_digest`): re-reads must match it
    info: lokr.AdapterInfo | None = None  # set once the first attach succeeded
    phase: Phase = Phase.LOADING
    tier: Tier = Tier.DEVICE
    host: lokr.OffloadedAdapter | None = None  # set exactly when tier is HOST
    moving: Future[None] | None = None  # the tier change in flight, if any
    in_use: int = 0  # leases held
    last_used: int = 0  # a registry-wide tick: larger = more recently leased
    hits: int = 0
    misses: int = 0
    loaded_at: float = field(default_factory=time.time)

    @property
    def visible(self) -> bool:
        return self.phase is Phase.LIVE

    @property
    def resident(self) -> bool:
        """Attached and staying attached: a lease on it needs no move."""
        return self.tier is Tier.DEVICE and self.moving is None

    @property
    def device_nbytes(self) -> int:
        return self.info.device_nbytes if self.info is not None else 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = self.info.to_dict() if self.info is not None else {"name": self.name}
        out.update(
            source=str(self.source), loaded_at=int(self.loaded_at), in_use=self.in_use,
            draining=self.phase is Phase.DRAINING, tier=self.tier.value, resident=self.tier is Tier.DEVICE,
            hits=self.hits, misses=self.misses,
        )  # fmt: skip
        return out


class Lease:
    """A hold on some adapters for one job. The scope that took it is one holder; `hold()` adds another
    (the job, dropped when the engine has finished with its rows). The adapters are given back exactly
    once, when the last holder lets go, whichever that is."""

    def __init__(self, names: frozenset[str], give_back: Callable[[], None]) -> None:
        self.names = names
        self._give_back = give_back
        self._holders = 1
        self._lock = threading.Lock()
        self.drop = self._once()  # the taking scope's own hold

    @property
    def held(self) -> bool:
        with self._lock:
            return self._holders > 0

    def hold(self) -> Callable[[], None]:
        """Another holder; call the returned function (idempotent) once it is done with the adapters."""
        with self._lock:
            if self._holders == 0:
                raise RuntimeError("the lease was already given back")
            self._holders += 1
        return self._once()

    def _once(self) -> Callable[[], None]:
        dropped = False

        def drop() -> None:
            nonlocal dropped
            with self._lock:
                if dropped:
                    return
                dropped = True
                self._holders -= 1
                last = self._holders == 0
            if last:
                self._give_back()

        return drop
