"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions (with SSE streaming)."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..disconnect import unless_gone, until_disconnected
from ..errors import BadRequestError, http_error_for
from ..inference import ChoiceResult, Inference
from ..jobs import ErrorEvent, Event, FinishEvent, PromptEvent, SamplingParams, TokenEvent, TokenInfo
from ..schemas import ChatRequest, CompletionRequest
from ..sse import STREAMABLE, SseResponse, sse_event
from ..tokenbytes import TokenBytes
from .deps import ApiAuth, Components, Deps

router = APIRouter(dependencies=[ApiAuth], tags=["openai"])


_GONE = "its completions were"  # what a client that leaves has cancelled
DEFAULT_MAX_TOKENS = 16  # completions without `max_tokens` (OpenAI's default)


def _inference(c: Components) -> Inference:
    return c.running()[1]


# ------------------------------------------------------------------------------------------ completions
@router.post("/v1/completions", response_model=None, responses=STREAMABLE)
async def completions(body: CompletionRequest, c: Deps, request: Request) -> dict[str, Any] | StreamingResponse:
    inf = _inference(c)
    sel = inf.select(body.model, body.adapters)
    request.scope["lokr_adapter"] = sel.label
    prompts = _prompts(inf, body.prompt)
    k = _logprobs_k(body.logprobs, c.settings.max_logprobs)
    _check_choices(len(prompts), body.n, c)
    params = SamplingParams(
        max_tokens=body.max_tokens if body.max_tokens is not None else _default_max_tokens(inf, prompts),
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_list(),
        logprobs=k,
        echo=body.echo,
    )
    usage = _include_usage(body)
    for ids in prompts:
        inf.lm.check_fits(len(ids), params)
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
    if body.stream:
        launched = await inf.launch(prompts, body.n, params, sel)
        chunks = _completion_chunker(meta, params)
        writer = _SseWriter(chunks, "text_completion", meta, len(prompts) * body.n, body.n, usage)
        return _sse(inf.batches(launched), writer, launched.cancel)
    results = await unless_gone(inf.run(prompts, body.n, params, sel), partial(until_disconnected, request), _GONE)
    choices = [_completion_choice(r, params) for r in results]
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


def _default_max_tokens(inf: Inference, prompts: list[list[int]]) -> int:
    """OpenAI's default of 16, cut to what the longest prompt leaves of the context (a prompt one token short of
    the context gets 1, not a context-length error for a limit the client never set)."""
    left = inf.lm.context_length - max(len(ids) for ids in prompts)
    return min(DEFAULT_MAX_TOKENS, left) if left > 0 else DEFAULT_MAX_TOKENS


def _check_choices(prompts: int, n: int, c: Components) -> None:
    """`n` within the server's limit, and all `prompts x n` choices able to wait in the queue at once (else the
    request could only ever get a 503, however often it is retried)."""
    s = c.settings
    if n > s.max_n:
        raise BadRequestError(f"n must be <= {s.max_n} on this server (LOKR_MAX_N), got {n}", code="invalid_n")
    if prompts * n > s.max_queue:
        raise BadRequestError(
            f"this request asks for {prompts * n} choices ({prompts} prompts x n={n}), more than the {s.max_queue} "
            "the server queues at once (--max-queue); send fewer prompts per request or a smaller n",
            code="invalid_n",
        )


def _logprobs_k(k: int | None, limit: int) -> int | None:
    if k is not None and k > limit:
        raise BadRequestError(f"logprobs must be <= {limit}", code="invalid_logprobs")
    return k


def _include_usage(body: CompletionRequest | ChatRequest) -> bool:
    """Whether the stream ends with OpenAI's usage chunk; `stream_options` needs `stream: true`."""
    if body.stream_options is None:
        return False
    if not body.stream:
        raise BadRequestError("stream_options is only allowed with `stream: true`", code="invalid_stream_options")
    return body.stream_options.include_usage


def _completion_choice(r: ChoiceResult, params: SamplingParams) -> dict[str, Any]:
    infos = (r.prompt_infos or []) + r.token_infos if params.echo else r.token_infos
    prompt_text = "".join(i.text for i in r.prompt_infos or []) if params.echo else ""
    logprobs = _legacy_logprobs(infos, 0) if params.logprobs is not None else None
    return {"index": r.index, "text": prompt_text + r.text, "logprobs": logprobs, "finish_reason": r.finish_reason}


