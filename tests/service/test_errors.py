"""Bad requests get a 4xx in the one JSON error shape, and the server keeps serving."""

from __future__ import annotations

import json

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
    ({"model": "tiny", "prompt": "the sea", "stop": [f"s{i}" for i in range(17)]}, 400),
]


@pytest.mark.parametrize(("body", "status"), BAD_COMPLETIONS)
def test_bad_completion_requests(client: httpx.Client, body: dict[str, object], status: int) -> None:
    ensure_loaded(client, "alpha")
    assert _status_and_shape(client.post("/v1/completions", json=body)) == status


def test_every_stop_string_counts_and_an_empty_prompt_is_invalid(client: httpx.Client) -> None:
    body = {"model": "tiny", "prompt": "the sea", "max_tokens": 6, "temperature": 0}
    text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    word = text.split()[1]  # the second generated word: a stop string cuts the text before it
    stops = [f"zz{i}" for i in range(15)] + [word]
    cut = client.post("/v1/completions", json={**body, "stop": stops}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and word not in cut["text"] and text.startswith(cut["text"])
    empty = client.post("/v1/completions", json={**body, "prompt": []})
    assert _status_and_shape(empty) == 400 and empty.json()["error"]["code"] == "invalid_prompt"


def _minimal(route: str) -> dict[str, object]:
    """The smallest valid body of a completions or chat route."""
    if route == "/v1/completions":
        return {"model": "tiny", "prompt": "the sea"}
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("route", "field", "value"),
    [("/v1/completions", "logit_bias", {"5": 100}), ("/v1/completions", "presence_penalty", 1.5),
     ("/v1/completions", "frequency_penalty", 2), ("/v1/completions", "best_of", 3), ("/v1/completions", "suffix", "x"),
     ("/v1/completions", "ignore_eos", True), ("/v1/completions", "min_tokens", 5), ("/v1/completions", "top_k", 1),
     ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
     ("/v1/chat/completions", "response_format", {"type": "json_object"})],
)  # fmt: skip
def test_sampling_fields_the_server_lacks_are_refused_not_ignored(
    client: httpx.Client, route: str, field: str, value: object
) -> None:
    response = client.post(route, json={**_minimal(route), "max_tokens": 2, field: value})
    assert _status_and_shape(response) == 400
    assert (
        response.json()["error"]["message"]
        == f"body: `{field}` is not supported by this server (got {value!r}); leave it out"
    )


def test_sampling_fields_at_neutral_values_are_taken(client: httpx.Client) -> None:
    """Clients send some of them at their defaults: those change nothing and pass."""
    neutral = {"logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0.0, "best_of": 1, "top_k": -1}
    body = {"model": "tiny", "prompt": "the sea", "max_tokens": 2, "temperature": 0}
    assert (
        client.post("/v1/completions", json={**body, **neutral}).json()["choices"]
        == (client.post("/v1/completions", json=body).json()["choices"])
    )


def test_malformed_json_and_unknown_routes(client: httpx.Client) -> None:
    response = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert _status_and_shape(response) == 400
    assert response.json()["error"]["message"].startswith("the request body is not valid JSON (")
    assert _status_and_shape(client.get("/v1/nothing-here")) == 404
    assert _status_and_shape(client.post("/v1/chat/completions", json={"model": "tiny", "messages": []})) == 400


def test_a_body_that_is_not_utf8_is_400_saying_so(client: httpx.Client) -> None:
    body = b'{"model": "tiny", "prompt": "caf\xe9", "max_tokens": 2}'  # Latin-1, not UTF-8
    response = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert _status_and_shape(response) == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_encoding"
    assert error["message"].startswith(f"the request body is not UTF-8 (byte 0xe9 at offset {body.index(0xE9)})")


LONE = "the \ud800 sea"  # JSON's "\ud800" escape decodes to a lone surrogate: not encodable text
LONE_SURROGATES = [
    ("/v1/completions", {"prompt": LONE}, "prompt"),
    ("/v1/completions", {"prompt": ["the sea", LONE]}, "prompt[1]"),
    ("/v1/completions", {"prompt": "the sea", "stop": ["x", LONE]}, "stop[1]"),
    ("/v1/completions", {"prompt": "the sea", "model": LONE}, "model"),
    ("/v1/completions", {"prompt": "the sea", "adapters": [{"name": LONE}]}, "adapters[0].name"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONE}]}, "messages[0].content"),
    (
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "user", "content": [{"type": "text", "text": LONE}]},
            ]
        },
        "messages[1].content[0].text",
    ),
]


