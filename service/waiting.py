"""The jobs waiting for the engine: a bounded FIFO that request threads put into and the engine thread takes from.

Unlike `queue.Queue` it lets the engine finish the jobs whose client went away while they still wait, wherever they
stand, so their adapter leases are given back at once rather than when the jobs ahead of them are admitted.
"""

from __future__ import annotations

import collections
import threading
from typing import Generic, Protocol, TypeVar

__all__ = ["WaitQueue", "Waiting"]


class Waiting(Protocol):
    """What the queue reads of a job."""

    @property
    def cancelled(self) -> threading.Event: ...


J = TypeVar("J", bound=Waiting)


class WaitQueue(Generic[J]):
    """At most `maxsize` jobs, first in first out; thread-safe."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._jobs: collections.deque[J] = collections.deque()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._jobs)

    def put(self, job: J) -> bool:
        """Append `job`; False (nothing queued) when `maxsize` jobs already wait."""
        with self._lock:
            if len(self._jobs) >= self.maxsize:
                return False
            self._jobs.append(job)
            return True

    def take(self) -> J | None:
        """The oldest job, or None when none waits."""
        with self._lock:
            return self._jobs.popleft() if self._jobs else None

    def take_all(self) -> list[J]:
        """Every waiting job, oldest first; the queue is left empty."""
        with self._lock:
            jobs = list(self._jobs)
            self._jobs.clear()
            return jobs

    def take_cancelled(self) -> list[J]:
        """The jobs whose client went away, out of the queue; the others keep their order."""
        with self._lock:
            if not any(job.cancelled.is_set() for job in self._jobs):
                return []
            gone: list[J] = []
            kept: collections.deque[J] = collections.deque()
            for job in self._jobs:  # one pass: a flag set meanwhile puts its job on exactly one side
                (gone if job.cancelled.is_set() else kept).append(job)
            self._jobs = kept
            return gone
