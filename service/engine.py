"""The engine: sole owner of the model. A worker thread keeps a running decode batch; waiting jobs are
prefilled and join it at step boundaries, finished or cancelled rows leave at once.

Adapter state changes (load / unload) take `model_lock`, which the worker holds for each step, so a
forward never sees an adapter appear or vanish mid-flight.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from .backend import LoadedModel
from .errors import ContextLengthError, EngineError, NotReadyError, OverloadedError
from .generation import BatchRunner, RunningBatch
from .jobs import ErrorEvent, Event, FinishEvent, Job, SamplingParams
from .metrics import Metrics
from .outbox import Outbox

__all__ = ["Engine"]

log = logging.getLogger("lokr_serve.engine")


class Engine:
    """Owns the model; one worker thread runs a continuous batch of up to `max_batch_size` rows."""

    def __init__(
        self,
        loaded: LoadedModel,
        metrics: Metrics,
        max_batch_size: int = 16,
        max_queue: int = 256,
        max_prefill_tokens: int = 512,
    ) -> None:
        self.loaded = loaded
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.model_lock = threading.RLock()
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._runner = BatchRunner(loaded.model, loaded.tokenizer, loaded.device, loaded.context_length)
        self._stop = threading.Event()
        self._accepting = False
        self._busy = threading.Event()
        self._thread: threading.Thread | None = None
        self._outbox = Outbox()  # token events leave once per step, not once per row

    # ---------------------------------------------------------------------------------- lifecycle
    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def accepting(self) -> bool:
        return self._accepting

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lokr-engine", daemon=True)
        self._accepting = True
        self._thread.start()

    def stop_accepting(self) -> None:
        """New submits get 503 and /ready turns 503; queued and running jobs still finish."""
        self._accepting = False

    def drain(self, grace_s: float) -> bool:
        """Stop accepting, let queued and running jobs finish within `grace_s`; True if all finished."""
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while (not self._queue.empty() or self._busy.is_set()) and time.monotonic() < deadline:
            time.sleep(0.02)
        return self._queue.empty() and not self._busy.is_set()

    def stop(self) -> None:
        self._accepting = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        while not self._queue.empty():
            self._queue.get_nowait().finish(ErrorEvent(NotReadyError("the server is shutting down")))

    # ---------------------------------------------------------------------------------- submit
    def check_fits(self, prompt_len: int, params: SamplingParams) -> None:
        ctx = self.loaded.context_length
        if prompt_len == 0:
            raise ContextLengthError("the prompt is empty after tokenisation; send at least one token")
        if prompt_len + params.max_tokens > ctx:
            raise ContextLengthError(
                f"This model's maximum context length is {ctx} tokens, but the prompt has {prompt_len} tokens "
                f"and max_tokens is {params.max_tokens}; shorten the prompt or lower max_tokens"
            )

    def submit(self, job: Job) -> None:
        if not self._accepting:
            raise NotReadyError("the server is not accepting requests (starting or shutting down)")
        self.check_fits(len(job.prompt_ids), job.params)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise OverloadedError(
                f"the request queue is full ({self._queue.maxsize} waiting); retry after a moment"
            ) from None
        self.metrics.queue_depth.set(self._queue.qsize())

    async def stream(self, make_job: Callable[[Callable[[Event], None]], Job]) -> AsyncIterator[Event]:
        """Submit a job and yield its events; leaving early (client gone) cancels the row."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:
            self._outbox.post(loop, events.put_nowait, event)

        job = make_job(sink)
        try:
            self.submit(job)
        except Exception as exc:  # refused: the job reports it as its only event
            job.finish(ErrorEvent(exc))
        try:
            while True:
                event = await events.get()
                yield event
                if isinstance(event, (FinishEvent, ErrorEvent)):
                    return
        finally:
            job.cancelled.set()

    # ---------------------------------------------------------------------------------- worker
    def _loop(self) -> None:
        """Continuous batching: each iteration admits waiting jobs (prefill) and runs one decode step."""
        self._outbox.bind()
        batch: RunningBatch | None = None
        try:
            while not self._stop.is_set():
                batch = self._iterate(batch)
                self._outbox.flush()
        finally:
            self._outbox.flush()

    def _iterate(self, batch: RunningBatch | None) -> RunningBatch | None:
        """Admit what fits, then one decode step."""
        room = self.max_batch_size - (len(batch) if batch is not None else 0)
        new = self._take(room if self._runner.can_join(batch) else 0, block=batch is None)
        if batch is None and not new:
            return None
        self._busy.set()
        with self.model_lock:
            if new:
                batch = self._runner.merge(batch, self._admit(new))
            if batch is not None:
                self.metrics.batch_size.observe(len(batch))
                batch = self._step(batch)
        if batch is None and self._queue.empty():
            self._outbox.flush()  # before /drain can see the engine idle
            self._busy.clear()
        return batch

    def _take(self, room: int, block: bool) -> list[Job]:
        """Up to `room` live jobs and at most `max_prefill_tokens` prompt tokens (always at least one job)."""
        jobs: list[Job] = []
        tokens = 0
        while len(jobs) < room:
            try:
                job = self._queue.get(timeout=0.05) if block and not jobs else self._queue.get_nowait()
            except queue.Empty:
                break
            if job.cancelled.is_set():
                job.finish(FinishEvent("cancelled", len(job.prompt_ids), 0))
                continue
            jobs.append(job)
            tokens += len(job.prompt_ids)
            if tokens >= self.max_prefill_tokens:
                break
        self.metrics.queue_depth.set(self._queue.qsize())
        return jobs

    def _admit(self, jobs: list[Job]) -> RunningBatch | None:
        try:
            return self._runner.admit(jobs)
        except Exception as exc:  # a failing prefill fails only the jobs it was admitting
            self._fail(jobs, exc)
            return None

    def _step(self, batch: RunningBatch) -> RunningBatch | None:
        try:
            return self._runner.step(batch)
        except Exception as exc:  # a failing decode step fails the rows of this batch; the engine keeps serving
            self._fail([row.job for row in batch.rows], exc)
            return None

    def _fail(self, jobs: list[Job], exc: Exception) -> None:
        log.error("forward failed for %d rows", len(jobs), exc_info=exc)
        error = EngineError(f"the forward pass failed for this batch ({type(exc).__name__}); retry the request")
        for job in jobs:
            job.finish(ErrorEvent(error))
