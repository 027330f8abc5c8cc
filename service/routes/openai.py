"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (with SSE streaming)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..errors import BadRequestError, http_error_for
from ..inference import ChoiceResult, Inference
from ..jobs import ErrorEvent, Event, FinishEvent, PromptEvent, SamplingParams, TokenEvent, TokenInfo
from ..schemas import ChatRequest, CompletionRequest
from .deps import ApiAuth, Components, Deps

router = APIRouter(dependencies=[ApiAuth], tags=["openai"])
# With `"stream": true` the 200 is server-sent events instead of one JSON object.
_STREAMABLE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {}, "text/event-stream": {}}, "description": "JSON, or SSE when streaming"}
}


def _inference(c: Components) -> Inference:
    return c.running()[1]


@router.get("/v1/models")
async def list_models(c: Deps) -> dict[str, Any]:
    """The base model under its served name, and every loaded adapter (parent = base), with the model's kind."""
    created = int(time.time())
    base = c.settings.base_name
    kind = c.engine.backend.kind if c.engine is not None else None
    data = [
        {"id": base, "object": "model", "created": created, "owned_by": "lokr-serve", "root": base, "parent": None,
         "kind": kind}
    ]  # fmt: skip
    if c.registry is not None:
        for record in c.registry.records():
            data.append(
                {
                    "id": record.name,
                    "object": "model",
                    "created": int(record.loaded_at),
                    "owned_by": "lokr-serve",
                    "root": record.source,
                    "parent": base,
                    "kind": kind,
                }
            )
    return {"object": "list", "data": data}


