"""Schemathesis against the running server's own OpenAPI schema: no 5xx, responses conform to the schema.

A dedicated server (so generated loads / unloads never disturb the session server), bounded examples per
operation, loopback only. Destructive operations (DELETE, unload) are pointed at names that are never loaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from service.settings import Settings

from .conftest import ADMIN_TOKEN, World, start_server, stop_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MAX_EXAMPLES = 25
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    response_schema_conformance,
    content_type_conformance,
    response_headers_conformance,
]


@pytest.fixture(scope="module")
def fuzz_server(world: World) -> Iterator[Any]:
    srv = start_server(world, "--adapter", f"alpha={world.adapters['alpha']}", "--max-queue", "64")
    try:
        yield srv
    finally:
        stop_server(srv)


@pytest.fixture(scope="module")
def api_schema(fuzz_server: Any) -> Any:
    assert fuzz_server.url.startswith("http://127.0.0.1:")
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


def _operations() -> list[tuple[str, str]]:
    """Every (METHOD, path) the app documents; the test then fuzzes the live server's copy of that schema."""
    app = create_app(Settings(model="unused", served_model_name="tiny"))
    return [(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops]


def _make_harmless(case: Any) -> None:
    """Never unload the preloaded adapter: destructive operations target names nobody loaded."""
    path, method = case.operation.path, case.method.upper()
    if method == "DELETE" and path == "/v1/adapters/{name}":
        case.path_parameters = {"name": "fuzz-never-loaded"}
    if path == "/v1/unload_lora_adapter" and isinstance(case.body, dict):
        case.body["lora_name"] = "fuzz-never-loaded"
    # Generated `max_tokens` / `n` can be large: keep each case to a short generation on a 2-core box.
    if isinstance(case.body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(key), int) and not isinstance(case.body[key], bool):
                case.body[key] = min(case.body[key], 4)
        if "messages" in case.body and case.body.get("max_tokens") is None and "max_completion_tokens" not in case.body:
            case.body["max_tokens"] = 4  # chat's default is "the rest of the context"
        if isinstance(case.body.get("n"), int) and not isinstance(case.body["n"], bool):
            case.body["n"] = min(case.body["n"], 2)


@pytest.mark.parametrize(("method", "path"), _operations())
def test_api_never_5xx_and_conforms(method: str, path: str, fuzz_server: Any, api_schema: Any) -> None:
    operation = api_schema[path][method]
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))
    # Random `model` strings are nearly always a 404; often name a real model so generation itself is fuzzed.
    strategy = st.tuples(cases, st.sampled_from([None, "tiny", "alpha"]))
    seen: list[int] = []

    @given(drawn=strategy)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure's first example is reported as is
    )
    def fuzz(drawn: tuple[Any, str | None]) -> None:
        case, model = drawn
        if model is not None and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model
        _make_harmless(case)
        response = case.call_and_validate(base_url=fuzz_server.url, headers=AUTH, checks=CHECKS, timeout=60)
        seen.append(response.status_code)
        assert response.status_code < 500, (case.body, response.text)
        if response.status_code >= 400:
            body = response.json()
            assert set(body) == {"error"} and {"message", "type", "code"} == set(body["error"]), body

    fuzz()
    assert seen, "no case was generated"


def test_server_still_serves_after_fuzzing(fuzz_server: Any) -> None:
    with httpx.Client(base_url=fuzz_server.url, timeout=60) as c:
        assert c.get("/ready").status_code == 200
        ok = c.post("/v1/completions", json={"model": "alpha", "prompt": "the sea", "max_tokens": 2})
        assert ok.status_code == 200, ok.text
        assert "alpha" in {m["id"] for m in c.get("/v1/models").json()["data"]}
