"""The garbage-collector policy: start-up objects frozen in the CLI's server, every collection's pause exported."""

from __future__ import annotations

import gc
import weakref

import httpx
from prometheus_client import CollectorRegistry

from service.heap import GcPauses, freeze_startup_heap

from .conftest import Server


class _Node:
    def __init__(self) -> None:
        self.peer: _Node | None = None


def _pauses(registry: CollectorRegistry, generation: int) -> float:
    value = registry.get_sample_value("lokr_gc_pause_seconds_count", {"generation": str(generation)})
    assert value is not None
    return value


def test_each_collection_is_counted_while_installed_only() -> None:
    registry = CollectorRegistry()
    pauses = GcPauses(registry)
    assert [_pauses(registry, g) for g in range(3)] == [0.0, 0.0, 0.0]  # every generation is exported from the start
    pauses.install()
    pauses.install()  # idempotent: one callback, one count per collection
    gc.disable()  # only the collections this test asks for
    try:
        gc.collect()
        assert _pauses(registry, 2) == 1.0
        assert registry.get_sample_value("lokr_gc_pause_seconds_sum", {"generation": "2"}) > 0.0  # type: ignore[operator]
        gc.collect(0)
        assert [_pauses(registry, g) for g in range(3)] == [1.0, 0.0, 1.0]
        pauses.remove()
        gc.collect()
        assert _pauses(registry, 2) == 1.0
    finally:
        gc.enable()
        pauses.remove()
    assert pauses._callback not in gc.callbacks


def test_frozen_objects_leave_the_collections_and_are_still_freed_by_reference() -> None:
    assert gc.get_freeze_count() == 0  # nothing in the test process is frozen unless a test does it
    kept, acyclic = _Node(), _Node()
    kept.peer = kept  # a cycle alive at the freeze
    garbage = _Node()
    garbage.peer = garbage
    dead = weakref.ref(garbage)
    del garbage  # a cycle already unreachable: the collection before the freeze must free it, not freeze it
    probe = weakref.ref(acyclic)
    try:
        frozen = freeze_startup_heap()
        # it may only fall since: another thread's temporaries, alive at the freeze, are freed by reference count
        assert 0 < gc.get_freeze_count() <= frozen
        assert dead() is None
        assert not any(obj is kept for obj in gc.get_objects())  # later collections no longer walk it
        del acyclic
        assert probe() is None  # reference counting still frees a frozen object
    finally:
        gc.unfreeze()  # hand the test process's objects back to the collector
    assert gc.get_freeze_count() == 0 and any(obj is kept for obj in gc.get_objects())


def test_the_server_freezes_its_start_up_heap_and_exports_pauses(server: Server, client: httpx.Client) -> None:
    assert "start-up objects frozen" in server.log.read_text()
    text = client.get("/metrics").text
    for series in ('lokr_gc_pause_seconds_count{generation="2"}', "process_resident_memory_bytes", "python_info"):
        assert series in text