def _legacy_logprobs(infos: list[TokenInfo], offset: int) -> dict[str, Any]:
    """OpenAI's completions logprobs object: tokens, token_logprobs, top_logprobs, text_offset.

    `tokens` are the text pieces (they concatenate to the text) and `text_offset` indexes into the text, the
    first piece starting at `offset`. `top_logprobs` maps each alternative's piece to its logprob; pieces two
    alternatives share (specials decode to "", say) are keyed `token_id:<id>` instead (vLLM's spelling), so
    no alternative is merged away.
    """
    offsets = []
    for info in infos:
        offsets.append(offset)
        offset += len(info.text)
    return {
        "tokens": [i.text for i in infos],
        "token_logprobs": [_finite(i.logprob) for i in infos],
        "top_logprobs": [None if i.top is None else _top_dict(i.top) for i in infos],
        "text_offset": offsets,
    }


def _top_dict(top: list[TokenInfo]) -> dict[str, float | None]:
    counts = Counter(t.text for t in top)
    return {t.text if counts[t.text] == 1 else f"token_id:{t.id}": _finite(t.logprob) for t in top}


def _finite(logprob: float | None) -> float | None:
    """JSON has no -inf: clamp as OpenAI and vLLM do."""
    return None if logprob is None else max(logprob, -9999.0)


def _usage(results: list[ChoiceResult], n: int) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results[::n])
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_chunker(meta: dict[str, Any], params: SamplingParams) -> _Chunker:
    """Completions stream chunks: one per event (a prompt event only with `echo`)."""
    offsets: dict[int, int] = {}  # per choice: where its next token's piece starts (text_offset runs on)

    def chunks(index: int, event: Event) -> list[dict[str, Any]]:
        choice: dict[str, Any] = {"index": index, "text": "", "logprobs": None, "finish_reason": None}
        if isinstance(event, PromptEvent) and params.echo:
            choice["text"] = "".join(t.text for t in event.tokens)
            tokens = event.tokens
        elif isinstance(event, TokenEvent):
            choice["text"], tokens = event.text, event.tokens
        elif isinstance(event, FinishEvent):
            choice["text"], choice["finish_reason"], tokens = event.text, event.reason, []
        else:
            return []
        if params.logprobs is not None and tokens:
            choice["logprobs"] = _legacy_logprobs(tokens, offsets.get(index, 0))
        offsets[index] = offsets.get(index, 0) + sum(len(t.text) for t in tokens)
        return [{"object": "text_completion", **meta, "choices": [choice]}]

    return chunks


