"""Issue 5, items 1-3 beyond test_admin.py / test_errors.py: hostile adapter sources, uploads, races, auth.

Every refusal is a 4xx in the one error shape `{"error": {"message", "type", "code"}}`, the registry is
unchanged afterwards, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import os
import pickle
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from service.app import create_app
from service.backend import LoadedModel
from service.demo import build_tiny_llama, build_word_tokenizer
from service.settings import Settings

from .conftest import ADMIN_TOKEN, Server, World, ensure_loaded, start_server, stop_server

pytestmark = pytest.mark.e2e
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
API_KEY = "sk-hostile-test-key-5c1e7"
CORS_OK = "http://allowed.example"
SCORE = {"model": "tiny", "prompt": "the sea is", "max_tokens": 0, "echo": True, "logprobs": 0}


def _error(response: httpx.Response, status: int | tuple[int, ...]) -> dict[str, str]:
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code"}, body
    assert all(isinstance(v, str) and v for v in body["error"].values()), body
    return dict(body["error"])


def _registry(client: httpx.Client) -> list[dict[str, Any]]:
    """What is loaded (identity only: usage counters such as `in_use` move with traffic)."""
    response = client.get("/v1/adapters", headers=AUTH)
    assert response.status_code == 200
    keys = ("name", "format", "source", "modules", "num_parameters", "nbytes", "dtype", "loaded_at")
    return sorted(({k: a.get(k) for k in keys} for a in response.json()["data"]), key=lambda a: str(a["name"]))


def _still_serving(client: httpx.Client, headers: dict[str, str] | None = None) -> None:
    assert client.get("/ready").status_code == 200
    ok = client.post("/v1/completions", json={"model": "tiny", "prompt": "the sea", "max_tokens": 2}, headers=headers)
    assert ok.status_code == 200, ok.text


# ------------------------------------------------------------------------------------------ hostile sources
def _peft_copy(world: World, name: str) -> Path:
    """A fresh copy of the `alpha` PEFT dir under the adapter root, to be spoiled by the caller."""
    out = world.adapter_root / f"hostile-{name}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(world.adapters["alpha"], out)
    return out


def _config(path: Path) -> dict[str, Any]:
    return dict(json.loads((path / "adapter_config.json").read_text()))


class _Armed:
    """Unpickling this opens (creates) `marker`: proof of whether anything unpickled the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return builtins.open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def armed(world: World) -> Iterator[tuple[bytes, Path]]:
    marker = world.root / "UNPICKLED-MARKER"
    payload = pickle.dumps(_Armed(marker))
    probe = world.root / "probe-marker"
    pickle.loads(pickle.dumps(_Armed(probe)))  # the payload really is armed: unpickling it creates a file
    assert probe.exists()
    probe.unlink()
    yield payload, marker
    assert not marker.exists(), "a pickle offered as an adapter was unpickled"


