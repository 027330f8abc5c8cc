"""A client that goes away mid-stream cancels its row: it stops generating and releases its adapter."""

from __future__ import annotations

import time

import httpx
import pytest

from .conftest import ADMIN_TOKEN, ensure_loaded

pytestmark = pytest.mark.e2e
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _generated_tokens(client: httpx.Client, adapter: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'lokr_tokens_total{{adapter="{adapter}",kind="generated"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_disconnect_cancels_the_row(server, client: httpx.Client) -> None:  # type: ignore[no-untyped-def]
    ensure_loaded(client, "beta")
    before = _generated_tokens(client, "beta")
    body = {"model": "beta", "prompt": "the sea is", "max_tokens": 100, "temperature": 0, "stream": True}
    with (
        httpx.Client(base_url=server.url, timeout=60) as streaming,
        streaming.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        assert next(response.iter_lines()).startswith("data: ")  # one chunk arrived, then the client hangs up
    deadline = time.monotonic() + 30
    while client.get("/v1/adapters/beta", headers=AUTH).json()["in_use"] != 0:
        assert time.monotonic() < deadline, "the cancelled row still holds its adapter"
        time.sleep(0.05)
    time.sleep(0.2)
    generated = _generated_tokens(client, "beta") - before
    assert 0 < generated < 50, f"the row kept generating after the client left ({generated} tokens)"