# ------------------------------------------------------------------------------------------ chat
@router.post("/v1/chat/completions", response_model=None, responses=STREAMABLE)
async def chat_completions(body: ChatRequest, c: Deps, request: Request) -> dict[str, Any] | StreamingResponse:
    inf = _inference(c)
    sel = inf.select(body.model, body.adapters)
    request.scope["lokr_adapter"] = sel.label
    ids = _chat_prompt(inf, body)
    _check_choices(1, body.n, c)
    if body.top_logprobs is not None and not body.logprobs:
        raise BadRequestError("top_logprobs needs `logprobs: true`", code="invalid_logprobs")
    k = _logprobs_k(body.top_logprobs if body.logprobs else None, c.settings.max_logprobs)
    if body.logprobs and k is None:
        k = 0
    max_tokens = body.max_completion_tokens or body.max_tokens or max(1, inf.lm.context_length - len(ids))
    params = SamplingParams(max_tokens, body.temperature, body.top_p, body.seed, body.stop_list(), k)
    usage = _include_usage(body)
    inf.lm.check_fits(len(ids), params)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
    if body.stream:
        launched = await inf.launch([ids], body.n, params, sel)
        chunks = _chat_chunker(meta, k, inf.token_bytes)
        writer = _SseWriter(chunks, "chat.completion.chunk", meta, body.n, body.n, usage)
        return _sse(inf.batches(launched), writer, launched.cancel)
    results = await unless_gone(inf.run([ids], body.n, params, sel), partial(until_disconnected, request), _GONE)
    choices = [
        {
            "index": r.index,
            "message": {"role": "assistant", "content": r.text},
            "logprobs": _chat_logprobs(r.token_infos, inf.token_bytes) if k is not None else None,
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


def _chat_logprobs(infos: list[TokenInfo], token_bytes: TokenBytes) -> dict[str, Any]:
    """Chat logprobs: each token's text piece (spaces kept; "" for a token that ends inside a character), its own
    UTF-8 bytes (those of a split character too), and its alternatives."""

    def entry(info: TokenInfo) -> dict[str, Any]:
        return {"token": info.text, "logprob": _finite(info.logprob), "bytes": token_bytes.of(info.id, info.text)}

    return {"content": [{**entry(i), "top_logprobs": [entry(t) for t in i.top or []]} for i in infos]}


def _chat_chunker(meta: dict[str, Any], k: int | None, token_bytes: TokenBytes) -> _Chunker:
    """Chat stream chunks: a choice's first event is preceded by its `role` chunk."""
    started: set[int] = set()

    def chunks(index: int, event: Event) -> list[dict[str, Any]]:
        out = []
        if index not in started:
            started.add(index)
            out.append(_chat_chunk(meta, index, {"role": "assistant", "content": ""}, None))
        if isinstance(event, TokenEvent):
            logprobs = _chat_logprobs(event.tokens, token_bytes) if k is not None and event.tokens else None
            out.append(_chat_chunk(meta, index, {"content": event.text}, None, logprobs))
        elif isinstance(event, FinishEvent):
            out.append(_chat_chunk(meta, index, {"content": event.text} if event.text else {}, event.reason))
        return out

    return chunks


def _chat_chunk(
    meta: dict[str, Any], index: int, delta: dict[str, Any], finish: str | None, logprobs: Any = None
) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return {"object": "chat.completion.chunk", **meta, "choices": [choice]}


# ------------------------------------------------------------------------------------------ SSE
_Chunker = Callable[[int, Event], list[dict[str, Any]]]  # one event of one choice -> its stream chunks
_DONE = "data: [DONE]\n\n"


class _SseWriter:
    """A stream's SSE text, like OpenAI's: `data: {json}` per chunk, then `data: [DONE]`.

    With `stream_options.include_usage` every chunk carries `usage: null` and a last chunk with no choices
    carries the usage (prompts counted once per prompt, not per choice). An error after the stream started
    is sent as a final `data: {"error": ...}` event (and no usage chunk).
    """

    def __init__(self, chunks: _Chunker, obj: str, meta: dict[str, Any], choices: int, n: int, usage: bool) -> None:
        self.chunks, self.obj, self.meta, self.n, self.usage = chunks, obj, meta, n, usage
        self.open = choices  # choices not finished yet
        self.finishes: dict[int, FinishEvent] = {}
        self.failed = False

    def batch(self, events: list[tuple[int, Event]]) -> str:
        """The text for events that arrived together (one socket write instead of one per chunk)."""
        parts = []
        for index, event in events:
            if isinstance(event, ErrorEvent):
                parts.append(self.error(event.error))
                break
            if isinstance(event, FinishEvent):
                self.finishes[index] = event
                self.open -= 1
            parts.extend(self._data(chunk) for chunk in self.chunks(index, event))
        return "".join(parts)

    @property
    def done(self) -> bool:
        return self.failed or self.open <= 0

    def error(self, exc: BaseException) -> str:
        self.failed = True
        return sse_event(http_error_for(exc).body())

    def end(self) -> str:
        if not self.usage or self.failed:
            return _DONE
        prompt = sum(f.prompt_tokens for i, f in self.finishes.items() if i % self.n == 0)
        completion = sum(f.completion_tokens for f in self.finishes.values())
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        return sse_event({"object": self.obj, **self.meta, "choices": [], "usage": usage}) + _DONE

    def _data(self, chunk: dict[str, Any]) -> str:
        if self.usage:
            chunk["usage"] = None
        return sse_event(chunk)


def _sse(
    batches: AsyncGenerator[list[tuple[int, Event]], None], writer: _SseWriter, on_close: Callable[[], None]
) -> StreamingResponse:
    """Stream `batches` of events through `writer`: one write per batch; the last one also ends the stream;
    `on_close` runs however the response ends."""

    async def body() -> AsyncIterator[str]:
        async with contextlib.aclosing(batches):
            try:
                async for batch in batches:
                    text = writer.batch(batch)
                    if writer.done:
                        yield text + writer.end()
                        return
                    if text:
                        yield text
            except Exception as exc:
                yield writer.error(exc) + _DONE
                return
        yield writer.end()

    return SseResponse(body(), on_close)


__all__ = ["router"]
