"""Dozens of simultaneous requests over several adapters and the base; loads and unloads under traffic."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from pathlib import Path

import httpx
import pytest

from .conftest import ADMIN_TOKEN, Server, World, ensure_loaded, start_server, stop_server

pytestmark = pytest.mark.e2e
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PROMPTS = ["the sea is", "a cat sat on", "the sun rose over the", "bread and soup", "a ship sailed"]
MODELS = ["tiny", "alpha", "beta", "gamma"]


def _body(model: str, prompt: str) -> dict[str, object]:
    return {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 1}


def _key(response: dict[str, object]) -> tuple[str, list[float]]:
    choice = response["choices"][0]  # type: ignore[index]
    return choice["text"], [round(x, 4) for x in choice["logprobs"]["token_logprobs"]]


def test_concurrent_mixed_requests_equal_sequential(client: httpx.Client, server) -> None:  # type: ignore[no-untyped-def]
    for name in MODELS[1:]:
        ensure_loaded(client, name)
    cases = [(m, p) for m in MODELS for p in PROMPTS] * 2
    sequential = {(m, p): _key(client.post("/v1/completions", json=_body(m, p)).json()) for m, p in set(cases)}
    assert len({tuple(sequential[(m, PROMPTS[0])][1]) for m in MODELS}) == len(MODELS), "adapters must differ"

    async def run_all() -> list[tuple[tuple[str, str], dict[str, object]]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as ac:

            async def one(m: str, p: str) -> tuple[tuple[str, str], dict[str, object]]:
                return (m, p), (await ac.post("/v1/completions", json=_body(m, p))).json()

            return await asyncio.gather(*(one(m, p) for m, p in cases))

    for case, response in asyncio.run(run_all()):
        assert _key(response)[0] == sequential[case][0], case
        assert _key(response)[1] == pytest.approx(sequential[case][1], abs=2e-3), case


def test_load_and_unload_during_traffic(client: httpx.Client, server) -> None:  # type: ignore[no-untyped-def]
    ensure_loaded(client, "alpha")
    expected = _key(client.post("/v1/completions", json=_body("alpha", PROMPTS[0])).json())

    async def scenario() -> tuple[list[httpx.Response], list[int]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as ac:
            traffic = [ac.post("/v1/completions", json=_body("alpha", PROMPTS[0])) for _ in range(16)]

            async def churn() -> list[int]:
                codes = []
                for i in range(4):
                    name = f"churn{i}"
                    r = await ac.post("/v1/adapters", json={"name": name, "source": "beta"}, headers=AUTH)
                    codes.append(r.status_code)
                    codes.append((await ac.delete(f"/v1/adapters/{name}", headers=AUTH)).status_code)
                return codes

            *responses, codes = await asyncio.gather(*traffic, churn())
            return responses, codes

    responses, codes = asyncio.run(scenario())
    assert codes == [201, 200] * 4
    for response in responses:
        assert response.status_code == 200
        assert _key(response.json())[0] == expected[0]


def test_unload_waits_for_running_requests(client: httpx.Client, server) -> None:  # type: ignore[no-untyped-def]
    ensure_loaded(client, "gamma")

    async def scenario() -> tuple[list[httpx.Response], httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as ac:
            long = [ac.post("/v1/completions", json={**_body("gamma", p), "max_tokens": 40}) for p in PROMPTS]
            tasks = [asyncio.ensure_future(t) for t in long]
            await asyncio.sleep(0.05)
            unload = await ac.delete("/v1/adapters/gamma", headers=AUTH)
            after = await ac.post("/v1/completions", json=_body("gamma", PROMPTS[0]))
            return list(await asyncio.gather(*tasks)), unload, after

    responses, unload, after = asyncio.run(scenario())
    assert unload.status_code == 200
    assert all(r.status_code in (200, 404) for r in responses)
    assert after.status_code == 404
    ensure_loaded(client, "gamma")


async def _until_all_generating(ac: httpx.AsyncClient, adapter: str, count: int) -> None:
    """Wait until `count` requests for `adapter` produced their first token (they are running in the engine)."""
    series = f'lokr_time_to_first_token_seconds_count{{adapter="{adapter}"}}'
    while True:
        metrics = (await ac.get("/metrics")).text
        seen = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(series)]
        if seen and seen[0] >= count:
            return
        await asyncio.sleep(0.05)


def test_sigterm_finishes_inflight_and_exits_zero(world: World) -> None:
    server = start_server(world, "--adapter", f"alpha={world.adapters['alpha']}", "--shutdown-grace-s", "300")

    async def scenario() -> list[httpx.Response]:  # generous bounds: a busy 2-core box may be 10x slower
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as ac:
            tasks = [asyncio.ensure_future(ac.post("/v1/completions", json={**_body("alpha", p), "max_tokens": 30}))
                     for p in PROMPTS]  # fmt: skip
            await _until_all_generating(ac, "alpha", len(PROMPTS))  # not a fixed sleep: the box may be busy
            server.process.send_signal(signal.SIGTERM)
            return list(await asyncio.gather(*tasks, return_exceptions=True))  # type: ignore[arg-type]

    responses = asyncio.run(scenario())
    assert server.process.wait(timeout=360) == 0
    finished = [r for r in responses if isinstance(r, httpx.Response)]
    assert finished and all(r.status_code == 200 for r in finished)


SLOW_STEPS = """import time
import service.lm as lm
_step = lm.CausalLMBackend.step
def _slow(self):
    time.sleep({step_s})  # a model whose steps are slow: requests are still running when the signal comes
    _step(self)
