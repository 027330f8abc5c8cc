"""The registry under the interleavings of issue 12, each driven deterministically by a gate injected into
an engine command or a file read (no sleeps): unload racing an eviction, a failed eviction while a lease
brings an adapter back, a client cancelled while its adapter is read, drain racing a job the engine took.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

import lokr
from service.app import create_app
from service.errors import BadRequestError, NotFoundError
from service.jobs import Event, FinishEvent, Job, SamplingParams
from service.lifecycle import Lease
from service.routes.deps import Components
from service.settings import Settings

from .conftest import World

BODY = {"prompt": "the sea is", "max_tokens": 3, "temperature": 0}
PATIENCE_S = 120.0  # only bounds a hang; nothing asserts on time


class Gate:
    """Wraps a function so that a matching call signals `entered`, then waits for `go`."""

    def __init__(self, real: Callable[..., Any], match: Callable[..., bool] = lambda *a, **k: True) -> None:
        self.real, self.match = real, match
        self.entered, self.go = threading.Event(), threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.match(*args, **kwargs):
            self.entered.set()
            assert self.go.wait(PATIENCE_S), "the test never opened the gate"
        return self.real(*args, **kwargs)

    def wait_entered(self) -> None:
        assert self.entered.wait(PATIENCE_S), "the gated call never came"


def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
    """Run `fn` on a new thread; the future holds its result or its error."""
    future: Future[Any] = Future()

    def target() -> None:
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=target, daemon=True).start()
    return future


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.005)


@dataclass
class Serving:
    client: TestClient
    c: Components

    @property
    def registry(self) -> Any:
        return self.c.registry

    def tiers(self) -> dict[str, str]:
        return {r.name: r.to_dict()["tier"] for r in self.registry.records()}

    def complete(self, model: str) -> Any:
        return self.client.post("/v1/completions", json={"model": model, **BODY})


@contextmanager
def serving(world: World, **settings: Any) -> Iterator[Serving]:
    app = create_app(Settings(model=str(world.model_dir), served_model_name="tiny", **settings))
    with TestClient(app) as client:
        yield Serving(client, app.state.components)


# ------------------------------------------------------------------------------------ the four interleavings
def test_unload_racing_an_eviction(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """alpha is being offloaded (evicted by beta's load) when DELETE arrives: the unload waits for the move
    and frees alpha, the eviction does not trip over the vanished record, and later evictions still work."""
    with serving(world, max_resident_adapters=1, max_host_adapters=1) as s:
        s.registry.load("alpha", world.adapters["alpha"])
        gate = Gate(lokr.offload_adapter, lambda *a, **k: k.get("name") == "alpha")
        monkeypatch.setattr(lokr, "offload_adapter", gate)
        loading = in_thread(s.registry.load, "beta", world.adapters["beta"])
        gate.wait_entered()  # alpha's offload runs on the engine thread and waits
        unloading = in_thread(s.registry.unload, "alpha")
        try:
            wait_until(lambda: "alpha" not in s.registry.names())  # hidden at once, while the move runs
            assert not unloading.done()
        finally:
            gate.go.set()
        loading.result(PATIENCE_S)
        unloading.result(PATIENCE_S)
        assert s.tiers() == {"beta": "device"}
        assert s.complete("alpha").status_code == 404
        s.registry.load("gamma", world.adapters["gamma"])  # evicts beta: later evictions keep working
        assert s.tiers() == {"beta": "host", "gamma": "device"}
        assert s.complete("beta").status_code == 200
        assert s.tiers() == {"beta": "device", "gamma": "host"}
        s.registry.load("alpha", world.adapters["alpha"])  # the name is free again
        assert s.tiers()["alpha"] == "device"


def test_failed_eviction_while_bringing_back_returns_the_lease(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request for host-tier alpha restores it, and evicting beta then fails: the request is still
    answered, the lease comes back, DELETE succeeds at once, and beta (still attached) still answers."""
    with serving(world, max_resident_adapters=1, max_host_adapters=1) as s:
        s.registry.load("alpha", world.adapters["alpha"])
        s.registry.load("beta", world.adapters["beta"])
        assert s.tiers() == {"alpha": "host", "beta": "device"}

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("injected offload failure")

        monkeypatch.setattr(lokr, "offload_adapter", broken)
        response = s.complete("alpha")
        assert response.status_code == 200, response.text
        assert s.registry.get("alpha").in_use == 0
        s.registry.unload("alpha", timeout_s=0)
        assert s.complete("beta").status_code == 200
        assert s.tiers() == {"beta": "device"}


def test_client_cancelled_while_its_adapter_is_read(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The request for disk-tier alpha is cancelled while alpha's file is read: the lease is released at
    once, the read still completes (alpha becomes resident for the next request), and DELETE succeeds."""
    with serving(world, max_resident_adapters=1, max_host_adapters=0) as s:
        s.registry.load("alpha", world.adapters["alpha"])
        s.registry.load("beta", world.adapters["beta"])
        assert s.tiers() == {"alpha": "disk", "beta": "device"}
        gate = Gate(lokr.read_adapter)
        monkeypatch.setattr(lokr, "read_adapter", gate)
        inference = s.c.inference
        assert inference is not None
        params = SamplingParams(max_tokens=2, temperature=0)
        ids = inference.tokenize("the sea is")

        async def cancel_while_reading() -> None:
            task = asyncio.ensure_future(inference.run([ids], 1, params, inference.select("alpha", None)))
            await asyncio.to_thread(gate.wait_entered)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        try:
            asyncio.run(cancel_while_reading())
            assert s.registry.get("alpha").in_use == 0
        finally:
            gate.go.set()
        wait_until(lambda: s.registry.get("alpha").resident)
        assert s.registry.get("alpha").in_use == 0
        assert s.complete("alpha").status_code == 200
        assert s.registry.get("alpha").in_use == 0
        s.registry.unload("alpha", timeout_s=0)


class _TakenEvent(threading.Event):
    """A job's `cancelled` flag whose first read (the engine taking the job) waits at `gate`."""

    def __init__(self, gate: Gate) -> None:
        super().__init__()
        self.gate, self.first = gate, True

    def is_set(self) -> bool:
        if self.first:
            self.first = False
            self.gate()
        return super().is_set()


def test_drain_waits_for_a_job_the_engine_has_taken(world: World) -> None:
    """Between taking a job off the queue and running it, the queue is empty: drain must still wait."""
    with serving(world) as s:
        engine, inference = s.c.engine, s.c.inference
        assert engine is not None and inference is not None
        gate = Gate(lambda: None)
        events: list[Event] = []
        job = Job(inference.tokenize("the sea is"), SamplingParams(max_tokens=2, temperature=0), None, events.append)
        job.cancelled = _TakenEvent(gate)
        engine.submit(job)
        gate.wait_entered()  # the engine holds the job; the queue is empty
        try:
            assert engine.drain(0) is False
        finally:
            gate.go.set()
        assert engine.drain(PATIENCE_S) is True
        assert isinstance(events[-1], FinishEvent) and events[-1].reason in ("stop", "length")  # it ran


# ------------------------------------------------------------------------------------ leases
def test_a_job_holds_the_lease_past_its_scope(world: World) -> None:
    """The scope ends (client gone) before the engine finishes the row: released once, by the last holder."""
    with serving(world) as s:
        s.registry.load("alpha", world.adapters["alpha"])

        async def scope() -> Callable[[], None]:
            async with s.registry.lease(["alpha"]) as lease:
                assert s.registry.get("alpha").in_use == 1
                return lease.hold()

        job_done = asyncio.run(scope())
        assert s.registry.get("alpha").in_use == 1  # the job still runs
        job_done()
        job_done()  # idempotent: given back exactly once
        assert s.registry.get("alpha").in_use == 0


def test_lease_on_an_unknown_name_takes_nothing(world: World) -> None:
    with serving(world) as s:
        s.registry.load("alpha", world.adapters["alpha"])

        async def take() -> None:
            async with s.registry.lease(["alpha", "nope"]):
                raise AssertionError("unreachable")

        with pytest.raises(NotFoundError, match="nope"):
            asyncio.run(take())
        assert s.registry.get("alpha").in_use == 0
        s.registry.unload("alpha", timeout_s=0)


@pytest.mark.parametrize("job_first", [False, True])
def test_lease_gives_back_exactly_once_whatever_the_order(job_first: bool) -> None:
    given: list[str] = []
    lease = Lease(frozenset({"a"}), lambda: given.append("back"))
    job_done = lease.hold()
    first, second = (job_done, lease.drop) if job_first else (lease.drop, job_done)
    first()
    first()
    assert given == [] and lease.held
    second()
    second()
    assert given == ["back"] and not lease.held
    with pytest.raises(RuntimeError):
        lease.hold()


def test_files_are_read_and_checked_off_the_engine_thread(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A load (and a bring-back from disk) reads, maps, validates and builds off the engine thread; the engine only
    attaches what was built, between two steps, so running rows wait for as little as possible."""
    import lokr.model

    threads: dict[str, list[str]] = {"validate": [], "attach": []}
    real_validate, real_attach = lokr.model.validate_all, lokr.attach_prepared

    def validate(*args: Any, **kwargs: Any) -> Any:
        threads["validate"].append(threading.current_thread().name)
        return real_validate(*args, **kwargs)

    def attach(*args: Any, **kwargs: Any) -> Any:
        threads["attach"].append(threading.current_thread().name)
        return real_attach(*args, **kwargs)

    monkeypatch.setattr(lokr.model, "validate_all", validate)
    monkeypatch.setattr(lokr, "attach_prepared", attach)
    with serving(world, max_resident_adapters=1, max_host_adapters=0) as s:
        s.registry.load("alpha", world.adapters["alpha"])
        s.registry.load("beta", world.adapters["beta"])  # alpha leaves for disk
        assert s.complete("alpha").status_code == 200  # and comes back from its file
        assert s.tiers() == {"alpha": "device", "beta": "disk"}
    assert len(threads["attach"]) == 3 and set(threads["attach"]) == {"lokr-engine"}
    assert threads["validate"] and "lokr-engine" not in threads["validate"]


def test_uploads_kept_for_loaded_adapters_are_deleted_at_shutdown(world: World, tmp_path: Any) -> None:
    import shutil

    upload = tmp_path / "uploads" / "alpha-1"
    shutil.copytree(world.adapters["alpha"], upload)
    with serving(world) as s:
        s.registry.load("alpha", upload, owned_dir=upload)
        assert s.complete("alpha").status_code == 200
        assert upload.is_dir()  # kept while loaded
    assert not upload.exists()


def test_a_preloaded_adapter_is_listed_by_its_absolute_path(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    path = world.adapters["alpha"]
    monkeypatch.chdir(path.parent)
    with serving(world, adapter=[f"alpha={path.name}"]) as s:
        assert s.registry.get("alpha").source == path.resolve()


def test_the_device_tier_returns_to_its_budget_when_leases_end(world: World) -> None:
    """Leased adapters may hold the device tier over `--max-resident-adapters` (a burst naming more adapters than
    it holds); once the leases end, the least recently used idle ones are offloaded back to the budget."""
    with serving(world, max_resident_adapters=1, max_host_adapters=2) as s:
        s.registry.load("alpha", world.adapters["alpha"])
        s.registry.load("beta", world.adapters["beta"])
        assert s.tiers() == {"alpha": "host", "beta": "device"}

        async def both() -> None:
            async with s.registry.lease(["beta"]), s.registry.lease(["alpha"]):
                assert s.tiers() == {"alpha": "device", "beta": "device"}  # both leased: over budget for now

        asyncio.run(both())
        # back to one resident: which one depends on whether the offload alpha's release starts runs before beta's
        # release (alpha is then the only idle resident) or after (beta, used least recently)
        wait_until(lambda: sorted(s.tiers().values()) == ["device", "host"])
        assert s.complete("beta").status_code == 200


def test_an_adapter_larger_than_the_device_budget_is_refused_saying_which_limit(world: World) -> None:
    """It could only serve over budget, moved on and off the device on every request: refused, others kept."""
    with serving(world) as s:
        sizes = {name: s.registry.load(name, world.adapters[name]).device_nbytes for name in ("alpha", "beta")}
    big, small = sorted(sizes, key=sizes.__getitem__, reverse=True)
    assert sizes[small] < sizes[big]
    with serving(world, max_resident_bytes=sizes[big] - 1) as s:
        s.registry.load(small, world.adapters[small])
        with pytest.raises(BadRequestError, match=r"more than the whole device tier's budget of \d+ bytes"):
            s.registry.load(big, world.adapters[big])
        assert [r.name for r in s.registry.records()] == [small] and s.complete(small).status_code == 200
    with serving(world, max_resident_bytes=sizes[big]) as s:
        s.registry.load(big, world.adapters[big])  # exactly the budget fits


def test_an_unloaded_adapter_leaves_no_metrics_series(world: World) -> None:
    """A fleet churning thousands of adapters must not export every name it ever served: unloading drops the
    adapter's request, token and first-token series; the other adapters' series stay as they were."""
    with serving(world) as s:
        s.registry.load("alpha", world.adapters["alpha"])
        s.registry.load("beta", world.adapters["beta"])
        assert s.complete("alpha").status_code == 200 and s.complete("beta").status_code == 200
        before = _series(s, "beta")
        assert before and _series(s, "alpha")
        assert s.client.delete("/v1/adapters/alpha").status_code == 200
        assert _series(s, "alpha") == {} and _series(s, "beta") == before


def _series(s: Serving, adapter: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample labelled `adapter=...` in the app's registry."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in s.c.metrics.registry.collect()
        for sample in family.samples
        if sample.labels.get("adapter") == adapter
    }


def test_an_adapter_whose_file_is_gone_is_unavailable_not_a_bad_request(world: World, tmp_path: Any) -> None:
    """An adapter on the disk tier whose source went away: the request was fine, so a 503 (no path in it), and
    the adapter stays registered: once the file is back, the next request brings it back."""
    import shutil

    source = tmp_path / "alpha"
    shutil.copytree(world.adapters["alpha"], source)
    with serving(world, max_resident_adapters=1, max_host_adapters=0) as s:
        s.registry.load("alpha", source)
        s.registry.load("beta", world.adapters["beta"])
        assert s.tiers() == {"alpha": "disk", "beta": "device"}
        shutil.move(source, tmp_path / "moved")
        response = s.complete("alpha")
        assert response.status_code == 503 and response.headers["retry-after"] == "5"
        error = response.json()["error"]
        assert error["code"] == "adapter_unavailable" and str(tmp_path) not in error["message"]
        assert s.tiers()["alpha"] == "disk"
        shutil.move(tmp_path / "moved", source)
        assert s.complete("alpha").status_code == 200


def test_an_adapter_whose_file_was_replaced_is_not_served_under_its_name(
    world: World, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A file copied over an evicted adapter's source is another adapter: bringing the old name back from disk must
    not serve it (the same name would give other answers depending on evictions). A 503 with no path, a log line
    saying what to do; the original files put back serve again, and a reload serves the new ones."""
    import shutil

    source = tmp_path / "alpha"
    shutil.copytree(world.adapters["alpha"], source)
    with serving(world, max_resident_adapters=1, max_host_adapters=0) as s:
        s.registry.load("alpha", source)
        want = s.complete("alpha").json()["choices"][0]["text"]
        s.registry.load("beta", world.adapters["beta"])
        assert s.tiers() == {"alpha": "disk", "beta": "device"}
        shutil.copytree(source, tmp_path / "original")
        shutil.copy(world.adapters["beta"] / "adapter_model.safetensors", source / "adapter_model.safetensors")
        response = s.complete("alpha")
        assert response.status_code == 503 and str(tmp_path) not in response.json()["error"]["message"]
        assert "changed since it was loaded" in caplog.text and "DELETE /v1/adapters/alpha" in caplog.text
        assert not [r for r in caplog.records if r.levelname == "ERROR"]  # a state the server answers for, no defect
        assert s.tiers()["alpha"] == "disk"
        shutil.copy(tmp_path / "original" / "adapter_model.safetensors", source / "adapter_model.safetensors")
        assert s.complete("alpha").json()["choices"][0]["text"] == want
        shutil.rmtree(source)
        shutil.copytree(world.adapters["beta"], source)
        assert s.client.delete("/v1/adapters/alpha").status_code == 200
        s.registry.load("alpha", source)
        assert s.complete("alpha").json()["choices"][0]["text"] == s.complete("beta").json()["choices"][0]["text"]


def test_unloads_waiting_on_busy_adapters_leave_the_shared_threads_free(world: World) -> None:
    """A DELETE waits (up to 60 s) for its adapter's leases on a thread: dozens of them must not hold every thread
    that loads, uploads and drains share (here that pool has one thread, and one DELETE waits)."""
    import anyio.to_thread

    with serving(world, adapter_root=[world.adapter_root]) as s:
        s.registry.load("alpha", world.adapters["alpha"])
        portal = s.client.portal
        assert portal is not None
        portal.call(anyio.to_thread.current_default_thread_limiter).total_tokens = 1

        async def hold() -> Callable[[], None]:
            async with s.registry.lease(["alpha"]) as lease:
                return lease.hold()

        release = portal.call(hold)
        deleting = in_thread(s.client.delete, "/v1/adapters/alpha")
        wait_until(lambda: "alpha" not in s.registry.names())  # draining: hidden, waiting for the lease
        loading = in_thread(s.client.post, "/v1/adapters", json={"name": "beta", "source": "beta"})
        assert loading.result(PATIENCE_S).status_code == 201  # not queued behind the waiting unload
        release()
        assert deleting.result(PATIENCE_S).status_code == 200


def test_the_digest_is_of_the_bytes_the_parse_read(tmp_path: Path) -> None:
    """The weights are read once: their digest comes from the parse (the file need not be read again, and a file
    replaced between the two reads cannot give the parsed weights another file's digest)."""
    from safetensors.torch import save_file

    from lokr.formats import read_adapter
    from service.sources import source_digest

    path = tmp_path / "style.safetensors"
    save_file({"lora_unet_x.lokr_w1": torch.ones(2, 2), "lora_unet_x.lokr_w2": torch.ones(3, 3)}, path)
    parsed = read_adapter(path)
    before = source_digest(path)
    assert source_digest(path, parsed.files) == before
    save_file({"lora_unet_x.lokr_w1": torch.zeros(2, 2), "lora_unet_x.lokr_w2": torch.ones(3, 3)}, path)
    assert source_digest(path, parsed.files) == before != source_digest(path)
