"""`lokr-serve ray` end to end: a local Ray instance on this machine, 2 CPU replicas, the tiny model.

One Ray instance for the whole module (started by the CLI under test); the last test SIGTERMs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from .conftest import ADMIN_TOKEN, World, ensure_loaded, free_port

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PROMPTS = ["the sea is", "a cat sat on the"]
# A private loopback test instance: no token (helpers on a shared box share ~/.ray/auth_token), no telemetry.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}


@dataclass
class RayApp:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    address: str


def _wait_ready(app_url: str, process: subprocess.Popen[bytes], log: Path, replicas: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"lokr-serve ray exited early:\n{log.read_text()[-4000:]}")
        try:
            r = httpx.get(f"{app_url}/ready", timeout=2)
            if r.status_code == 200 and len(r.json()["replicas"]) >= replicas:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"not ready in time:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def ray_running(world: World, *extra: str, replicas: int = 2) -> Iterator[RayApp]:
    """`lokr-serve ray` on `world`'s model with `replicas` CPU replicas (one CPU each), ready; stopped on exit."""
    app = _launch(world, *extra, replicas=replicas)
    try:
        yield app
    finally:
        _stop(app.process)


def _launch(world: World, *extra: str, replicas: int) -> RayApp:
    port = free_port()
    log = world.root / f"ray-{port}.log"
    cmd = [
        sys.executable, "-m", "service.cli", "ray", "--model", str(world.model_dir), "--served-model-name", "tiny",
        "--host", "127.0.0.1", "--port", str(port), "--adapter-root", str(world.adapter_root),
        "--admin-token", ADMIN_TOKEN, "--num-replicas", str(replicas), "--num-cpus", "2", "--replica-cpus", "1",
        "--object-store-bytes", str(100 << 20), "--shutdown-grace-s", "10", *extra,
    ]  # fmt: skip
    env = {**os.environ, **RAY_ENV}
    process = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=Path.cwd())
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process, log, replicas=replicas)
        match = re.search(r'"event": "ray_started", "address": "([^"]+)"', log.read_text())
        assert match, log.read_text()[-2000:]
    except BaseException:
        _stop(process)
        raise
    return RayApp(url, process, log, match.group(1))


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def ray_app(world: World) -> Iterator[RayApp]:
    extra = ["--max-batch-size", "4", "--upload-dir", str(world.root / "ray-uploads")]
    with ray_running(world, "--adapter", f"alpha={world.adapters['alpha']}", *extra) as app:
        yield app


@pytest.fixture(scope="module")
def rc(ray_app: RayApp) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ray_app.url, timeout=120) as c:
        yield c


def _complete(c: httpx.Client, model: str, prompt: str, **extra: object) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, **extra}
    response = c.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response


def _holders(c: httpx.Client, name: str) -> set[str]:
    r = c.get(f"/v1/adapters/{name}", headers=ADMIN)
    assert r.status_code == 200, r.text
    return set(r.json()["replicas"])


def _wait_holders(c: httpx.Client, name: str, including: str | None = None) -> set[str]:
    """The catalog learns holdings on each replica's next heartbeat (<= 2 s)."""
    for _ in range(40):
        held = _holders(c, name)
        if held and (including is None or including in held):
            return held
        time.sleep(0.25)
    raise AssertionError(f"no replica reports {name}")


def test_answers_equal_single_process(rc: httpx.Client, client: httpx.Client) -> None:
    """Greedy text and scored prompt logprobs equal the single-process server's, also for a composition."""
    for name in ("alpha", "beta"):
        ensure_loaded(client, name)
    assert rc.post("/v1/adapters", json={"name": "beta", "source": "beta"}, headers=ADMIN).status_code == 201
    cases: list[tuple[str, dict[str, object]]] = [
        ("tiny", {}),
        ("alpha", {}),
        ("beta", {}),
        ("tiny", {"adapters": [{"name": "alpha", "scale": 1.0}, {"name": "beta", "scale": 0.5}]}),
    ]
    for model, extra in cases:
        for prompt in PROMPTS:
            ours, single = _complete(rc, model, prompt, **extra), _complete(client, model, prompt, **extra)
            assert ours.json()["choices"][0]["text"] == single.json()["choices"][0]["text"]
            assert ours.headers["x-lokr-replica"].startswith("SERVE_REPLICA::")
            scored = {"max_tokens": 0, "echo": True, "logprobs": 0, **extra}
            a = _complete(rc, model, prompt, **scored).json()["choices"][0]["logprobs"]["token_logprobs"]
            b = _complete(client, model, prompt, **scored).json()["choices"][0]["logprobs"]["token_logprobs"]
            assert a[0] is None and b[0] is None
            assert a[1:] == pytest.approx(b[1:], abs=1e-5)
    assert ":" in client.get("/health").headers["x-lokr-replica"]  # single process: hostname:pid