def _spoilers(world: World, armed: tuple[bytes, Path]) -> dict[str, tuple[str, int, str]]:
    """name -> (source relative to the root, expected status, a word the message must contain)."""
    payload, _ = armed
    root = world.adapter_root
    cases: dict[str, tuple[str, int, str]] = {}

    for suffix in (".ckpt", ".pt", ".bin"):
        (root / f"hostile{suffix}").write_bytes(payload)
        cases[f"pickle{suffix}"] = (f"hostile{suffix}", 400, "pickle")
    d = _peft_copy(world, "pickle-dir")
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(payload)
    cases["pickle-in-peft-dir"] = (d.name, 400, "pickle")
    d = _peft_copy(world, "pickle-named-safetensors")
    (d / "adapter_model.safetensors").write_bytes(payload)
    cases["pickle-bytes-named-safetensors"] = (d.name, 400, "safetensors")

    d = _peft_copy(world, "huge-header")
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 2**62) + b'{"a": 1}' + b"\0" * 64)
    cases["header-claims-huge-length"] = (d.name, 400, "safetensors")
    d = _peft_copy(world, "header-past-eof")
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 10_000) + b"{}")
    cases["header-past-end-of-file"] = (d.name, 400, "safetensors")
    d = _peft_copy(world, "truncated")
    data = (world.adapters["alpha"] / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (d.name, 400, "safetensors")
    (root / "hostile-garbage.safetensors").write_bytes(os.urandom(4096))
    cases["garbage-lycoris-file"] = ("hostile-garbage.safetensors", 400, "safetensors")

    d = _peft_copy(world, "nested-config")
    (d / "adapter_config.json").write_text("[" * 200_000 + "]" * 200_000)
    cases["deeply-nested-config"] = (d.name, 400, "adapter_config.json")
    d = _peft_copy(world, "huge-config")
    (d / "adapter_config.json").write_text(json.dumps({**_config(d), "task_type": "x" * (2 << 20)}))
    cases["huge-config"] = (d.name, 400, "adapter_config.json")
    d = _peft_copy(world, "bigint-config")
    (d / "adapter_config.json").write_text('{"peft_type": "LOKR", "r": ' + "9" * 5000 + "}")
    cases["config-int-over-4300-digits"] = (d.name, 400, "adapter_config.json")
    d = _peft_copy(world, "bad-pattern")
    (d / "adapter_config.json").write_text(json.dumps({**_config(d), "rank_pattern": {"(": 2}}))
    cases["rank-pattern-not-a-regex"] = (d.name, 400, "rank_pattern")

    for label, patch, word in [
        ("wrong-peft-type", {"peft_type": "LORA"}, "LORA"),
        ("r-zero", {"r": 0}, "r"),
        ("r-negative", {"r": -4}, "r"),
        ("r-float", {"r": 2.5}, "r"),
        ("unknown-option", {"lora_dropout_magic": 1}, "lora_dropout_magic"),
        ("alpha-nan", {"alpha": "NaN"}, "alpha"),
    ]:
        d = _peft_copy(world, label)
        (d / "adapter_config.json").write_text(json.dumps({**_config(d), **patch}))
        cases[label] = (d.name, 400, word)

    tensors = load_file(str(world.adapters["alpha"] / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    for label, spoil, word in [
        ("int-dtype", lambda t: t.to(torch.int32), "dtype"),
        ("bool-dtype", lambda t: t > 0, "dtype"),
        ("nan", lambda t: t.clone().fill_(float("nan")), "NaN"),
        ("inf", lambda t: t.clone().index_fill_(0, torch.tensor([0]), float("inf")), "NaN or Inf"),
    ]:
        d = _peft_copy(world, label)
        save_file({**tensors, first: spoil(tensors[first]).contiguous()}, str(d / "adapter_model.safetensors"))
        cases[label] = (d.name, 400, word)
    d = _peft_copy(world, "unknown-module")
    save_file(
        {**tensors, "base_model.model.model.layers.9.mlp.up_proj.lokr_w1": tensors[first].clone()},
        str(d / "adapter_model.safetensors"),
    )
    cases["module-the-model-lacks"] = (d.name, 400, "layers.9")

    for label, which in [("empty-weights", "adapter_model.safetensors"), ("empty-config", "adapter_config.json")]:
        d = _peft_copy(world, label)
        (d / which).write_bytes(b"")
        cases[label] = (d.name, 400, which)
    (root / "hostile-empty.safetensors").write_bytes(b"")
    cases["empty-lycoris-file"] = ("hostile-empty.safetensors", 400, "empty")
    d = world.adapter_root / "hostile-empty-dir"
    d.mkdir(exist_ok=True)
    cases["empty-dir"] = (d.name, 400, "adapter_model.safetensors")
    return cases


def test_hostile_sources_are_refused_and_change_nothing(
    client: httpx.Client, world: World, armed: tuple[bytes, Path]
) -> None:
    ensure_loaded(client, "alpha")
    before = _registry(client)
    scores = client.post("/v1/completions", json={**SCORE, "model": "alpha"}).json()["choices"]
    failures = []
    for label, (source, status, word) in _spoilers(world, armed).items():
        response = client.post("/v1/adapters", json={"name": f"h-{label[:40]}", "source": source}, headers=AUTH)
        try:
            error = _error(response, status)
            assert word.lower() in error["message"].lower(), error
        except AssertionError as exc:
            failures.append(f"{label}: {exc}")
    assert not failures, "\n".join(failures)
    assert _registry(client) == before
    assert client.post("/v1/completions", json={**SCORE, "model": "alpha"}).json()["choices"] == scores
    _still_serving(client)


def test_symlinked_parent_dir_escaping_the_root(client: httpx.Client, world: World, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(world.adapters["beta"], outside / "adapter")
    link = world.adapter_root / "hostile-parent-link"
    if not link.is_symlink():
        os.symlink(outside, link)
    before = _registry(client)
    for source in ("hostile-parent-link/adapter", str(link / "adapter"), "hostile-parent-link/../../tiny-llama"):
        _error(client.post("/v1/adapters", json={"name": "escapee", "source": source}, headers=AUTH), 403)
        alias = {"lora_name": "escapee", "lora_path": source}
        _error(client.post("/v1/load_lora_adapter", json=alias, headers=AUTH), 403)
    assert _registry(client) == before


def test_pickle_uploads_are_refused_unopened(client: httpx.Client, armed: tuple[bytes, Path]) -> None:
    payload, marker = armed
    before = _registry(client)
    for filename in ("adapter.ckpt", "adapter.pt", "model.pth", "adapter_model.bin"):
        files = [("files", (filename, payload, "application/octet-stream"))]
        message = _error(client.put("/v1/adapters/pickled", files=files, headers=AUTH), 400)["message"]
        assert message.startswith(f"{filename} is a pickle checkpoint, and pickles are never opened"), message
    files = [("files", ("adapter.safetensors", payload, "application/octet-stream"))]
    message = _error(client.put("/v1/adapters/pickled", files=files, headers=AUTH), 400)["message"]
    assert message.startswith("uploaded adapter.safetensors is not a valid safetensors file"), message
    assert "lokr-serve-uploads" not in message and "pickled-" not in message  # no server scratch path
    assert _registry(client) == before
    assert not marker.exists()


def test_same_name_load_race_one_wins(client: httpx.Client, server: Server) -> None:
    async def race() -> list[httpx.Response]:
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=120, headers=AUTH) as a,
            httpx.AsyncClient(base_url=server.url, timeout=120, headers=AUTH) as b,
        ):
            body = {"name": "racer", "source": "gamma"}
            return list(await asyncio.gather(a.post("/v1/adapters", json=body), b.post("/v1/adapters", json=body)))

    for _ in range(3):
        responses = asyncio.run(race())
        assert sorted(r.status_code for r in responses) == [201, 409], [r.text for r in responses]
        assert _error(next(r for r in responses if r.status_code == 409), 409)["code"] == "adapter_exists"
        assert [a["name"] for a in _registry(client)].count("racer") == 1
        assert client.delete("/v1/adapters/racer", headers=AUTH).status_code == 200


# ------------------------------------------------------------------------------------------ upload limit
@pytest.fixture(scope="module")
def small_upload_server(world: World) -> Iterator[tuple[Server, Path]]:
    upload_dir = world.root / "small-uploads"
    upload_dir.mkdir(exist_ok=True)
    srv = start_server(world, "--max-upload-bytes", "2048", "--upload-dir", str(upload_dir))
    try:
        yield srv, upload_dir
    finally:
        stop_server(srv)


def test_upload_over_limit_is_413_and_changes_nothing(small_upload_server: tuple[Server, Path], world: World) -> None:
    srv, upload_dir = small_upload_server
    src = world.adapters["alpha"]
    files = [
        ("files", ("adapter_config.json", (src / "adapter_config.json").read_bytes(), "application/json")),
        ("files", ("adapter_model.safetensors", (src / "adapter_model.safetensors").read_bytes(), "a/b")),
    ]
    assert len(files[1][1][1]) > 2048
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        before = _registry(c)
        # declared length over the limit: refused before the body is read
        _error(c.put("/v1/adapters/too-big", files=files, headers=AUTH), 413)
        # no declared length (chunked): refused while streaming to disk, the partial file removed
        request = c.build_request("PUT", "/v1/adapters/too-big", files=files, headers=AUTH)
        body = request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}

        def chunks() -> Iterator[bytes]:
            for i in range(0, len(body), 1024):
                yield body[i : i + 1024]

        _error(c.put("/v1/adapters/too-big", content=chunks(), headers=headers), 413)
        assert _registry(c) == before
        assert "too-big" not in {m["id"] for m in c.get("/v1/models").json()["data"]}
        assert list(upload_dir.iterdir()) == [], "a refused upload left files behind"
        # a small valid upload still works on the same server
        tiny = {"lora_te_model_layers_0_self_attn_q_proj.lokr_w1": torch.zeros(8, 8),
                "lora_te_model_layers_0_self_attn_q_proj.lokr_w2": torch.zeros(8, 8)}  # fmt: skip
        ok = c.put("/v1/adapters/fits", files=[("files", ("fits.safetensors", _bytes(tiny), "a/b"))], headers=AUTH)
        assert ok.status_code == 201, ok.text
        assert c.delete("/v1/adapters/fits", headers=AUTH).status_code == 200
        _still_serving(c)


def _bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


# ------------------------------------------------------------------------------------------ auth, CORS, logs
@pytest.fixture(scope="module")
def keyed_server(world: World) -> Iterator[Server]:
    srv = start_server(world, "--api-key", API_KEY, "--cors-origin", CORS_OK, "--log-level", "debug")
    try:
        yield srv
    finally:
        stop_server(srv)


def test_api_keys_guard_inference_routes(keyed_server: Server) -> None:
    good = {"Authorization": f"Bearer {API_KEY}"}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "the sea"}], "max_tokens": 2}
    routes: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", {"model": "tiny", "prompt": "the sea", "max_tokens": 2}),
        ("POST", "/v1/chat/completions", chat),
        ("POST", "/v1/images/generations", {"prompt": "x"}),  # the wrong kind's refusals too: no model name leaks
        ("GET", "/sdapi/v1/loras", None),
    ]
    with httpx.Client(base_url=keyed_server.url, timeout=60) as c:
        for method, path, body in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}, {"X-Api-Key": API_KEY},
                            {"Authorization": f"Basic {API_KEY}"}, AUTH):  # fmt: skip
                error = _error(c.request(method, path, json=body, headers=headers), 401)
                assert error["type"] == "authentication_error"
            ok = c.request(method, path, json=body, headers=good)
            assert ok.status_code in (200, 400), ok.text  # 400: the word tokenizer may have no chat template
            if ok.status_code == 400:
                code = _error(ok, 400)["code"]
                assert (path, code) == ("/v1/chat/completions", "no_chat_template") or code == "wrong_model_kind"
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
        _error(c.get("/v1/adapters", headers=good), 401)  # an API key is not the admin token
        assert c.get("/v1/adapters", headers=AUTH).status_code == 200
        _still_serving(c, good)


