"""Scale-out pieces without a Ray cluster: the catalog, in-process forwarding through the real app, the
Serve options, and the `x-lokr-replica` header of the single-process server."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from service.app import create_app
from service.backend import load_causal_lm
from service.scaleout.app import Scale, replica_options
from service.scaleout.asgi import Forwarded, Start, call_app
from service.scaleout.catalog import Catalog
from service.scaleout.routes import _form_adapters, _tag_adapters
from service.settings import Settings

from .conftest import Server, World


def test_catalog_versions_and_removal() -> None:
    async def scenario() -> None:
        c = Catalog()
        v1 = await c.reserve("a", "/x/a")
        assert v1 is not None and await c.reserve("a", "/x/other") is None  # taken while pending
        assert (await c.snapshot()).names() == []  # pending entries are not visible
        assert await c.commit("a", v1, {"nbytes": 1})
        assert (await c.snapshot()).names() == ["a"]
        assert await c.remove("a", version=v1 + 100) is None  # only the matching reservation
        removed = await c.remove("a")
        assert removed is not None and removed[1].source == "/x/a"
        assert await c.remove("a") is None
        v2 = await c.reserve("a", "/x/a2")
        assert v2 is not None and v2 > v1
        assert not await c.commit("a", v1, {})  # a stale commit is refused

    asyncio.run(scenario())


def test_catalog_sync_long_polls_and_acks() -> None:
    async def scenario() -> None:
        c = Catalog(live_s=0.6)
        snap = await c.sync("r1", 0, {}, wait_s=0.05)  # nothing new: returns after the wait
        assert snap.gen == 0
        waiter = asyncio.ensure_future(c.sync("r1", 0, {}, wait_s=5))
        await asyncio.sleep(0.05)
        version = await c.reserve("a", "/x")
        assert (await asyncio.wait_for(waiter, 1)).entries["a"].version == version  # woken by the change
        gen = (await c.snapshot()).gen
        assert await c.wait_acked(gen, 0.1) == ["r1"]  # r1 has not reconciled to `gen`
        ack = asyncio.ensure_future(c.wait_acked(gen, 5))
        await c.sync("r1", gen, {"a": {"tier": "device"}}, wait_s=0)
        assert await asyncio.wait_for(ack, 1) == []
        assert await c.holdings() == {"a": {"r1": {"tier": "device"}}}
        await c.sync("r2", 0, {}, wait_s=0)
        assert await c.replicas() == ["r1", "r2"]
        await asyncio.sleep(0.7)  # no heartbeat: r2 (and r1) are no longer live, nobody is waited for
        assert await c.wait_acked(gen + 10, 1) == []
        await c.sync("r3", 0, None, wait_s=0)  # a watcher (ingress) is not a replica
        assert await c.replicas() == []

    asyncio.run(scenario())


def test_replica_options_pass_autoscaling_through() -> None:
    settings = Settings(max_batch_size=8)
    fixed = replica_options(settings, Scale(num_replicas=3))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["max_ongoing_requests"] == 16
    auto = replica_options(settings, Scale(num_replicas=2, min_replicas=1, max_replicas=4, target_ongoing_requests=5))
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 4,
        "initial_replicas": 2,
        "target_ongoing_requests": 5,
    }
    assert replica_options(settings, Scale(max_replicas=2))["autoscaling_config"]["target_ongoing_requests"] == 8
    assert Scale.for_settings(Settings(device="cuda"), num_replicas=None).replica_gpus == 1.0
    with pytest.raises(ValueError):
        replica_options(settings, Scale(min_replicas=3, max_replicas=2))


def test_image_requests_route_by_their_first_adapter() -> None:
    """The ingress reads an image request's adapters for routing only: A1111's `<lora>` tags (prompt, then the
    hires prompt) at their denoiser multipliers, an edit form's JSON list; what does not parse routes as the base
    model, whose replica then answers the request's 400."""
    prompt = {"prompt": "a <lora:ink:0.5> cat <lora:wash:1:0.3>", "hr_prompt": "<lora:hr:2>"}
    routed = _tag_adapters(json.dumps(prompt).encode())
    assert routed is not None and [(a.name, a.scale) for a in routed] == [("ink", 0.5), ("wash", 0.3), ("hr", 2.0)]
    assert _tag_adapters(b'{"prompt": "a cat"}') is None
    assert _tag_adapters(b"not json") is None
    assert _tag_adapters(b'{"prompt": "<lora:ink:1e9>"}') is None  # out of range: the replica's 400
    assert _tag_adapters(b'{"prompt": "<lora:ink:1:lbw=ALL>"}') is None  # block weights: the replica's 400
    form = _form_adapters('[{"name": "ink", "scale": 0.7, "text_encoder_scale": 0}]')
    assert form is not None and [(a.name, a.scale) for a in form] == [("ink", 0.7)]
    assert _form_adapters("[{") is None and _form_adapters(None) is None


