"""Fixtures: a tiny random Llama + word tokenizer on disk, PEFT-saved LoKr adapters, a real server."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from service.demo import build_tiny_llama, build_word_tokenizer

WORDS = [
    "the",
    "sea",
    "is",
    "blue",
    "and",
    "the",
    "sky",
    "is",
    "grey",
    ".",
    "a",
    "cat",
    "sat",
    "on",
    "the",
    "mat",
    ".",
    "the",
    "sun",
    "rose",
    "over",
    "the",
    "hills",
    "and",
    "the",
    "birds",
    "sang",
    "a",
    "ship",
    "sailed",
    "far",
    "away",
    ",",
    "its",
    "crew",
    "sang",
    "loud",
    "songs",
    ".",
    "bread",
    "and",
    "soup",
    "are",
    "warm",
    ".",
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADMIN_TOKEN = "test-admin-token"


@dataclass
class World:
    root: Path
    model_dir: Path
    adapter_root: Path
    adapters: dict[str, Path]


def _peft_adapter(base: torch.nn.Module, seed: int, out: Path, **kwargs: object) -> None:
    from peft import LoKrConfig, get_peft_model

    torch.manual_seed(seed)
    options: dict[str, object] = {"r": 4, "alpha": 2, **kwargs}
    config = LoKrConfig(target_modules=TARGETS, init_weights=False, **options)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    peft_model.save_pretrained(out)


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("world")
    model_dir = root / "tiny-llama"
    tokenizer = build_word_tokenizer(WORDS, model_dir)
    model = build_tiny_llama(len(tokenizer), hidden_size=64, layers=2, heads=4, seed=0, max_position_embeddings=128)
    model.save_pretrained(model_dir)
    adapter_root = root / "adapters"
    adapters = {}
    for i, (name, extra) in enumerate([("alpha", {}), ("beta", {"decompose_both": True, "r": 2}), ("gamma", {})]):
        adapters[name] = adapter_root / name
        _peft_adapter(model, 100 + i, adapters[name], **extra)
    return World(root, model_dir, adapter_root, adapters)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def start_server(world: World, *extra: str, env: dict[str, str] | None = None) -> Server:
    port = free_port()
    log = world.root / f"server-{port}.log"
    cmd = [
        sys.executable, "-m", "service.cli", "serve", "--model", str(world.model_dir), "--served-model-name", "tiny",
        "--host", "127.0.0.1", "--port", str(port), "--adapter-root", str(world.adapter_root),
        "--admin-token", ADMIN_TOKEN, *extra,
    ]  # fmt: skip
    process = subprocess.Popen(
        cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=Path.cwd()
    )
    url = f"http://127.0.0.1:{port}"
    while True:  # no deadline of our own: a shared box may be slow; pytest-timeout guards against a hang
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return Server(url, process, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def stop_server(server: Server) -> int:
    server.process.terminate()
    try:
        return server.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.process.kill()
        return -9


@pytest.fixture(scope="session")
def server(world: World) -> Iterator[Server]:
    srv = start_server(world)
    try:
        yield srv
    finally:
        stop_server(srv)


@pytest.fixture(scope="session")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def ensure_loaded(client: httpx.Client, name: str) -> None:
    """Load `name` (a dir under the adapter root) unless it is already loaded."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    if client.get(f"/v1/adapters/{name}", headers=headers).status_code == 200:
        return
    response = client.post("/v1/adapters", json={"name": name, "source": name}, headers=headers)
    assert response.status_code in (201, 409), response.text


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD pipeline dir (one per test module)."""
    from .images_world import pipeline_dir

    return pipeline_dir(tmp_path_factory.mktemp("images"), "sd")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL pipeline dir (one per test module)."""
    from .images_world import pipeline_dir

    return pipeline_dir(tmp_path_factory.mktemp("images-xl"), "sdxl")
