"""From an API request to engine jobs and back: adapter selection, fan-out over prompts x n, aggregation."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from lokr.batch import RowSpec

from .engine import Engine
from .errors import BadRequestError, NotFoundError
from .jobs import ErrorEvent, Event, FinishEvent, Job, PromptEvent, SamplingParams, TokenEvent, TokenInfo
from .lm import CausalLMBackend
from .metrics import Metrics
from .registry import Lease, Registry
from .schemas import AdapterRef

__all__ = ["ChoiceResult", "Inference", "Selection", "select_adapters"]


@dataclass(frozen=True)
class Selection:
    """What a request asked for: the per-row spec, the adapter names it holds, and a metrics label."""

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
    model: str, adapters: Sequence[AdapterRef] | None, known: Collection[str], base_name: str
) -> Selection:
    """What a request selects among the `known` adapter names (404 / 400 for unknown names or bad mixes)."""
    if adapters:
        if model != base_name:
            raise BadRequestError(
                f"`adapters` composes adapters on the base model: set `model` to {base_name!r}",
                code="invalid_adapters",
            )
        pairs = [(a.name, a.scale) for a in adapters]
        names = frozenset(n for n, _ in pairs)
        missing = sorted(names - set(known))
        if missing:
            raise NotFoundError(f"adapter(s) {missing} not loaded", code="adapter_not_found")
        return Selection(pairs, names, "+".join(sorted(names)))
    if model == base_name:
        return Selection(None, frozenset(), base_name)
    if model not in known:
        raise NotFoundError(
            f"The model {model!r} does not exist; available: {[base_name, *known]}",
            code="model_not_found",
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

    async def stream(
        self, prompts: Sequence[list[int]], n: int, params: SamplingParams, sel: Selection
    ) -> AsyncIterator[tuple[int, Event]]:
        """Events of every choice (index = prompt * n + k), interleaved as they come.

        Callers check `lm.check_fits` first to answer a 400 before streaming; `submit` checks again.
        """
        out: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        tasks = []
        for p, ids in enumerate(prompts):
            for k in range(n):
                seed = None if params.seed is None else params.seed + k
                job_params = replace(params, seed=seed)
                tasks.append(asyncio.ensure_future(self._pump(p * n + k, ids, job_params, sel, out)))
        try:
            finished = 0
            while finished < len(tasks):
                index, event = await out.get()
                if isinstance(event, (FinishEvent, ErrorEvent)):
                    finished += 1
                yield index, event
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _pump(
        self, index: int, ids: list[int], params: SamplingParams, sel: Selection, out: asyncio.Queue
    ) -> None:
        """One choice: lease its adapters (bringing them back if needed), then stream its job's events."""
        try:
            async with self.registry.lease(sel.names) as lease:
                await self._generate(index, ids, params, sel, lease, out)
        except Exception as exc:
            await out.put((index, ErrorEvent(exc)))

    async def _generate(
        self, index: int, ids: list[int], params: SamplingParams, sel: Selection, lease: Lease, out: asyncio.Queue
    ) -> None:
        def done(release: Callable[[], None], event: Event) -> None:  # engine thread, client gone or not
            release()
            if isinstance(event, FinishEvent):
                self.metrics.tokens.labels("prompt", sel.label).inc(event.prompt_tokens)
                self.metrics.tokens.labels("generated", sel.label).inc(event.completion_tokens)

        def make_job(sink: Callable[[Event], None]) -> Job:
            # the job holds the lease until the engine has finished with its row, after this scope if need be
            return Job(ids, params, sel.spec, sink, on_done=partial(done, lease.hold()))

        started, first = time.perf_counter(), True
        async for event in self.engine.stream(make_job):
            if first and isinstance(event, TokenEvent):
                self.metrics.ttft.labels(sel.label).observe(time.perf_counter() - started)
                first = False
            await out.put((index, event))

    async def run(
        self, prompts: Sequence[list[int]], n: int, params: SamplingParams, sel: Selection
    ) -> list[ChoiceResult]:
        """Gather every choice; the first error fails the whole request."""
        results = [ChoiceResult(i) for i in range(len(prompts) * n)]
        async for index, event in self.stream(prompts, n, params, sel):
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
