"""From an API request to engine jobs and back: adapter selection, fan-out over prompts x n, aggregation."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncGenerator, Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from lokr.batch import RowSpec

from .engine import Engine
from .errors import BadRequestError, NotFoundError
from .jobs import ErrorEvent, Event, FinishEvent, Job, PromptEvent, SamplingParams, TokenEvent, TokenInfo
from .lm import CausalLMBackend
from .metrics import Metrics
from .registry import Registry
from .schemas import AdapterRef
from .tokenbytes import TokenBytes

__all__ = ["ChoiceResult", "Inference", "Launched", "Selection", "select_adapters"]


COMPOSITION_LABEL = "(composition)"  # the metrics label of several adapters composed: one value, not one per mix


@dataclass(frozen=True)
class Selection:
    """What a request asked for: the per-row spec, the adapter names it holds, and a metrics label (the base
    model's name, the adapter's, or `COMPOSITION_LABEL`)."""

    spec: RowSpec
    names: frozenset[str]
    label: str


@dataclass
class ChoiceResult:
    index: int
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_infos: list[TokenInfo] | None = None
    token_infos: list[TokenInfo] = field(default_factory=list)


def select_adapters(
    model: str, adapters: Sequence[AdapterRef] | Sequence[tuple[str, float]] | None, known: Collection[str], base: str
) -> Selection:
    """What a request selects among the `known` adapter names: `model` (an adapter or the `base` name) or
    `adapters` (`AdapterRef`s or `(name, scale)` pairs) composed on the base; 404 / 400 for unknown names or bad
    mixes."""
    pairs = [(a.name, a.scale) if isinstance(a, AdapterRef) else (a[0], float(a[1])) for a in adapters or []]
    if pairs:
        if model != base:
            raise BadRequestError(
                f"`adapters` composes adapters on the base model: set `model` to {base!r}", code="invalid_adapters"
            )
        names = frozenset(n for n, _ in pairs)
        missing = sorted(names - set(known))
        if missing:
            raise NotFoundError(f"adapter(s) {missing} not loaded; loaded: {sorted(known)}", code="adapter_not_found")
        return Selection(pairs, names, next(iter(names)) if len(names) == 1 else COMPOSITION_LABEL)
    if model == base:
        return Selection(None, frozenset(), base)
    if model not in known:
        raise NotFoundError(
            f"The model {model!r} does not exist; available: {[base, *sorted(known)]}", code="model_not_found"
        )
    return Selection(model, frozenset([model]), model)


class Inference:
    """Turns validated requests into jobs on the engine and gathers their events."""

    def __init__(
        self, engine: Engine, lm: CausalLMBackend, registry: Registry, metrics: Metrics, base_name: str
    ) -> None:
        self.engine, self.lm, self.registry, self.metrics, self.base_name = engine, lm, registry, metrics, base_name

    @property
    def tokenizer(self) -> Any:
        return self.lm.tokenizer

    @functools.cached_property
    def token_bytes(self) -> TokenBytes:
        """Each token's own bytes (chat logprobs' `bytes`), read from the tokenizer's vocabulary once per token."""
        return TokenBytes(self.lm.tokenizer)

    def select(self, model: str, adapters: Sequence[AdapterRef] | None) -> Selection:
        """`model` = an adapter or the base name; `adapters` composes on the base: `[(name, scale), ...]`."""
        return select_adapters(model, adapters, self.registry.names(), self.base_name)

    def tokenize(self, prompt: str | list[int], *, special: bool = True) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=special)["input_ids"])
        vocab = len(self.tokenizer)
        if any(t < 0 or t >= vocab for t in prompt):
            raise BadRequestError(f"prompt token ids must be in [0, {vocab})", code="invalid_prompt")
        return list(prompt)

    async def launch(self, prompts: Sequence[list[int]], n: int, params: SamplingParams, sel: Selection) -> Launched:
        """Lease every choice's adapters (bringing them back if needed) and launch its job (index = prompt * n +
        k); the engine delivers straight into the request's inbox, no task per choice. The first failure (queue
        full, shutting down, an adapter that cannot come back) cancels the choices launched and raises: before a
        streamed answer's first byte, so it has its own status. Callers check `lm.check_fits` first."""
        launched = Launched(_Inbox(len(prompts) * n), [])
        try:
            for p, ids in enumerate(prompts):
                for k in range(n):
                    seed = None if params.seed is None else params.seed + k
                    launched.jobs.append(await self._start(p * n + k, ids, replace(params, seed=seed), sel, launched))
        except BaseException:
            launched.cancel()
            raise
        return launched

    @staticmethod
    async def batches(launched: Launched) -> AsyncGenerator[list[tuple[int, Event]], None]:
        """The events of every choice in arrival order, as the batches that arrived together (an engine step
        hands over all its rows' events at once): one wake-up per step, not per event. Leaving early cancels."""
        try:
            while not launched.inbox.finished:
                yield await launched.inbox.take()
        finally:
            launched.cancel()

    async def stream(
        self, prompts: Sequence[list[int]], n: int, params: SamplingParams, sel: Selection
    ) -> AsyncGenerator[tuple[int, Event], None]:
        """`launch`, then its events one at a time."""
        batches = self.batches(await self.launch(prompts, n, params, sel))
        async with contextlib.aclosing(batches):
            async for batch in batches:
                for item in batch:
                    yield item

    async def _start(
        self, index: int, ids: list[int], params: SamplingParams, sel: Selection, launched: Launched
    ) -> Job:
        """Lease one choice's adapters and launch its job; the job co-holds the lease until the engine is done
        with its row (also after the client has gone)."""
        async with self.registry.lease(sel.names) as lease:
            sink = self.engine.sink_to(self._deliver(index, sel.label, launched.inbox))
            job = Job(ids, params, sel.spec, sink, on_done=partial(self._done, lease.hold(), sel.label))
            try:
                self.engine.submit(job)
            except Exception as exc:  # refused (queue full, shutting down, too long): the job gives its lease back
                job.finish(ErrorEvent(exc))
                raise
            return job

    def _deliver(self, index: int, label: str, inbox: _Inbox) -> Callable[[Event], None]:
        """The loop-side end of one choice's sink: time to first token, then into the inbox."""
        started, first = time.perf_counter(), True

        def deliver(event: Event) -> None:
            nonlocal first
            if first and isinstance(event, TokenEvent):
                self.metrics.ttft.labels(label).observe(time.perf_counter() - started)
                first = False
            inbox.put(index, event)

        return deliver

    def _done(self, release: Callable[[], None], label: str, event: Event) -> None:
        """The job's last event (engine thread, client gone or not): give the lease back, count tokens."""
        release()
        if isinstance(event, FinishEvent):
            self.metrics.tokens.labels("prompt", label).inc(event.prompt_tokens)
            self.metrics.tokens.labels("generated", label).inc(event.completion_tokens)

    async def run(
        self, prompts: Sequence[list[int]], n: int, params: SamplingParams, sel: Selection
    ) -> list[ChoiceResult]:
        """Gather every choice; the first error fails the whole request."""
        results = [ChoiceResult(i) for i in range(len(prompts) * n)]
        events = self.stream(prompts, n, params, sel)
        async with contextlib.aclosing(events):  # an error cancels the other choices now, not when collected
            async for index, event in events:
                result = results[index]
                if isinstance(event, ErrorEvent):
                    raise event.error
                if isinstance(event, PromptEvent):
                    result.prompt_infos = event.tokens
                elif isinstance(event, TokenEvent):
                    result.text += event.text
                    result.token_infos.extend(event.tokens)
                elif isinstance(event, FinishEvent):
                    result.text += event.text
                    result.finish_reason = event.reason
                    result.prompt_tokens, result.completion_tokens = event.prompt_tokens, event.completion_tokens
        return results


@dataclass
class Launched:
    """One request's choices, leased and in the engine: their events arrive in `inbox`; `cancel` ends them."""

    inbox: _Inbox
    jobs: list[Job]

    def cancel(self) -> None:
        """Every job leaves the engine at its next step (a no-op for those already finished)."""
        for job in self.jobs:
            job.cancelled.set()


class _Inbox:
    """One request's events from all its choices, filled on the loop thread, taken in batches by one reader."""

    def __init__(self, choices: int) -> None:
        self._items: list[tuple[int, Event]] = []
        self._waiter: asyncio.Future[None] | None = None
        self._open = choices  # choices that have not finished (or failed) yet

    @property
    def finished(self) -> bool:
        """Every choice has sent its last event and the reader has taken it."""
        return self._open == 0 and not self._items

    def put(self, index: int, event: Event) -> None:
        self._items.append((index, event))
        if isinstance(event, (FinishEvent, ErrorEvent)):
            self._open -= 1
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def take(self) -> list[tuple[int, Event]]:
        """Everything that arrived since the last take; waits while there is nothing."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items, self._items = self._items, []
        return items
