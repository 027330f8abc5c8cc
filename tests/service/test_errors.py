"""Bad requests get a 4xx in the one JSON error shape, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

from .conftest import ensure_loaded

pytestmark = pytest.mark.e2e


def _status_and_shape(response: httpx.Response) -> int:
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["type"], str) and isinstance(body["error"]["code"], str)
    return response.status_code


BAD_COMPLETIONS = [
    ({"model": "nope", "prompt": "the sea"}, 404),
    ({"model": "tiny", "prompt": "the sea", "adapters": [{"name": "nope"}]}, 404),
    ({"model": "alpha", "prompt": "the sea", "adapters": [{"name": "alpha"}]}, 400),
    ({"model": "tiny", "prompt": "the sea", "max_tokens": -1}, 400),
    ({"model": "tiny", "prompt": "the sea", "max_tokens": 100000}, 400),
    ({"model": "tiny", "prompt": "the sea", "temperature": -0.5}, 400),
    ({"model": "tiny", "prompt": "the sea", "top_p": 0}, 400),
    ({"model": "tiny", "prompt": "the sea", "top_p": 1.5}, 400),
    ({"model": "tiny", "prompt": "the sea", "logprobs": 1000}, 400),
    ({"model": "tiny", "prompt": "the sea", "n": 0}, 400),
    ({"model": "tiny", "prompt": "sea " * 500, "max_tokens": 4}, 400),
    ({"model": "tiny", "prompt": 12}, 400),
    ({"model": "tiny", "prompt": [999999]}, 400),
    ({"model": "tiny", "prompt": "x", "adapters": [{"name": "alpha", "scale": "NaN"}]}, 400),
    ({"model": "tiny", "prompt": "x", "adapters": "alpha"}, 400),
    ({"prompt": "the sea"}, 400),
    ({"model": "", "prompt": "the sea"}, 400),
]


@pytest.mark.parametrize(("body", "status"), BAD_COMPLETIONS)
def test_bad_completion_requests(client: httpx.Client, body: dict[str, object], status: int) -> None:
    ensure_loaded(client, "alpha")
    assert _status_and_shape(client.post("/v1/completions", json=body)) == status


def test_malformed_json_and_unknown_routes(client: httpx.Client) -> None:
    response = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert _status_and_shape(response) == 400
    assert response.json()["error"]["message"].startswith("the request body is not valid JSON (")
    assert _status_and_shape(client.get("/v1/nothing-here")) == 404
    assert _status_and_shape(client.post("/v1/chat/completions", json={"model": "tiny", "messages": []})) == 400


def test_oversized_body_is_413(client: httpx.Client) -> None:
    response = client.post("/v1/completions", content=b"x" * (5 << 20), headers={"content-type": "application/json"})
    assert _status_and_shape(response) == 413


def test_still_serving_after_bad_input(client: httpx.Client) -> None:
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": "the sea", "max_tokens": 2})
    assert response.status_code == 200
    assert client.get("/ready").status_code == 200
    assert client.get("/health").json() == {"status": "ok"}


def test_metrics_exposed(client: httpx.Client) -> None:
    text = client.get("/metrics").text
    for series in ("lokr_requests_total", "lokr_request_latency_seconds", "lokr_batch_size", "lokr_queue_depth",
                   "lokr_adapters_resident", "lokr_adapter_loads_total", "lokr_tokens_total",
                   'lokr_engine_seconds_total{work="step"}'):  # fmt: skip
        assert series in text
