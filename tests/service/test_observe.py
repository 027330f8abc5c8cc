"""The per-request middleware (service/observe.py): ids, the body limit, request metrics and the access log,
and that nothing per request or per streamed chunk goes through an extra task or the thread pool."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Iterator
from typing import get_args

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from starlette.middleware.base import BaseHTTPMiddleware

from service.app import create_app
from service.routes.deps import AdminAuth, ApiAuth, Deps
from service.settings import Settings


def _app() -> FastAPI:
    """The real app without a model (no lifespan), plus two probe routes: a stream and a crash."""
    app = create_app(Settings(model="unused", served_model_name="tiny", max_body_bytes=1024, max_upload_bytes=4096))

    @app.get("/probe/stream")
    async def stream() -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            for i in range(3):
                await asyncio.sleep(0)
                yield f"data: {i}\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    @app.put("/probe/form")
    async def form(request: Request) -> dict[str, int]:
        return {"fields": len(await request.form())}

    @app.get("/probe/crash")
    async def crash() -> None:
        raise RuntimeError("boom")

    return app


def _sample(app: FastAPI, name: str, labels: dict[str, str]) -> float | None:
    return app.state.components.metrics.registry.get_sample_value(name, labels)


def test_request_id_echoed_or_made_and_replica_stamped(caplog: pytest.LogCaptureFixture) -> None:
    app = _app()
    client = TestClient(app)
    with caplog.at_level(logging.INFO, logger="lokr_serve"):
        given = client.get("/health", headers={"x-request-id": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    assert given.headers["x-lokr-replica"] == app.state.components.replica
    made = client.get("/health").headers["x-request-id"]
    assert len(made) == 16 and made != "abc-123"
    assert client.get("/health", headers={"x-request-id": "x" * 100}).headers["x-request-id"] == "x" * 64
    lines = [r for r in caplog.records if r.getMessage().startswith("GET /health -> 200 in ")]
    assert [getattr(r, "request_id", None) for r in lines] == ["abc-123"]


def test_a_declared_body_over_the_limit_is_413_without_reading_it() -> None:
    app = _app()
    response = TestClient(app).post(
        "/v1/completions", content=b"{" + b" " * 2048 + b"}", headers={"content-type": "application/json"}
    )
    assert response.status_code == 413 and response.json()["error"]["type"] == "invalid_request_error"
    assert "1024-byte limit" in response.json()["error"]["message"]
    assert response.headers["x-request-id"] and response.headers["x-lokr-replica"]
    assert _sample(app, "lokr_requests_total", {"route": "unmatched", "adapter": "", "status": "413"}) == 1


def _chunks(total: int) -> Iterator[bytes]:
    """A body sent chunked (no Content-Length): 256-byte pieces."""
    yield b'{"model": "tiny", "prompt": "'
    for _ in range(total // 256):
        yield b"x" * 256
    yield b'"}'


@pytest.mark.parametrize(("method", "path", "limit"), [("POST", "/v1/completions", 1024), ("PUT", "/probe/form", 4096)])
def test_a_chunked_body_over_the_limit_is_413_once_it_passes_it(method: str, path: str, limit: int) -> None:
    """No declared length to refuse up front: reading stops at the limit, and the answer is the same 413."""
    app = _app()
    content_type = "application/json" if method == "POST" else "multipart/form-data; boundary=b"
    response = TestClient(app).request(method, path, content=_chunks(100_000), headers={"content-type": content_type})
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "payload_too_large" and f"{limit}-byte limit" in response.text
    assert response.headers["x-request-id"]
    assert TestClient(app).post("/v1/completions", content=_chunks(100)).status_code != 413  # under it: read


def test_a_stream_is_counted_once_when_it_ends() -> None:
    app = _app()
    response = TestClient(app).get("/probe/stream")
    assert response.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert response.headers["x-request-id"]
    assert _sample(app, "lokr_requests_total", {"route": "/probe/stream", "adapter": "", "status": "200"}) == 1
    assert _sample(app, "lokr_request_latency_seconds_count", {"route": "/probe/stream"}) == 1


def test_an_unhandled_error_is_counted_as_a_500() -> None:
    app = _app()
    response = TestClient(app, raise_server_exceptions=False).get("/probe/crash")
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    assert _sample(app, "lokr_requests_total", {"route": "/probe/crash", "adapter": "", "status": "500"}) == 1


def test_no_thread_pool_or_relay_task_per_request() -> None:
    """A `def` dependency runs in the thread pool (two thread hops per request) and `BaseHTTPMiddleware`
    relays every body chunk through a memory stream and a task of its own."""
    app = _app()
    assert not [m for m in app.user_middleware if issubclass(m.cls, BaseHTTPMiddleware)]  # type: ignore[arg-type]
    dependencies = [ApiAuth.dependency, AdminAuth.dependency, *(d.dependency for d in get_args(Deps)[1:])]
    assert len(dependencies) == 3
    assert all(inspect.iscoroutinefunction(d) for d in dependencies)


def test_an_ingress_exports_request_series_and_no_engine_gauges() -> None:
    """The Ray ingress runs no engine: its scrape must not say `lokr_adapters_registered 0` beside replicas
    that hold adapters."""
    from service.metrics import Metrics

    text = Metrics(engine=False).render().decode()
    assert "lokr_requests_total" in text and "process_resident_memory_bytes" in text
    assert "lokr_adapters_registered" not in text and "lokr_batch_size" not in text
    assert "lokr_adapters_registered" in Metrics().render().decode()
