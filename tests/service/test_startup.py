"""Start-up: bad settings fail in one line with exit 2 (before heavy imports where possible), the port is bound
before the model loads, the listen address and the admin protection are logged, and the demo prints its
examples once it serves (issue 10 items 7 and 11)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.demo import DemoAssets

from .conftest import World, free_port

# Runs the CLI in a fresh interpreter and reports whether torch got imported: checks that must be fast
# happen before the heavy imports (no timing is measured).
_PROBE = """
import sys
from service.cli import main
code = main(sys.argv[1:])
print("torch imported:", "torch" in sys.modules)
sys.exit(code)
"""


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True)


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lokr-serve: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield int(sock.getsockname()[1])


def test_missing_model_dir_is_one_line_before_heavy_imports(tmp_path: Path) -> None:
    proc = _cli("serve", "--model", str(tmp_path / "no-such-model"))
    assert "directory does not exist" in _one_error_line(proc)
    assert "torch imported: False" in proc.stdout


def test_missing_adapter_is_one_line_before_heavy_imports(world: World, tmp_path: Path) -> None:
    proc = _cli("serve", "--model", str(world.model_dir), "--adapter", f"x={tmp_path / 'nope'}")
    line = _one_error_line(proc)
    assert "--adapter x=" in line and "does not exist" in line
    assert "torch imported: False" in proc.stdout


def test_port_in_use_is_reported_before_the_model_loads(tmp_path: Path, busy_port: int) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"not weights")  # loading it would fail with another error
    proc = _cli("serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(busy_port))
    assert f"127.0.0.1:{busy_port}: the port is already in use" in _one_error_line(proc)
    assert "torch imported: False" in proc.stdout


@pytest.mark.slow
def test_bad_adapter_file_at_start_up_is_one_line(world: World, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    proc = _cli("serve", "--model", str(world.model_dir), "--port", "0", "--adapter", f"bad={bad}")
    assert "not a valid safetensors file" in _one_error_line(proc)


def test_an_adapter_that_is_not_lokr_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"not weights")  # loading it would fail with another error
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (lora / "adapter_model.safetensors").write_bytes(b"unread")
    proc = _cli("serve", "--model", str(model), "--port", "0", "--adapter", f"l={lora}")
    line = _one_error_line(proc)
    assert line.startswith(f"lokr-serve: error: --adapter l={lora}: ") and "'LORA' adapter config" in line, line


def test_an_adapter_name_given_twice_is_refused_before_the_model_loads(world: World) -> None:
    source = str(world.adapters["alpha"])
    proc = _cli(
        "serve", "--model", str(world.model_dir), "--port", "0", "--adapter", f"a={source}", "--adapter", f"a={source}"
    )
    assert _one_error_line(proc) == "lokr-serve: error: --adapter: each name may be given once; given more than once: a"


def test_device_cuda_without_a_gpu_is_one_line(world: World) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = _cli("serve", "--model", str(world.model_dir), "--port", "0", "--device", "cuda")
    assert "no CUDA device is available" in _one_error_line(proc)


def test_demo_rejects_model_flags() -> None:
    for flag in ("--model", "--adapter", "--served-model-name", "--adapter-root"):
        proc = _cli("demo", flag, "x")
        assert proc.returncode == 2 and f"unrecognized arguments: {flag}" in proc.stderr


@pytest.mark.e2e
@pytest.mark.slow
def test_demo_logs_address_and_admin_protection_and_prints_examples_once_ready(demo_assets: DemoAssets) -> None:
    port = free_port()
    env = {**os.environ, "LOKR_SERVE_CACHE": str(demo_assets.model_dir.parents[1])}
    cmd = [sys.executable, "-m", "service.cli", "demo", "--port", str(port), "--api-key", "k1"]
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    seen: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:  # until the first example appears (or the server exits)
            seen.append(line)
            if line.startswith("curl -s"):
                assert httpx.get(f"{url}/ready", timeout=30).status_code == 200, "examples printed before ready"
                break
        else:
            pytest.fail("the demo exited before printing examples:\n" + "".join(seen[-40:]))
        text = "".join(seen)
        assert "<unk>" in text and "adapter root:" in text  # the banner
        assert f"listening on http://127.0.0.1:{port}" in text
        assert "admin API: disabled (--api-key is set without --admin-token)" in text
        admin = httpx.get(f"{url}/v1/adapters", headers={"Authorization": "Bearer k1"}, timeout=30)
        assert admin.status_code == 403
        error = admin.json()["error"]
        assert error["code"] == "admin_disabled" and "--admin-token" in error["message"]
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401  # inference needs the key
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer k1"}, timeout=30).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=120)
    assert process.returncode == 0
