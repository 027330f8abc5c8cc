"""Admin API: auth, path confinement, upload, aliases, load/unload semantics."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from .conftest import ADMIN_TOKEN, World, ensure_loaded

pytestmark = pytest.mark.e2e
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _error(response: httpx.Response, status: int) -> dict[str, str]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"])
    return body["error"]


def test_admin_requires_token(client: httpx.Client) -> None:
    for method, path, body in [
        ("GET", "/v1/adapters", None),
        ("GET", "/v1/adapters/alpha", None),
        ("POST", "/v1/adapters", {"name": "x", "source": "alpha"}),
        ("DELETE", "/v1/adapters/alpha", None),
        ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "alpha"}),
        ("POST", "/v1/unload_lora_adapter", {"lora_name": "x"}),
        ("PUT", "/v1/adapters/x", None),
    ]:
        _error(client.request(method, path, json=body), 401)
        _error(client.request(method, path, json=body, headers={"Authorization": "Bearer wrong"}), 401)


def test_load_describe_list_unload(client: httpx.Client) -> None:
    response = client.post("/v1/adapters", json={"name": "tmp-one", "source": "alpha"}, headers=AUTH)
    assert response.status_code == 201, response.text
    info = client.get("/v1/adapters/tmp-one", headers=AUTH).json()
    assert info["name"] == "tmp-one" and info["num_modules"] == 14 and info["format"] == "peft"
    # one copy of a resident adapter on the device: its factor bytes (+ one scale per module), within 5%
    assert info["tier"] == "device" and abs(info["device_nbytes"] - info["nbytes"]) <= 0.05 * info["nbytes"]
    names = {a["name"] for a in client.get("/v1/adapters", headers=AUTH).json()["data"]}
    assert "tmp-one" in names
    _error(client.post("/v1/adapters", json={"name": "tmp-one", "source": "alpha"}, headers=AUTH), 409)
    assert client.delete("/v1/adapters/tmp-one", headers=AUTH).json()["deleted"] is True
    _error(client.get("/v1/adapters/tmp-one", headers=AUTH), 404)
    _error(client.delete("/v1/adapters/tmp-one", headers=AUTH), 404)
    _error(client.post("/v1/completions", json={"model": "tmp-one", "prompt": "the sea"}), 404)


def test_vllm_aliases(client: httpx.Client) -> None:
    response = client.post("/v1/load_lora_adapter", json={"lora_name": "vl", "lora_path": "gamma"}, headers=AUTH)
    assert response.status_code == 200, response.text
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert listed["vl"]["root"] == "vl" and listed["vl"]["parent"]  # the name, not the server's path to it
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "vl"}, headers=AUTH).status_code == 200
    assert "vl" not in {m["id"] for m in client.get("/v1/models").json()["data"]}


@pytest.mark.parametrize(
    ("source", "status"),
    [("../tiny-llama", 403), ("/etc", 403), ("/etc/passwd", 403), ("missing-dir", 400), ("", 400)],
)
def test_paths_outside_roots_are_refused(client: httpx.Client, source: str, status: int) -> None:
    _error(client.post("/v1/adapters", json={"name": "evil", "source": source}, headers=AUTH), status)
    assert "evil" not in {a["name"] for a in client.get("/v1/adapters", headers=AUTH).json()["data"]}


def test_symlink_escape_is_refused(client: httpx.Client, world: World, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    link = world.adapter_root / "escape-link"
    if not link.exists():
        os.symlink(outside, link)
    _error(client.post("/v1/adapters", json={"name": "evil", "source": "escape-link"}, headers=AUTH), 403)


@pytest.mark.parametrize("name", ["", "a/b", "bad\nname", "x" * 200, "tiny", "-lead"])
def test_bad_adapter_names(client: httpx.Client, name: str) -> None:
    response = client.post("/v1/adapters", json={"name": name, "source": "alpha"}, headers=AUTH)
    assert response.status_code == 400, response.text


def test_incompatible_adapter_changes_nothing(client: httpx.Client, world: World) -> None:
    import json

    import torch
    from safetensors.torch import save_file

    bad = world.adapter_root / "wrong-shape"
    bad.mkdir(exist_ok=True)
    config = json.loads((world.adapters["alpha"] / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(config))
    save_file(
        {"base_model.model.model.layers.0.self_attn.q_proj.lokr_w1": torch.ones(3, 3),
         "base_model.model.model.layers.0.self_attn.q_proj.lokr_w2": torch.ones(5, 5)},
        str(bad / "adapter_model.safetensors"),
    )  # fmt: skip
    before = client.get("/v1/adapters", headers=AUTH).json()
    scores_before = client.post(
        "/v1/completions", json={"model": "tiny", "prompt": "the sea", "max_tokens": 0, "echo": True, "logprobs": 0}
    ).json()
    error = _error(client.post("/v1/adapters", json={"name": "bad", "source": "wrong-shape"}, headers=AUTH), 400)
    assert "q_proj" in error["message"]
    assert client.get("/v1/adapters", headers=AUTH).json() == before
    scores_after = client.post(
        "/v1/completions", json={"model": "tiny", "prompt": "the sea", "max_tokens": 0, "echo": True, "logprobs": 0}
    ).json()
    assert scores_after["choices"] == scores_before["choices"]


def test_upload_peft_dir_and_lycoris_file(client: httpx.Client, world: World, tmp_path: Path) -> None:
    src = world.adapters["gamma"]
    weights = (src / "adapter_model.safetensors").read_bytes()
    files = [
        ("files", ("adapter_config.json", (src / "adapter_config.json").read_bytes(), "application/json")),
        ("files", ("adapter_model.safetensors", weights, "application/octet-stream")),
    ]
    response = client.put("/v1/adapters/uploaded", files=files, headers=AUTH)
    assert response.status_code == 201, response.text
    ensure_loaded(client, "gamma")
    body = {"max_tokens": 0, "echo": True, "logprobs": 0, "prompt": "the sea is"}
    a = client.post("/v1/completions", json={"model": "uploaded", **body}).json()["choices"][0]["logprobs"]
    b = client.post("/v1/completions", json={"model": "gamma", **body}).json()["choices"][0]["logprobs"]
    assert a["token_logprobs"] == b["token_logprobs"]
    assert client.delete("/v1/adapters/uploaded", headers=AUTH).status_code == 200
    pickle = [("files", ("adapter_model.bin", b"\x80\x04not really", "application/octet-stream"))]
    _error(client.put("/v1/adapters/pickled", files=pickle, headers=AUTH), 400)
    _error(client.put("/v1/adapters/empty", files=[("files", ("x.safetensors", b"", "a/b"))], headers=AUTH), 400)


def test_upload_of_peft_weights_alone_asks_for_the_config(client: httpx.Client, world: World) -> None:
    weights = (world.adapters["gamma"] / "adapter_model.safetensors").read_bytes()
    files = [("files", ("adapter_model.safetensors", weights, "application/octet-stream"))]
    error = _error(client.put("/v1/adapters/half", files=files, headers=AUTH), 400)
    assert "needs its adapter_config.json" in error["message"], error
    assert "-F files=@adapter_config.json" in error["message"]
    _error(client.get("/v1/adapters/half", headers=AUTH), 404)


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/adapters"])
def test_body_without_json_content_type_says_what_to_send(client: httpx.Client, route: str) -> None:
    body = '{"model": "tiny", "prompt": "the sea", "name": "x", "source": "alpha"}'
    headers = {**AUTH, "content-type": "application/x-www-form-urlencoded"}  # what `curl -d` sends by default
    error = _error(client.post(route, content=body, headers=headers), 400)
    assert "content-type: application/json" in error["message"], error
    assert "valid dictionary" not in error["message"]


def test_api_keys_without_admin_token_close_admin_even_on_loopback() -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(model="unused", host="127.0.0.1", api_key=["k1"]))  # no lifespan: no model needed
    with_key = TestClient(app).get("/v1/adapters", headers={"Authorization": "Bearer k1"})
    error = _error(with_key, 403)
    assert error["code"] == "admin_disabled" and "--admin-token" in error["message"]
    open_app = create_app(Settings(model="unused", host="127.0.0.1"))  # no keys: loopback admin stays open
    assert TestClient(open_app).get("/v1/adapters").status_code == 503  # past auth; the model is not loaded
