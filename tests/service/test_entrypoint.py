"""The Docker image's entry command and HEALTHCHECK, run outside Docker (no engine on CI) through
scripts/run_image_entry.py, which applies the Dockerfile's ENV and runs its CMD."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.demo import DemoAssets

from .conftest import free_port
from .test_dockerfile import ENTRY

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def test_dockerfile_entry_command_serves_the_demo(tmp_path: Path, demo_assets: DemoAssets) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER\s+(?!root)\w+", dockerfile, re.M), "the image must run as a non-root user"
    assert re.search(r"^EXPOSE\s+8000", dockerfile, re.M)
    assert "make install" in dockerfile, "the image installs the same way as the README"
    health = next(ENTRY.json_array(args) for name, args in ENTRY.final_stage(dockerfile) if name == "HEALTHCHECK")
    command = [sys.executable, str(ROOT / "scripts" / "run_image_entry.py")]  # the image's ENV + CMD
    port = free_port()
    env = {
        **os.environ,
        "LOKR_HOST": "127.0.0.1",
        "LOKR_PORT": str(port),
        "LOKR_SERVE_CACHE": str(demo_assets.model_dir.parents[1]),  # the session's demo build, reused
    }
    env.pop("LOKR_MODEL", None)
    log = (tmp_path / "server.log").open("wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        while True:  # no deadline of our own (a busy box may be slow); pytest-timeout guards against a hang
            assert process.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            probe = subprocess.run([health[0].replace("python3", sys.executable), *health[1:]], env=env, check=False)
            if probe.returncode == 0:
                break
            time.sleep(1)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()
        names = [m["id"] for m in models["data"]]
        assert len(names) >= 3, names
        body = {"model": names[1], "prompt": "the garden", "max_tokens": 8, "temperature": 0}
        response = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200 and response.json()["choices"][0]["text"]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
