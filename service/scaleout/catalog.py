"""The application-wide adapter catalog: name -> source, versions, and which replica holds what.

One instance runs as a single-replica Serve deployment (see `app.py`); the ingress registers and
removes names here, replicas long-poll `sync` to learn removals and report what they hold. Plain asyncio,
no Ray import: it is tested on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["Catalog", "Entry", "Snapshot"]


@dataclass(frozen=True)
class Entry:
    """One registered adapter. `version` is the catalog generation that created it."""

    name: str
    source: str
    version: int
    ready: bool = False  # False while a replica validates it (reserved, not yet visible)
    owned_dir: str | None = None  # an upload dir, deleted once every replica has let go of the adapter
    info: dict[str, Any] = field(default_factory=dict)  # the validating replica's record (modules, bytes, ...)


@dataclass(frozen=True)
class Snapshot:
    """The catalog at generation `gen` (every change bumps it)."""

    gen: int
    entries: dict[str, Entry]

    def names(self) -> list[str]:
        """Names requests may use (ready entries only)."""
        return [n for n, e in self.entries.items() if e.ready]


@dataclass
class _Member:
    seen: int = 0
    last: float = field(default_factory=time.monotonic)
    holdings: dict[str, dict[str, Any]] = field(default_factory=dict)


class Catalog:
    """Registrations for the whole application plus replica liveness and acknowledgements."""

    def __init__(self, live_s: float = 6.0) -> None:
        self._gen = 0
        self._entries: dict[str, Entry] = {}
        self._members: dict[str, _Member] = {}
        self._changed = asyncio.Condition()
        self._live_s = live_s

    # ------------------------------------------------------------------------------ registrations
    async def reserve(self, name: str, source: str, owned_dir: str | None = None) -> int | None:
        """Claim `name` before a replica validates it; returns the entry's version (None: name taken).

        Methods answer with values, not exceptions: callers raise the service's own errors.
        """
        async with self._changed:
            if name in self._entries:
                return None
            version = self._bump()
            self._entries[name] = Entry(name, source, version, owned_dir=owned_dir)
            return version

    async def commit(self, name: str, version: int, info: dict[str, Any]) -> bool:
        """Make a reserved entry visible to requests (False: it was removed meanwhile)."""
        async with self._changed:
            entry = self._entries.get(name)
            if entry is None or entry.version != version:
                return False
            self._entries[name] = replace(entry, ready=True, info=info)
            self._bump()
            return True

    async def remove(self, name: str, version: int | None = None) -> tuple[int, Entry] | None:
        """Forget a ready `name`, or the reservation `version`; returns (generation, entry), None if absent."""
        async with self._changed:
            entry = self._entries.get(name)
            if entry is None or (entry.version != version if version is not None else not entry.ready):
                return None
            del self._entries[name]
            return self._bump(), entry

    def _bump(self) -> int:
        self._gen += 1
        self._changed.notify_all()
        return self._gen

    # ------------------------------------------------------------------------------ queries
    async def snapshot(self) -> Snapshot:
        return Snapshot(self._gen, dict(self._entries))

    async def get(self, name: str) -> Entry | None:
        return self._entries.get(name)

    async def holdings(self) -> dict[str, dict[str, dict[str, Any]]]:
        """`{adapter: {replica: {tier, hits, misses, in_use}}}` over live replicas."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for member, state in self._live().items():
            for name, held in state.holdings.items():
                out.setdefault(name, {})[member] = held
        return out

    async def replicas(self) -> list[str]:
        return sorted(self._live())

    def _live(self) -> dict[str, _Member]:
        now = time.monotonic()
        return {m: s for m, s in self._members.items() if now - s.last < self._live_s}

    # ------------------------------------------------------------------------------ replicas
    async def sync(
        self, member: str, seen: int, holdings: dict[str, dict[str, Any]] | None, wait_s: float = 2.0
    ) -> Snapshot:
        """A replica reports that it reconciled to generation `seen` and what it holds; long-polls for news.

        Returns at once when the catalog is past `seen`, else after `wait_s` (a heartbeat).
        `holdings=None` is a watcher (an ingress): it is not waited for by `wait_acked`.
        """
        if holdings is not None:
            state = self._members.setdefault(member, _Member())
            state.seen, state.last, state.holdings = seen, time.monotonic(), holdings
            async with self._changed:
                self._changed.notify_all()  # wake `wait_acked`
        async with self._changed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(lambda: self._gen > seen), wait_s)
        return Snapshot(self._gen, dict(self._entries))

    async def forget(self, member: str) -> None:
        """A replica shutting down: stop waiting for it."""
        self._members.pop(member, None)
        async with self._changed:
            self._changed.notify_all()

    async def wait_acked(self, gen: int, timeout_s: float) -> list[str]:
        """Wait until every live replica reconciled to `gen`; returns the ones still behind at the timeout."""

        def behind() -> list[str]:
            return sorted(m for m, s in self._live().items() if s.seen < gen)

        deadline = time.monotonic() + timeout_s
        while behind() and time.monotonic() < deadline:  # re-checked at least every 0.5 s: replicas may die
            async with self._changed:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(0.5, max(0.0, deadline - time.monotonic())))
        return behind()