def test_errors_keep_the_shape(rc: httpx.Client) -> None:
    r = rc.post("/v1/completions", json={"model": "nope", "prompt": "the"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = rc.post("/v1/completions", json={"model": "tiny", "prompt": "the", "temperature": 9})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "code"}
    r = rc.post("/v1/adapters", json={"name": "bad", "source": "/etc"}, headers=ADMIN)
    assert r.status_code in (400, 403) and "error" in r.json()
    assert rc.post("/v1/adapters", json={"name": "x", "source": "alpha"}).status_code == 401
    r = rc.post("/sdapi/v1/txt2img", json={"prompt": "a cat"})  # an image route on a causal LM, as `serve` answers
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_model_kind"


def test_streaming_through_ingress(rc: httpx.Client) -> None:
    plain = _complete(rc, "alpha", PROMPTS[0]).json()["choices"][0]["text"]
    body = {"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "stream": True}
    with rc.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-lokr-replica"].startswith("SERVE_REPLICA::")
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) > 2
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain


def test_requests_land_on_the_replica_holding_the_adapter(rc: httpx.Client) -> None:
    assert rc.post("/v1/adapters", json={"name": "gamma", "source": "gamma"}, headers=ADMIN).status_code == 201
    for name in ("alpha", "gamma"):
        holders = _wait_holders(rc, name)
        assert len(holders) == 1, holders  # registered once, validated (and held) by one replica
        served = {_complete(rc, name, p).headers["x-lokr-replica"] for p in PROMPTS * 3}
        assert served == holders, (name, served, holders)


def test_unload_reaches_every_replica(rc: httpx.Client) -> None:
    rc.post("/v1/adapters", json={"name": "gamma", "source": "gamma"}, headers=ADMIN)  # 201 or 409
    # A composition routed by beta loads gamma where beta lives as well, so both replicas may hold it.
    composed = _complete(rc, "tiny", PROMPTS[0], adapters=[{"name": "beta"}, {"name": "gamma"}])
    _wait_holders(rc, "gamma", including=composed.headers["x-lokr-replica"])
    r = rc.delete("/v1/adapters/gamma", headers=ADMIN)
    assert r.status_code == 200 and r.json()["pending_replicas"] == [], r.text
    assert rc.get("/v1/adapters/gamma", headers=ADMIN).status_code == 404
    listing = rc.get("/v1/adapters", headers=ADMIN).json()["data"]
    assert "gamma" not in {a["name"] for a in listing}
    for replicas in (a["replicas"] for a in listing):
        assert all("gamma" not in str(v) for v in replicas.values())
    r = rc.post("/v1/completions", json={"model": "tiny", "prompt": "the", "adapters": [{"name": "gamma"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"
    assert rc.post("/v1/adapters", json={"name": "gamma", "source": "gamma"}, headers=ADMIN).status_code == 201


def test_killed_replica_is_replaced(ray_app: RayApp, rc: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    for key, value in RAY_ENV.items():
        monkeypatch.setenv(key, value)
    victim = _complete(rc, "alpha", PROMPTS[0]).headers["x-lokr-replica"]
    expected = _complete(rc, "alpha", PROMPTS[1]).json()["choices"][0]["text"]
    ray.init(address=ray_app.address, log_to_driver=False)
    try:
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    finally:
        ray.shutdown()
    deadline, replaced = time.monotonic() + 180, False
    while time.monotonic() < deadline and not replaced:
        live = rc.get("/ready").json().get("replicas", [])
        replaced = len(live) == 2 and victim not in live
        time.sleep(0.5)
    assert replaced, ray_app.log.read_text()[-3000:]
    texts = {_complete(rc, "alpha", PROMPTS[1]).json()["choices"][0]["text"] for _ in range(4)}
    assert texts == {expected}  # the adapter came back on demand, wherever it now lives


def test_sigterm_stops_everything(ray_app: RayApp, rc: httpx.Client, world: World) -> None:
    """Drains, deletes the app and stops the Ray instance it started: no process of it is left, and no upload
    (the catalog that knew them is gone)."""
    gamma = world.adapters["gamma"]
    files = [("files", (n, (gamma / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")]
    assert rc.put("/v1/adapters/up", files=files, headers=ADMIN).status_code == 201
    uploads = world.root / "ray-uploads"
    assert [p for p in uploads.rglob("*") if p.is_file()]  # kept while loaded
    tree = psutil.Process(ray_app.process.pid).children(recursive=True)
    assert len(tree) > 3  # raylet, GCS, workers...
    started = time.monotonic()
    ray_app.process.send_signal(signal.SIGTERM)
    assert ray_app.process.wait(timeout=60) == 0
    assert time.monotonic() - started < 60
    _, alive = psutil.wait_procs(tree, timeout=10)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [p.cmdline()[:3] for p in alive]
    assert '"event": "stopped"' in ray_app.log.read_text()
    assert not [p for p in uploads.rglob("*") if p.is_file()]