lm.CausalLMBackend.step = _slow
"""


def _slow_server(world: World, tmp_path: Path, *flags: str, step_s: float = 0.2) -> Server:
    """A server for `alpha` whose engine steps take `step_s` (`SLOW_STEPS`, loaded by the server process)."""
    (tmp_path / "sitecustomize.py").write_text(SLOW_STEPS.format(step_s=step_s))
    pythonpath = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    adapter = f"alpha={world.adapters['alpha']}"
    return start_server(world, "--adapter", adapter, *flags, env={"PYTHONPATH": pythonpath})


@pytest.mark.parametrize("grace", ["0", "1"])
def test_sigterm_past_the_grace_answers_503_and_ends_streams_with_an_error(
    world: World, tmp_path: Path, grace: str
) -> None:
    """Requests still running when the grace runs out hear why (503, or an error event then `[DONE]` on a stream)
    instead of a cut connection; a grace of 0 means none, not forever."""
    server = _slow_server(world, tmp_path, "--shutdown-grace-s", grace)
    long = {"model": "alpha", "prompt": "the sea is", "max_tokens": 100, "temperature": 0}

    async def scenario() -> tuple[httpx.Response, list[str]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as ac:
            plain = asyncio.ensure_future(ac.post("/v1/completions", json=long))
            async with ac.stream("POST", "/v1/completions", json={**long, "stream": True}) as stream:
                lines = stream.aiter_lines()
                received = [await anext(lines)]  # its first token is out: it runs in the engine
                await _until_all_generating(ac, "alpha", 2)
                server.process.send_signal(signal.SIGTERM)
                received += [line async for line in lines]
            return await plain, [line for line in received if line]

    plain, events = asyncio.run(scenario())
    assert server.process.wait(timeout=120) == 0
    assert plain.status_code == 503 and "shutting down" in plain.json()["error"]["message"]
    assert events[-1] == "data: [DONE]" and '"error"' in events[-2] and "shutting down" in events[-2]
    assert all(json.loads(line) for line in server.log.read_text().splitlines())  # uvicorn's lines too


def test_the_http_servers_own_log_lines_are_json(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from service.logs import configure_logging

    loggers = [logging.getLogger(name) for name in ("lokr_serve", "uvicorn")]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    configure_logging()
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    finally:
        for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
            lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate
    line = json.loads(capsys.readouterr().err.strip())
    assert line["logger"] == "uvicorn.error" and line["level"] == "error" and "boom" in line["exc"]


async def _until_queue_depth(ac: httpx.AsyncClient, depth: int) -> None:
    while f"lokr_queue_depth {depth:.1f}" not in (await ac.get("/metrics")).text:
        await asyncio.sleep(0.05)


def _generated(metrics: str, adapter: str) -> float:
    series = f'lokr_tokens_total{{adapter="{adapter}",kind="generated"}}'
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(series))


def test_a_full_queue_refuses_a_stream_with_503_and_a_client_that_leaves_cancels_its_completion(
    world: World, tmp_path: Path
) -> None:
    """A stream refused before its first token gets the refusal's own status (503 + Retry-After), not a 200 with
    an error event; a non-streamed request whose client hangs up stops generating and gives its adapter back.
    Steps of 1 s: the running request's 100 tokens outlast the set-up by far, even on a busy machine (with 0.2-s
    steps it once finished first there, and the stream meant to be refused was queued and ran)."""
    server = _slow_server(world, tmp_path, "--max-batch-size", "1", "--max-queue", "1", step_s=1.0)
    long = {"model": "alpha", "prompt": "the sea is", "max_tokens": 100, "temperature": 0}
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    async def scenario() -> tuple[httpx.Response, float]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as ac:
            running = asyncio.ensure_future(ac.post("/v1/completions", json=long))
            await _until_all_generating(ac, "alpha", 1)
            async with httpx.AsyncClient(base_url=server.url, timeout=300) as other:
                await _until_queue_depth(ac, 0)  # a step after the running one's admission
                queued = [asyncio.ensure_future(other.post("/v1/completions", json=long))]
                await _until_queue_depth(ac, 1)  # the queue (of one) is full
                refused = await ac.post("/v1/completions", json={**long, "stream": True})
                for task in queued:  # every client hangs up: their rows must stop
                    task.cancel()
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(running, *queued)
            while (await ac.get("/v1/adapters/alpha", headers=admin)).json()["in_use"] != 0:
                await asyncio.sleep(0.05)
            return refused, _generated((await ac.get("/metrics")).text, "alpha")

    try:
        refused, generated = asyncio.run(scenario())
    finally:
        stop_server(server)
    assert generated < 100, f"the abandoned completions kept generating ({generated} tokens)"
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"