async def _collect(parts: AsyncIterator[Start | bytes]) -> tuple[Start, bytes]:
    items = [p async for p in parts]
    assert isinstance(items[0], Start) and all(isinstance(p, bytes) for p in items[1:])
    return items[0], b"".join(p for p in items[1:] if isinstance(p, bytes))


def test_forwarding_runs_the_single_process_app(world: World) -> None:
    """A replica answers through the very app `serve` runs: same JSON, SSE stream and error shape."""
    settings = Settings(model=str(world.model_dir), served_model_name="tiny", device="cpu", shutdown_grace_s=1)
    app = create_app(settings, load_causal_lm(str(world.model_dir), "cpu", "auto"))
    app.state.components.replica = "replica-7"

    def post(body: dict[str, Any]) -> Forwarded:
        headers = [("content-type", "application/json")]
        return Forwarded("POST", "/v1/completions", b"", headers, json.dumps(body).encode())

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            greedy = {"model": "tiny", "prompt": "the sea is", "max_tokens": 6, "temperature": 0}
            start, body = await _collect(call_app(app, post(greedy)))
            headers = dict(start.headers)
            assert start.status == 200 and headers["x-lokr-replica"] == "replica-7"
            assert "content-length" not in headers  # recomputed by the ingress's own response
            text = json.loads(body)["choices"][0]["text"]
            start, body = await _collect(call_app(app, post({**greedy, "stream": True})))
            events = [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]
            assert dict(start.headers)["content-type"].startswith("text/event-stream") and events[-1] == "[DONE]"
            assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == text
            start, body = await _collect(call_app(app, post({**greedy, "model": "nope"})))
            assert start.status == 404 and json.loads(body)["error"]["code"] == "model_not_found"
            # A consumer that stops early (client gone) leaves the app free for the next request.
            parts = call_app(app, post({**greedy, "stream": True, "max_tokens": 50}))
            assert isinstance(await parts.__anext__(), Start)
            await parts.aclose()
            start, _ = await _collect(call_app(app, post(greedy)))
            assert start.status == 200

    asyncio.run(scenario())


def test_single_process_names_its_replica(server: Server, client: httpx.Client) -> None:
    expected = f"{socket.gethostname()}:{server.process.pid}"
    assert client.get("/health").headers["x-lokr-replica"] == expected
    assert client.post("/v1/completions", json={"model": "nope", "prompt": "x"}).headers["x-lokr-replica"] == expected


def test_app_builder_takes_serve_config_args(world: World) -> None:
    """The KubeRay / `serve run` entry point builds the application from plain config args (no cluster)."""
    from service.scaleout.app import app_builder

    args = {"model": str(world.model_dir), "adapter": f"alpha={world.adapters['alpha']}", "num_replicas": 2}
    assert app_builder({**args, "max_replicas": 3}) is not None
    with pytest.raises(ValueError):
        app_builder({**args, "min_replicas": 4, "max_replicas": 3})


def test_a_replica_loads_while_an_unload_waits_for_its_running_requests(world: World) -> None:
    """The catalog removed `alpha` while a request still holds it: the replica's unload waits for that request,
    and meanwhile other adapters load there (they waited behind the unload's lock for up to 60 s)."""
    from service.scaleout.catalog import Snapshot
    from service.scaleout.replica import LokrReplica

    settings = Settings(model=str(world.model_dir), served_model_name="tiny", device="cpu", shutdown_grace_s=1)
    app = create_app(settings, load_causal_lm(str(world.model_dir), "cpu", "auto"))

    async def resident(name: str) -> str:
        return name

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            bare = type("BareReplica", (LokrReplica,), {"__del__": lambda self: None})  # Serve awaits the real one
            replica = object.__new__(bare)  # its parts, without a Ray Serve context
            replica.app, replica._versions, replica._seen = app, {}, 0
            replica._lock, replica._leaving, replica._resident = asyncio.Lock(), {}, resident
            assert (await replica.admit("alpha", str(world.adapters["alpha"]), 1))[0] == 201
            async with replica.registry.lease(["alpha"]):  # a request still runs on alpha
                removal = asyncio.ensure_future(replica._reconcile(Snapshot(2, {})))
                while "alpha" in replica.registry.names():  # draining
                    await asyncio.sleep(0.01)
                assert (await replica.admit("beta", str(world.adapters["beta"]), 3))[0] == 201
                assert not removal.done()  # still waiting for the request on alpha
            await removal
            assert replica.registry.names() == ["beta"] and list(replica._versions) == ["beta"]

    asyncio.run(scenario())
