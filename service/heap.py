"""Python's cyclic garbage collector in a long-running model server: keep its full passes short, and measure them.

A full collection (generation 2) walks every tracked container object in the process and holds the GIL while it
does, so every thread stops for it: the engine between its kernels, the event loop between its writes. The
objects that torch, transformers and the loaded model create at start-up live as long as the process, yet each
full pass walks them again. On the serving benchmark's Llama that is about 390,000 objects and 250 ms per full
pass on a 2-core CPU, before any adapter is loaded. CPython starts a full pass once the objects that survived
younger passes since the last one exceed a quarter of the long-lived ones, so they come while adapters are
being loaded (each attached adapter adds about 21 objects per adapted layer), on whichever thread allocates.

`freeze_startup_heap` collects once and then moves everything alive into the permanent generation
(`gc.freeze`), which later passes skip; the CLI's server calls it when start-up is done. It is not done for apps
built in process (`create_app`): the collector is the whole process's, not the app's. `GcPauses` exports each
pass as `lokr_gc_pause_seconds{generation}`.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

__all__ = ["GcPauses", "freeze_startup_heap"]

log = logging.getLogger("lokr_serve")

_PAUSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


def freeze_startup_heap() -> int:
    """Collect, then exempt every object alive now from later collections; returns how many were frozen.

    Only for objects that live until the process exits (the model, the libraries): a frozen object is still freed
    when its last reference goes, but a reference cycle among frozen objects is never collected.
    """
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("garbage collector: %d start-up objects frozen (%.0f ms)", frozen, 1e3 * (time.perf_counter() - started))
    return frozen


class GcPauses:
    """`lokr_gc_pause_seconds{generation}`: the wall time of each collection, from `gc.callbacks`.

    `install` / `remove` add and take back the callback (one per app; the callback list is process-wide).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.histogram = Histogram(
            "lokr_gc_pause_seconds",
            "Python garbage collections by generation and their pauses (every thread waits for them)",
            ["generation"],
            buckets=_PAUSE_BUCKETS,
            registry=registry,
        )
        self._children = [self.histogram.labels(generation=str(g)) for g in range(3)]
        self._started = threading.local()  # a collection runs in the thread that triggered it

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def remove(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started.at = time.perf_counter()
            return
        started = getattr(self._started, "at", None)
        generation = info.get("generation")
        if started is not None and generation in (0, 1, 2):
            self._children[generation].observe(time.perf_counter() - started)
            self._started.at = None
