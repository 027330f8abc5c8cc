"""The engine: the only writer of the model. One worker thread alternates between applying adapter commands
(attach / offload / restore / delete, sent by the registry) and running one step of the backend's batch;
so a forward never sees an adapter appear or vanish mid-flight, and nothing else mutates the model.

What a step is belongs to the backend (`Backend`): a decode step of a causal LM, a denoising step of a
diffusion pipeline. The engine only queues jobs, offers them to the backend between steps, runs commands,
isolates failures and drains.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

import torch

import lokr

from .errors import NotReadyError, OverloadedError
from .jobs import ErrorEvent, Event, FinishEvent, Job, fail_jobs
from .metrics import Metrics
from .outbox import Outbox
from .waiting import WaitQueue

__all__ = ["Backend", "Engine"]

log = logging.getLogger("lokr_serve.engine")
T = TypeVar("T")


class Backend(Protocol):
    """One kind of model behind the engine. Every method but `check` runs on the engine thread."""

    kind: str  # "causal-lm" | "image"

    @property
    def model(self) -> Any:
        """The nn.Module adapters attach to (for a pipeline: a container of its components)."""

    @property
    def device(self) -> torch.device: ...

    def check(self, job: Any) -> None:
        """Raise a 4xx `ServiceError` if `job` can never run (too long, bad size); any thread."""

    def offer(self, job: Any) -> bool:
        """Take `job` into the next step if there is room now; False leaves it waiting in the queue."""

    def step(self) -> None:
        """One forward over the running rows (offered jobs join first); emits events; done rows leave."""

    def jobs(self) -> list[Any]:
        """Every job offered or running (the engine fails them if `step` raises)."""

    def clear(self) -> None:
        """Forget every row (after a failed step)."""


class Engine:
    """Owns the model through `backend`; one worker thread runs steps and commands in turn."""

    def __init__(self, backend: Backend, metrics: Metrics, max_queue: int = 256) -> None:
        self.backend = backend
        self.metrics = metrics
        self._queue: WaitQueue[Job] = WaitQueue(max_queue)
        self._held: Job | None = None  # taken from the queue but not yet accepted by the backend
        self._commands: collections.deque[tuple[Callable[[Any], Any], Future[Any]]] = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._stopping = threading.Lock()  # `stop` against `call`: a command is either queued before or refused
        self._accepting = False
        self._closing_since: float | None = None  # when accepting stopped (`time.monotonic`): drains share the grace
        self._outstanding = 0  # jobs submitted and not yet finished (what `drain` waits for)
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None
        self._outbox = Outbox()  # events leave once per step, not once per row
        self._step_s = 0.0  # recent steps' wall time (moving average): commands' share between two steps
        self._busy = {work: metrics.engine_seconds.labels(work=work) for work in ("step", "command")}

    # ---------------------------------------------------------------------------------- lifecycle
    @property
    def model(self) -> Any:
        return self.backend.model

    @property
    def device(self) -> torch.device:
        return self.backend.device

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
        if self._closing_since is None:
            self._closing_since = time.monotonic()

    def drain(self, grace_s: float) -> bool:
        """Stop accepting and wait for every submitted job to finish, until `grace_s` after accepting stopped (the
        HTTP server's own graceful wait came out of the same grace); True if all did."""
        self.stop_accepting()
        left = grace_s - (time.monotonic() - (self._closing_since or 0.0))
        with self._idle:
            return self._idle.wait_for(lambda: self._outstanding == 0, timeout=max(0.0, left))

    def stop(self, join_s: float = 30.0) -> None:
        """Stop the worker (waiting up to `join_s` for its step to end); jobs still waiting or running (a drain that
        ran out of time) and commands not yet run fail with a 503, so every request ends and gives its leases back,
        even while a long forward still runs."""
        with self._stopping:
            self._accepting = False
            self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=join_s)
        shutdown = NotReadyError("the server is shutting down")
        waiting = [self._held] if self._held is not None else []
        waiting.extend(self._queue.take_all())
        waiting.extend(self.backend.jobs())  # finishing twice is a no-op, should the step still running end
        if self._thread is None or not self._thread.is_alive():  # else that step still owns the rows
            self.backend.clear()
        for job in waiting:
            job.finish(ErrorEvent(shutdown))
        while self._commands:
            _, future = self._commands.popleft()
            future.set_exception(shutdown)

    # ---------------------------------------------------------------------------------- commands
    def call(self, fn: Callable[[Any], T]) -> Future[T]:
        """Run `fn(model)` on the engine thread between two steps; the future holds its result or error.

        Runs at once, on the calling thread, when no worker runs yet (start-up, tests) or when called from
        the worker itself; fails with `NotReadyError` once the engine is stopped.
        """
        future: Future[T] = Future()
        with self._stopping:
            if self._stop.is_set():  # after `stop` nothing may touch the model, not even inline
                future.set_exception(NotReadyError("the server is shutting down"))
                return future
            worker = self._thread
            inline = worker is None or not worker.is_alive() or threading.current_thread() is worker
            if not inline:
                self._commands.append((fn, future))
        if inline:
            _run_into(future, fn, self.backend.model)
        else:
            self._wake.set()
        return future

    def run(self, fn: Callable[[Any], T]) -> T:
        """`call(fn)` and wait for it (from any thread but the event loop's)."""
        return self.call(fn).result()

    # ---------------------------------------------------------------------------------- submit
    def submit(self, job: Job) -> None:
        if not self._accepting:
            raise NotReadyError("the server is not accepting requests (starting or shutting down)")
        self.backend.check(job)
        done = self._track(job)
        if not self._queue.put(job):
            job.on_done = done  # never queued: its caller finishes it, and that must not count it out again
            self._untrack()
            raise OverloadedError(f"the request queue is full ({self._queue.maxsize} waiting); retry after a moment")
        self.metrics.queue_depth.set(len(self._queue))
        self._wake.set()

    def _track(self, job: Job) -> Callable[[Event], None]:
        """Count `job` in until it finishes; returns its own `on_done` (the one wrapped)."""
        done = job.on_done

        def on_done(event: Event) -> None:
            try:
                done(event)
            finally:
                self._untrack()

        job.on_done = on_done
        with self._idle:
            self._outstanding += 1
        return done

    def _untrack(self) -> None:
        with self._idle:
            self._outstanding -= 1
            if self._outstanding == 0:
                self._idle.notify_all()

    def sink_to(self, deliver: Callable[[Event], None]) -> Callable[[Event], None]:
        """A job sink that runs `deliver(event)` on the calling event loop's thread (call it on that loop).

        Events leave the engine thread through the outbox: one loop wake-up per step carries every row's.
        """
        loop = asyncio.get_running_loop()
        post = self._outbox.post
        return lambda event: post(loop, deliver, event)

    def launch(self, job: Job) -> None:
        """`submit`, but a refusal (overloaded, not ready, too long) becomes the job's only event."""
        try:
            self.submit(job)
        except Exception as exc:
            job.finish(ErrorEvent(exc))

    async def stream(
        self, make_job: Callable[[Callable[[Event], None]], Job], launched: Callable[[Job], None] | None = None
    ) -> AsyncIterator[Event]:
        """Submit a job and yield its events; leaving early (client gone) cancels the row. `launched(job)` runs once
        the job was submitted (or refused: then `job.done` and its error is the first event)."""
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = make_job(self.sink_to(events.put_nowait))
        self.launch(job)
        if launched is not None:
            launched(job)
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
        """Commands, then admission, then one step; sleeps only while there is nothing to do."""
        self._outbox.bind()
        try:
            while not self._stop.is_set():
                self._run_commands()
                self._offer_waiting()
                if not self.backend.jobs():
                    self._outbox.flush()
                    self._wake.wait(timeout=0.05)
                    self._wake.clear()
                    continue
                self._step()
                self._outbox.flush()
        finally:
            self._outbox.flush()

    def _run_commands(self) -> None:
        """The commands queued now, in order. While rows run, stop once they took about one step's time (the
        first always runs): adapters loaded back to back then alternate with steps instead of stalling them."""
        if not self._commands:
            return
        budget = self._step_s if self.backend.jobs() else float("inf")
        started = time.perf_counter()
        for _ in range(len(self._commands)):  # not those queued meanwhile
            fn, future = self._commands.popleft()
            if future.set_running_or_notify_cancel():
                _run_into(future, fn, self.backend.model)
            if time.perf_counter() - started >= budget:
                break
        self._busy["command"].inc(time.perf_counter() - started)

    def _offer_waiting(self) -> None:
        """Offer queued jobs to the backend until it has no room; cancelled ones finish here, also those still
        waiting behind a job the backend has no room for (their leases go back now, not when admitted)."""
        while True:
            job = self._held
            self._held = None
            if job is None:
                job = self._queue.take()
                if job is None:
                    break
            if job.cancelled.is_set():
                job.finish_cancelled()
                continue
            try:
                taken = self.backend.offer(job)
            except Exception as exc:  # a job the backend cannot take fails alone; the worker keeps serving
                job.finish(ErrorEvent(exc))
                continue
            if not taken:
                self._held = job
                break
        for gone in self._queue.take_cancelled():
            gone.finish_cancelled()
        self.metrics.queue_depth.set(len(self._queue) + (self._held is not None))

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            with lokr.parameters_unwritten():  # the server writes adapters only through lokr (attach, restore)
                self.backend.step()
        except Exception as exc:  # a failing step fails the rows it held; the engine keeps serving
            fail_jobs(self.backend.jobs(), exc)
            self.backend.clear()
        took = time.perf_counter() - started
        self._step_s = took if not self._step_s else 0.8 * self._step_s + 0.2 * took
        self._busy["step"].inc(took)


def _run_into(future: Future[T], fn: Callable[[Any], T], model: Any) -> None:
    """`fn(model)` into `future`. Forwards run on the engine thread only, so the banks of attaches grow in place."""
    try:
        with lokr.grow_in_place():
            result = fn(model)
        future.set_result(result)
    except BaseException as exc:
        future.set_exception(exc)
