"""What the engine works on: one generation job per completion choice, and the events it emits."""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lokr.batch import RowSpec

from .errors import EngineError

__all__ = [
    "ErrorEvent",
    "Event",
    "FinishEvent",
    "Job",
    "PreviewEvent",
    "PromptEvent",
    "SamplingParams",
    "TokenEvent",
    "TokenInfo",
    "fail_jobs",
]

log = logging.getLogger("lokr_serve.engine")

_ids = itertools.count()


@dataclass(frozen=True)
class SamplingParams:
    """Per-row decoding settings (OpenAI semantics; temperature 0 = greedy)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: no logprobs; k: chosen token plus top-k alternatives
    echo: bool = False


@dataclass(frozen=True)
class TokenInfo:
    """A token and the text piece it adds (pieces concatenate to the text); `top`: the top-k alternatives."""

    id: int
    text: str
    logprob: float | None = None
    top: list[TokenInfo] | None = None


@dataclass(frozen=True)
class PromptEvent:
    """The prompt's tokens with their logprobs (for `echo`)."""

    tokens: list[TokenInfo]


@dataclass(frozen=True)
class TokenEvent:
    """Newly generated text (`text` may be empty while held back for stop strings)."""

    text: str
    tokens: list[TokenInfo]


@dataclass(frozen=True)
class FinishEvent:
    reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    text: str = ""  # the remaining text not yet sent in a TokenEvent


@dataclass(frozen=True)
class ErrorEvent:
    error: BaseException


@dataclass(frozen=True)
class PreviewEvent:
    """An image job's picture part way (OpenAI's partial image): the denoiser's estimate of the finished image,
    decoded (a PIL image); `index` counts the job's previews from 0."""

    index: int
    image: Any


Event = PromptEvent | TokenEvent | FinishEvent | ErrorEvent | PreviewEvent


_FINISHING = threading.Lock()  # `done`'s test-and-set: whichever thread finishes a job first is the only one


@dataclass
class Job:
    """One row of work: a prompt, its adapter selection, its sampling settings and an event sink."""

    prompt_ids: list[int]
    params: SamplingParams
    selection: RowSpec
    sink: Callable[[Event], None]
    on_done: Callable[[Event], None] = lambda event: None  # runs on the engine thread with the last event
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: threading.Event = field(default_factory=threading.Event)
    generator: torch.Generator | None = None
    done: bool = False

    def finish(self, event: Event) -> None:
        """Emit the last event and release what the job holds; idempotent, also across threads (shutdown may
        finish a row while the step holding it still runs)."""
        with _FINISHING:
            if self.done:
                return
            self.done = True
        try:
            self.sink(event)
        finally:
            self.on_done(event)

    def finish_cancelled(self) -> None:
        """Finish a job whose client went away before it ran."""
        self.finish(FinishEvent("cancelled", len(self.prompt_ids), 0))


class Finishable(Protocol):
    def finish(self, event: Event) -> None: ...


def fail_jobs(jobs: Sequence[Finishable], exc: Exception) -> None:
    """Fail `jobs` with a 500 that names the failure (the cause is logged); the engine keeps serving."""
    log.error("forward failed for %d rows", len(jobs), exc_info=exc)
    error = EngineError(f"the forward pass failed for this batch ({type(exc).__name__}); retry the request")
    for job in jobs:
        job.finish(ErrorEvent(error))