# ------------------------------------------------------------------------------------------ completions
@router.post("/v1/completions", response_model=None, responses=_STREAMABLE)
async def completions(body: CompletionRequest, c: Deps, request: Request) -> dict[str, Any] | StreamingResponse:
    inf = _inference(c)
    sel = inf.select(body.model, body.adapters)
    request.scope["lokr_adapter"] = sel.label
    prompts = _prompts(inf, body.prompt)
    k = _logprobs_k(body.logprobs, c.settings.max_logprobs)
    if body.n > c.settings.max_n:
        raise BadRequestError(f"n must be <= {c.settings.max_n}", code="invalid_n")
    params = SamplingParams(
        max_tokens=body.max_tokens if body.max_tokens is not None else 16,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_list(),
        logprobs=k,
        echo=body.echo,
    )
    for ids in prompts:
        inf.lm.check_fits(len(ids), params)
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
    if body.stream:
        return _sse(_completion_chunks(inf.stream(prompts, body.n, params, sel), meta, body.echo, inf))
    results = await inf.run(prompts, body.n, params, sel)
    choices = [_completion_choice(r, body.echo, k, inf, prompts[r.index // body.n]) for r in results]
    return {"object": "text_completion", **meta, "choices": choices, "usage": _usage(results, body.n)}


def _prompts(inf: Inference, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items or len(items) > 64:
        raise BadRequestError("prompt must be a string, a list of 1-64 strings, or token ids", code="invalid_prompt")
    return [inf.tokenize(p) for p in items]


def _logprobs_k(k: int | None, limit: int) -> int | None:
    if k is not None and k > limit:
        raise BadRequestError(f"logprobs must be <= {limit}", code="invalid_logprobs")
    return k


def _completion_choice(
    r: ChoiceResult, echo: bool, k: int | None, inf: Inference, prompt_ids: list[int]
) -> dict[str, Any]:
    prompt_text = inf.tokenizer.decode(prompt_ids, skip_special_tokens=True) if echo else ""
    infos = (r.prompt_infos or []) + r.token_infos if echo else r.token_infos
    logprobs = _legacy_logprobs(infos) if k is not None else None
    return {"index": r.index, "text": prompt_text + r.text, "logprobs": logprobs, "finish_reason": r.finish_reason}


def _legacy_logprobs(infos: list[TokenInfo]) -> dict[str, Any]:
    """OpenAI's completions logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""
    offsets, pos = [], 0
    for info in infos:
        offsets.append(pos)
        pos += len(info.text)
    return {
        "tokens": [i.text for i in infos],
        "token_logprobs": [i.logprob for i in infos],
        "top_logprobs": [i.top for i in infos],
        "text_offset": offsets,
    }


def _usage(results: list[ChoiceResult], n: int) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results[::n])
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _completion_chunks(
    events: AsyncIterator[tuple[int, Event]], meta: dict[str, Any], echo: bool, inf: Inference
) -> AsyncIterator[dict[str, Any]]:
    async for index, event in events:
        if isinstance(event, ErrorEvent):
            raise event.error
        choice: dict[str, Any] = {"index": index, "text": "", "logprobs": None, "finish_reason": None}
        if isinstance(event, PromptEvent) and echo:
            choice["text"] = inf.tokenizer.decode([t.id for t in event.tokens], skip_special_tokens=True)
            choice["logprobs"] = _legacy_logprobs(event.tokens) if event.tokens[-1].top is not None else None
        elif isinstance(event, TokenEvent):
            choice["text"] = event.text
            if event.tokens[0].top is not None:
                choice["logprobs"] = _legacy_logprobs(event.tokens)
        elif isinstance(event, FinishEvent):
            choice["text"], choice["finish_reason"] = event.text, event.reason
        else:
            continue
        yield {"object": "text_completion", **meta, "choices": [choice]}


# ------------------------------------------------------------------------------------------ chat
@router.post("/v1/chat/completions", response_model=None, responses=_STREAMABLE)
async def chat_completions(body: ChatRequest, c: Deps, request: Request) -> dict[str, Any] | StreamingResponse:
    inf = _inference(c)
    sel = inf.select(body.model, body.adapters)
    request.scope["lokr_adapter"] = sel.label
    ids = _chat_prompt(inf, body)
    k = _logprobs_k(body.top_logprobs if body.logprobs else None, c.settings.max_logprobs)
    if body.logprobs and k is None:
        k = 0
    max_tokens = body.max_completion_tokens or body.max_tokens or max(1, inf.lm.context_length - len(ids))
    params = SamplingParams(max_tokens, body.temperature, body.top_p, body.seed, body.stop_list(), k)
    inf.lm.check_fits(len(ids), params)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
    if body.stream:
        return _sse(_chat_chunks(inf.stream([ids], body.n, params, sel), meta))
    results = await inf.run([ids], body.n, params, sel)
    choices = [
        {
            "index": r.index,
            "message": {"role": "assistant", "content": r.text},
            "logprobs": _chat_logprobs(r.token_infos) if k is not None else None,
            "finish_reason": r.finish_reason,
        }
        for r in results
    ]
    return {"object": "chat.completion", **meta, "choices": choices, "usage": _usage(results, body.n)}


def _chat_prompt(inf: Inference, body: ChatRequest) -> list[int]:
    tokenizer = inf.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise BadRequestError(
            "this model's tokenizer has no chat template; use /v1/completions with a plain prompt",
            code="no_chat_template",
        )
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja errors from templates that reject a role order, etc.
        raise BadRequestError(f"the chat template rejected these messages: {exc}", code="invalid_messages") from exc
    return inf.tokenize(text, special=False)


def _chat_logprobs(infos: list[TokenInfo]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": i.text,
                "logprob": i.logprob,
                "top_logprobs": [{"token": t, "logprob": v} for t, v in (i.top or {}).items()],
            }
            for i in infos
        ]
    }


async def _chat_chunks(events: AsyncIterator[tuple[int, Event]], meta: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    started: set[int] = set()
    async for index, event in events:
        if isinstance(event, ErrorEvent):
            raise event.error
        if index not in started:
            started.add(index)
            yield _chat_chunk(meta, index, {"role": "assistant", "content": ""}, None)
        if isinstance(event, TokenEvent):
            logprobs = _chat_logprobs(event.tokens) if event.tokens[0].top is not None else None
            yield _chat_chunk(meta, index, {"content": event.text}, None, logprobs)
        elif isinstance(event, FinishEvent):
            yield _chat_chunk(meta, index, {"content": event.text} if event.text else {}, event.reason)


def _chat_chunk(
    meta: dict[str, Any], index: int, delta: dict[str, Any], finish: str | None, logprobs: Any = None
) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return {"object": "chat.completion.chunk", **meta, "choices": [choice]}


# ------------------------------------------------------------------------------------------ SSE
def _sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """Server-sent events like OpenAI's: `data: {json}` per chunk, then `data: [DONE]`.

    An error after the stream started is sent as a final `data: {"error": ...}` event.
    """

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except Exception as exc:
            yield f"data: {json.dumps(http_error_for(exc).body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


__all__ = ["router"]