@pytest.mark.parametrize(("route", "fields", "where"), LONE_SURROGATES)
def test_lone_surrogates_are_400_naming_the_field(
    client: httpx.Client, route: str, fields: dict[str, object], where: str
) -> None:
    """Before: the tokenizer raised (500) and the keep-alive connection broke for the next request."""
    body = json.dumps({"model": "tiny", "max_tokens": 2, **fields})  # ASCII: the surrogate as a \\ud800 escape
    response = client.post(route, content=body, headers={"content-type": "application/json"})
    assert _status_and_shape(response) == 400
    assert response.json()["error"]["message"].startswith(f"body: `{where}` holds a lone UTF-16 surrogate")
    again = client.post("/v1/completions", json={"model": "tiny", "prompt": "the sea", "max_tokens": 1})
    assert again.status_code == 200  # the same connection


@pytest.mark.parametrize(
    ("part", "got"),
    [({"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}, "has type 'image_url'"),
     ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, "has type 'input_audio'"),
     ({"type": "text"}, "is a text part without a string `text`")],
)  # fmt: skip
def test_chat_parts_other_than_text_are_refused_not_dropped(
    client: httpx.Client, part: dict[str, object], got: str
) -> None:
    content = [{"type": "text", "text": "what is in this picture?"}, part]
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": content}]}
    response = client.post("/v1/chat/completions", json=body)
    assert _status_and_shape(response) == 400
    assert response.json()["error"]["message"].startswith(f"messages.0.content: part 1 {got}")


@pytest.mark.parametrize(
    ("route", "fields", "message"),
    [("/v1/completions", {"n": 17}, "n must be <= 16 on this server (LOKR_MAX_N), got 17"),
     ("/v1/completions", {"n": 200}, "n must be <= 16 on this server (LOKR_MAX_N), got 200"),
     ("/v1/chat/completions", {"n": 17}, "n must be <= 16 on this server (LOKR_MAX_N), got 17"),
     ("/v1/completions", {"prompt": ["the sea"] * 64, "n": 16},
      "this request asks for 1024 choices (64 prompts x n=16), more than the 256 the server queues at once"),
     ("/v1/completions", {"max_tokens": "5"}, "max_tokens: Input should be a valid integer"),
     ("/v1/completions", {"max_tokens": True}, "max_tokens: Input should be a valid integer"),
     ("/v1/chat/completions", {"n": 2.0}, "n: Input should be a valid integer"),
     ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs needs `logprobs: true`")],
)  # fmt: skip
def test_limits_and_types_say_which_and_why(
    client: httpx.Client, route: str, fields: dict[str, object], message: str
) -> None:
    """One message per limit (before: "n must be <= 16" or pydantic's "<= 128" by size, chat without limit; 64 x
    16 choices a 503 that no retry could pass), and no number sent as text or bool taken as one."""
    response = client.post(route, json={**_minimal(route), "max_tokens": 1, **fields})
    assert _status_and_shape(response) == 400
    assert response.json()["error"]["message"].startswith(message), response.json()


def test_without_max_tokens_a_long_prompt_gets_what_the_context_leaves(client: httpx.Client) -> None:
    """The default of 16 is cut to the context (128 tokens here) instead of a context-length error."""
    body = {"model": "tiny", "temperature": 0}
    answer = client.post("/v1/completions", json={**body, "prompt": [5] * 127})
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"] == {"prompt_tokens": 127, "completion_tokens": 1, "total_tokens": 128}
    too_long = client.post("/v1/completions", json={**body, "prompt": [5] * 128})
    assert _status_and_shape(too_long) == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    short = client.post("/v1/completions", json={**body, "prompt": [5] * 10}).json()
    assert short["usage"]["completion_tokens"] == 16 or short["choices"][0]["finish_reason"] == "stop"


def test_models_can_be_retrieved_one_by_one(client: httpx.Client) -> None:
    ensure_loaded(client, "alpha")
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert client.get("/v1/models/alpha").json() == listed["alpha"]
    assert client.get("/v1/models/tiny").json() == listed["tiny"] == client.get("/v1/models").json()["data"][0]
    missing = client.get("/v1/models/nope")
    assert _status_and_shape(missing) == 404 and missing.json()["error"]["code"] == "model_not_found"


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


def test_an_unknown_composed_adapter_lists_the_loaded_ones(client: httpx.Client) -> None:
    ensure_loaded(client, "alpha")
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "adapters": [{"name": "nope"}]})
    assert response.status_code == 404
    message = response.json()["error"]["message"]
    assert message.startswith("adapter(s) ['nope'] not loaded; loaded: [") and "'alpha'" in message


def test_compositions_share_one_metrics_label(client: httpx.Client) -> None:
    """A label per mix of adapters would grow without bound; compositions count under one value."""
    for name in ("alpha", "beta"):
        ensure_loaded(client, name)
    body = {"model": "tiny", "prompt": "the sea", "max_tokens": 1}
    mix = [{"name": "alpha", "scale": 0.5}, {"name": "beta", "scale": 1.0}]
    assert client.post("/v1/completions", json={**body, "adapters": mix}).status_code == 200
    metrics = client.get("/metrics").text
    assert 'adapter="(composition)"' in metrics and "alpha+beta" not in metrics