def test_cors_off_by_default(client: httpx.Client) -> None:
    origin = {"Origin": "http://evil.example"}
    response = client.get("/v1/models", headers=origin)
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    preflight = client.options("/v1/completions", headers={**origin, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    if preflight.status_code >= 400:
        _error(preflight, preflight.status_code)


def test_cors_on_with_flag(keyed_server: Server) -> None:
    with httpx.Client(base_url=keyed_server.url, timeout=60) as c:
        good = {"Authorization": f"Bearer {API_KEY}"}
        allowed = c.get("/v1/models", headers={**good, "Origin": CORS_OK})
        assert allowed.headers.get("access-control-allow-origin") == CORS_OK
        preflight = c.options("/v1/completions", headers={"Origin": CORS_OK, "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 200 and preflight.headers.get("access-control-allow-origin") == CORS_OK
        other = c.get("/v1/models", headers={**good, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_no_secrets_in_logs(keyed_server: Server) -> None:
    wrong = "sk-wrong-guess-0b9f"
    with httpx.Client(base_url=keyed_server.url, timeout=60) as c:
        good = {"Authorization": f"Bearer {API_KEY}"}
        c.post("/v1/completions", json={"model": "tiny", "prompt": "the sea", "max_tokens": 2}, headers=good)
        bad = {"Authorization": f"Bearer {wrong}"}
        c.post("/v1/completions", json={"model": "tiny", "prompt": "the sea"}, headers=bad)
        c.post("/v1/completions", json={"model": "nope", "prompt": "the sea"}, headers=good)
        c.get("/v1/adapters", headers=AUTH)
        c.get("/v1/adapters", headers={"Authorization": f"Bearer {wrong}"})
        c.post("/v1/adapters", json={"name": "x", "source": "/etc/passwd"}, headers=AUTH)
        c.post("/v1/adapters", json={"name": "x", "source": "missing"}, headers=AUTH)
    text = keyed_server.log.read_text(errors="replace")
    assert "/v1/completions" in text, "the request log is empty: nothing to check"
    for secret in (API_KEY, ADMIN_TOKEN, wrong):
        assert secret not in text, f"{secret!r} appears in the server log"


def _in_process(host: str, admin_token: str | None) -> TestClient:
    tokenizer = build_word_tokenizer(["the", "sea", "is", "calm"])
    model = build_tiny_llama(len(tokenizer), seed=0)
    loaded = LoadedModel(model, tokenizer, torch.device("cpu"), torch.float32, 64)
    settings = Settings(model="unused", host=host, served_model_name="tiny", admin_token=admin_token)
    return TestClient(create_app(settings, loaded=loaded))


ADMIN_CALLS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/v1/adapters", None),
    ("GET", "/v1/adapters/x", None),
    ("POST", "/v1/adapters", {"name": "x", "source": "x"}),
    ("PUT", "/v1/adapters/x", None),
    ("DELETE", "/v1/adapters/x", None),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "x"}),
    ("POST", "/v1/unload_lora_adapter", {"lora_name": "x"}),
]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "example.com", ""])
def test_admin_refused_on_public_bind_without_token(host: str) -> None:
    with _in_process(host, None) as c:
        for method, path, body in ADMIN_CALLS:
            error = _error(c.request(method, path, json=body), 403)
            assert "--admin-token" in error["message"]
            _error(c.request(method, path, json=body, headers=AUTH), 403)
        ok = c.post("/v1/completions", json={"model": "tiny", "prompt": "the sea", "max_tokens": 1})
        assert ok.status_code == 200, ok.text


def test_admin_on_public_bind_with_token() -> None:
    with _in_process("0.0.0.0", ADMIN_TOKEN) as c:
        for method, path, body in ADMIN_CALLS:
            _error(c.request(method, path, json=body), 401)
        assert c.get("/v1/adapters", headers=AUTH).status_code == 200


def test_admin_open_on_loopback_without_token() -> None:
    with _in_process("127.0.0.1", None) as c:
        assert c.get("/v1/adapters").status_code == 200
