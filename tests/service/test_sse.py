"""The SSE path's writes: events that arrive together (one engine step) leave in one socket write, the last
chunk, the usage chunk and `[DONE]` in the same write; the text stays OpenAI's `data: {json}` format."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

import torch
from fastapi import FastAPI

from service.app import create_app
from service.backend import LoadedModel
from service.demo import build_tiny_llama, build_word_tokenizer
from service.errors import BadRequestError
from service.inference import _Inbox
from service.jobs import ErrorEvent, Event, FinishEvent, SamplingParams, TokenEvent
from service.routes.openai import _completion_chunker, _sse, _SseWriter
from service.settings import Settings

from .conftest import WORDS

META = {"id": "cmpl-x", "created": 1, "model": "tiny"}


async def _batches(*batches: list[tuple[int, Event]]) -> AsyncGenerator[list[tuple[int, Event]], None]:
    for batch in batches:
        yield batch


def _writes(batches: AsyncGenerator[list[tuple[int, Event]], None], choices: int, usage: bool) -> list[str]:
    writer = _SseWriter(_completion_chunker(META, SamplingParams(4)), "text_completion", META, choices, 1, usage)

    async def collect() -> list[str]:
        response = _sse(batches, writer, lambda: None)
        return [part async for part in response.body_iterator]  # type: ignore[misc]

    return asyncio.run(collect())


def _chunk(index: int, text: str, finish: str | None, usage: bool) -> str:
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
    chunk: dict[str, Any] = {"object": "text_completion", **META, "choices": [choice]}
    if usage:
        chunk["usage"] = None
    return f"data: {json.dumps(chunk)}\n\n"


def test_one_write_per_batch_and_the_end_rides_with_the_last() -> None:
    step1 = [(0, TokenEvent(" a", [])), (1, TokenEvent(" b", []))]
    step2 = [(0, FinishEvent("length", 3, 2, " c")), (1, FinishEvent("length", 3, 2))]
    writes = _writes(_batches(step1, step2), choices=2, usage=True)
    assert writes[0] == _chunk(0, " a", None, True) + _chunk(1, " b", None, True)
    usage = {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10}
    end = {"object": "text_completion", **META, "choices": [], "usage": usage}
    last = _chunk(0, " c", "length", True) + _chunk(1, "", "length", True)
    assert writes[1:] == [last + f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n"]


def test_an_error_ends_the_stream_after_what_came_before_it() -> None:
    error = BadRequestError("no such thing", code="nope")
    batch = [(0, TokenEvent(" a", [])), (1, ErrorEvent(error)), (0, TokenEvent(" never", []))]
    writes = _writes(_batches(batch), choices=2, usage=True)
    body = {"error": {"message": "no such thing", "type": "invalid_request_error", "code": "nope"}}
    assert writes == [_chunk(0, " a", None, True) + f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n"]


def test_inbox_hands_over_everything_that_arrived_together() -> None:
    async def scenario() -> list[list[tuple[int, Event]]]:
        inbox = _Inbox(2)
        taken = []
        reader = asyncio.ensure_future(inbox.take())
        await asyncio.sleep(0)
        inbox.put(0, TokenEvent(" a", []))
        inbox.put(1, TokenEvent(" b", []))
        taken.append(await reader)
        inbox.put(0, FinishEvent("stop", 1, 1))
        inbox.put(1, ErrorEvent(RuntimeError("x")))
        assert not inbox.finished  # finished only once the reader has taken the last events
        taken.append(await inbox.take())
        assert inbox.finished
        return taken

    taken = asyncio.run(scenario())
    assert [[i for i, _ in batch] for batch in taken] == [[0, 1], [0, 1]]


def _app() -> FastAPI:
    tokenizer = build_word_tokenizer(WORDS)
    model = build_tiny_llama(len(tokenizer), seed=1, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id].zero_()  # no early stop: every choice runs max_tokens
    loaded = LoadedModel(model, tokenizer, torch.device("cpu"), torch.float32, 128)
    return create_app(Settings(model="unused", served_model_name="tiny"), loaded=loaded)


async def _body_messages(app: FastAPI, body: dict[str, Any]) -> list[bytes]:
    """The `http.response.body` payloads the app sends for one POST /v1/completions."""
    raw = json.dumps(body).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
        "query_string": b"", "root_path": "", "server": ("test", 80), "client": ("test", 1),
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
    }  # fmt: skip
    sent: list[bytes] = []
    request_sent = False
    finished = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            if message.get("body"):
                sent.append(message["body"])
            if not message.get("more_body"):
                finished.set()

    await app(scope, receive, send)
    return sent


def test_a_served_stream_ends_in_one_write() -> None:
    """Through the real app and engine: the finish chunk, the usage chunk and `[DONE]` share the last write
    (before: three writes), and the events concatenate to the same text as the non-streamed answer."""
    app = _app()
    body = {"model": "tiny", "prompt": "the sea is", "max_tokens": 5, "temperature": 0}

    async def scenario() -> tuple[list[bytes], list[bytes]]:
        async with app.router.lifespan_context(app):
            streamed = await _body_messages(app, {**body, "stream": True, "stream_options": {"include_usage": True}})
            plain = await _body_messages(app, body)
        return streamed, plain

    streamed, plain = asyncio.run(scenario())
    events = [e for part in streamed for e in part.decode().split("\n\n") if e]
    assert all(part.endswith(b"\n\n") for part in streamed)
    assert len(events) == 5 + 1 + 1 + 1  # tokens, finish, usage, [DONE]
    last = streamed[-1].decode()
    assert last.endswith("data: [DONE]\n\n") and '"finish_reason": "length"' in last and '"total_tokens"' in last
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == json.loads(b"".join(plain))["choices"][0]["text"]
