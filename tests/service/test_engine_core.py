"""The model-agnostic engine core: commands run on the worker between steps, never during one; failures stay
contained; drain waits for every submitted job. A fake backend records what ran, and when."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from lokr.growth import growing_in_place
from service.engine import Engine
from service.errors import NotReadyError
from service.jobs import ErrorEvent, Event, FinishEvent, Job, SamplingParams
from service.metrics import Metrics


class FakeBackend:
    """Each job runs `steps` steps; `gate` (when set) holds a step open until the test releases it."""

    kind = "fake"

    def __init__(self, steps: int = 3, room: int = 4) -> None:
        self.model = torch.nn.Linear(2, 2)
        self.device = torch.device("cpu")
        self.steps, self.room = steps, room
        self.rows: dict[int, int] = {}  # job id -> steps left
        self.by_id: dict[int, Job] = {}
        self.log: list[str] = []
        self.in_step = False
        self.entered = threading.Event()
        self.gate: threading.Event | None = None
        self.explode = False
        self.refuse: set[int] = set()  # job ids whose offer raises

    def check(self, job: Job) -> None:
        pass

    def offer(self, job: Job) -> bool:
        if job.id in self.refuse:
            raise ValueError("cannot take this row")
        if len(self.rows) >= self.room:
            return False
        self.rows[job.id], self.by_id[job.id] = self.steps, job
        return True

    def step(self) -> None:
        self.in_step = True
        self.log.append("step")
        self.entered.set()
        try:
            if self.gate is not None:
                assert self.gate.wait(30)
            if self.explode:
                raise RuntimeError("boom")
            for jid in list(self.rows):
                self.rows[jid] -= 1
                if self.rows[jid] == 0:
                    del self.rows[jid]
                    self.by_id.pop(jid).finish(FinishEvent("length", 1, self.steps))
        finally:
            self.in_step = False

    def jobs(self) -> list[Job]:
        return [self.by_id[j] for j in self.rows]

    def clear(self) -> None:
        self.rows.clear()
        self.by_id.clear()


def _job(events: list[Event], done: threading.Event | None = None) -> Job:
    def sink(event: Event) -> None:
        events.append(event)
        if done is not None and isinstance(event, (FinishEvent, ErrorEvent)):
            done.set()

    return Job([1], SamplingParams(max_tokens=1), None, sink)


@pytest.fixture
def engine():  # type: ignore[no-untyped-def]
    backend = FakeBackend()
    eng = Engine(backend, Metrics(), max_queue=8)
    eng.start()
    yield eng
    backend.gate = None
    eng.stop()


def test_commands_run_on_the_worker_between_steps(engine: Engine) -> None:
    backend: FakeBackend = engine.backend  # type: ignore[assignment]
    backend.gate = threading.Event()
    done = threading.Event()
    engine.submit(_job([], done))
    assert backend.entered.wait(30)  # a step is open...
    seen: list[tuple[str, bool, bool]] = []

    def command(model: Any) -> str:
        seen.append((threading.current_thread().name, backend.in_step, growing_in_place()))
        return "ok"

    future = engine.call(command)
    assert not future.done()  # ...so the command waits for it to end
    backend.gate.set()
    assert future.result(timeout=30) == "ok"
    # No forward runs meanwhile (steps run on this thread only), so the banks of its attaches may grow in place.
    assert seen == [("lokr-engine", False, True)]
    assert not growing_in_place()
    assert done.wait(30)


def test_commands_queued_back_to_back_alternate_with_steps() -> None:
    """Adapters loaded one after another (each load queues its attach as the previous one runs) must not hold the
    running rows: a command queued while commands run waits for the next step. They used to run on until none was
    queued, so 200 loads froze every stream for the whole 13 s they took."""
    backend, metrics = FakeBackend(steps=50), Metrics()
    engine = Engine(backend, metrics, max_queue=8)
    engine.start()
    try:
        done = threading.Event()
        backend.gate = threading.Event()
        engine.submit(_job([], done))
        assert backend.entered.wait(30)
        at_step: list[int] = []
        futures: list[Any] = []

        def attach(model: Any, left: int) -> None:
            at_step.append(backend.log.count("step"))
            if left:  # the next load's attach arrives (from its own thread) while this one runs
                loader = threading.Thread(target=lambda: futures.append(engine.call(lambda m: attach(m, left - 1))))
                loader.start()
                loader.join()

        futures.append(engine.call(lambda m: attach(m, 3)))
        backend.gate.set()
        assert done.wait(30)
        for future in list(futures):
            future.result(timeout=30)
        assert len(at_step) == 4 and at_step == sorted(set(at_step)), at_step  # one per step, rows still running
        assert backend.log.count("step") == 50
        seconds = metrics.registry.get_sample_value
        busy = {w: seconds("lokr_engine_seconds_total", {"work": w}) for w in ("step", "command")}
        assert all(s is not None and s > 0 for s in busy.values()), busy  # on /metrics
    finally:
        backend.gate = None
        engine.stop()


def test_command_errors_reach_the_caller_and_the_engine_keeps_serving(engine: Engine) -> None:
    def bad(model: Any) -> None:
        raise ValueError("bad command")

    with pytest.raises(ValueError, match="bad command"):
        engine.run(bad)
    done = threading.Event()
    events: list[Event] = []
    engine.submit(_job(events, done))
    assert done.wait(30) and isinstance(events[-1], FinishEvent)


def test_failed_step_fails_its_rows_only(engine: Engine) -> None:
    backend: FakeBackend = engine.backend  # type: ignore[assignment]
    backend.explode = True
    failed, events = threading.Event(), []
    engine.submit(_job(events, failed))
    assert failed.wait(30) and isinstance(events[-1], ErrorEvent)
    backend.explode = False
    done, later = threading.Event(), []
    engine.submit(_job(later, done))
    assert done.wait(30) and isinstance(later[-1], FinishEvent)


def test_a_job_the_backend_cannot_take_fails_alone(engine: Engine) -> None:
    """An error while admitting a row fails that job and is counted out; the worker thread lives on."""
    backend: FakeBackend = engine.backend  # type: ignore[assignment]
    failed, events = threading.Event(), []
    bad = _job(events, failed)
    backend.refuse.add(bad.id)
    engine.submit(bad)
    assert failed.wait(30) and isinstance(events[-1], ErrorEvent)
    done, later = threading.Event(), []
    engine.submit(_job(later, done))
    assert done.wait(30) and isinstance(later[-1], FinishEvent)
    assert engine.drain(30) is True


def test_drain_waits_for_a_running_batch(engine: Engine) -> None:
    backend: FakeBackend = engine.backend  # type: ignore[assignment]
    backend.gate = threading.Event()
    done = threading.Event()
    engine.submit(_job([], done))
    assert backend.entered.wait(30)  # the queue is empty, the row is inside a step
    assert engine.drain(0.05) is False  # not idle: a job is outstanding
    backend.gate.set()
    assert engine.drain(30) is True and done.is_set()


def test_stop_fails_waiting_jobs_and_commands() -> None:
    backend = FakeBackend(room=0)  # nothing is ever taken: jobs wait in the queue
    engine = Engine(backend, Metrics(), max_queue=8)
    engine.start()
    events: list[Event] = []
    engine.submit(_job(events))
    engine.stop()
    assert isinstance(events[-1], ErrorEvent) and isinstance(events[-1].error, NotReadyError)


def test_call_runs_inline_without_a_worker() -> None:
    engine = Engine(FakeBackend(), Metrics())
    assert engine.run(lambda model: threading.current_thread() is threading.main_thread())


def test_a_refused_launch_is_counted_out_once() -> None:
    """A job refused because the queue is full finishes with its error, and `drain` still sees the engine idle
    once the queued job is done (it used to count the refused job out twice, so drain waited its whole grace)."""
    backend = FakeBackend(room=0)  # nothing is taken yet: the first job holds the only queue place
    engine = Engine(backend, Metrics(), max_queue=1)
    engine.start()
    try:
        first: list[Event] = []
        engine.submit(_job(first))
        refused: list[Event] = []
        engine.launch(_job(refused))
        assert isinstance(refused[-1], ErrorEvent)
        backend.gate = threading.Event()
        backend.room = 4
        assert backend.entered.wait(30)  # the first job is in a step: one job outstanding, not zero
        assert engine.drain(0.05) is False
        backend.gate.set()
        assert engine.drain(30) is True
        assert isinstance(first[-1], FinishEvent)
    finally:
        backend.gate = None
        engine.stop()


def test_a_job_cancelled_while_waiting_behind_a_full_batch_finishes_at_once() -> None:
    """Its client went away while the backend had no room: it finishes on the engine's next pass (so its adapter
    lease goes back now), while the job ahead of it keeps its place."""
    backend = FakeBackend(room=1)
    engine = Engine(backend, Metrics(), max_queue=8)
    engine._accepting = True  # driven by hand, without a worker: each call below is one pass of its loop
    events: dict[str, list[Event]] = {"running": [], "held": [], "gone": [], "next": []}
    done: dict[str, bool] = {}
    jobs = {name: _job(events[name]) for name in events}
    for name, job in jobs.items():
        job.on_done = lambda event, name=name: done.__setitem__(name, True)
        engine.submit(job)
    engine._offer_waiting()  # "running" takes the only room; "held" waits, "gone" and "next" queue behind it
    jobs["gone"].cancelled.set()
    engine._offer_waiting()
    assert [type(e) for e in events["gone"]] == [FinishEvent] and events["gone"][0].reason == "cancelled"
    assert done == {"gone": True} and engine._held is jobs["held"] and len(engine._queue) == 1
    backend.room = 4
    engine._offer_waiting()
    assert sorted(backend.by_id) == sorted(jobs[n].id for n in ("running", "held", "next"))


def test_stop_fails_the_rows_a_drain_left_running() -> None:
    """A drain that ran out of time, then `stop`: the rows still in the backend get a 503, so every request ends
    and gives its lease back."""
    backend = FakeBackend(steps=10**9)  # never finishes by itself
    engine = Engine(backend, Metrics(), max_queue=8)
    engine.start()
    events: list[Event] = []
    engine.submit(_job(events))
    assert backend.entered.wait(30)
    assert engine.drain(0.01) is False
    engine.stop()
    assert len(events) == 1 and isinstance(events[0], ErrorEvent) and isinstance(events[0].error, NotReadyError)
    assert backend.jobs() == []


def test_a_command_racing_stop_is_run_or_refused_never_lost() -> None:
    """`call` between its stop check and queueing its command, `stop` running meanwhile on another thread: the
    command must still run or fail (a caller waits on it), never sit in a queue nobody reads."""
    engine = Engine(FakeBackend(), Metrics())
    engine.start()
    worker = engine._thread
    assert worker is not None
    progress, stopped = threading.Event(), threading.Event()  # `stop` went as far as it could now / returned
    caller = threading.current_thread()

    class Signalling:  # the engine's stop lock, telling when `stop` (not `call`) asks for it
        def __init__(self, lock: Any) -> None:
            self.lock = lock

        def __enter__(self) -> None:
            if threading.current_thread() is not caller:
                progress.set()
            self.lock.acquire()

        def __exit__(self, *exc: object) -> None:
            self.lock.release()

    class RacingWorker:  # the real worker; the liveness check `call` makes lets `stop` run first, once
        raced = False

        def is_alive(self) -> bool:
            if self.raced:
                return worker.is_alive()
            self.raced = True
            threading.Thread(target=lambda: (engine.stop(), stopped.set(), progress.set())).start()
            assert progress.wait(30)  # before the fix `stop` ran to its end here, before the command was queued
            return True  # it was alive when checked

        def join(self, timeout: float | None = None) -> None:
            worker.join(timeout)

    engine._stopping = Signalling(getattr(engine, "_stopping", threading.Lock()))  # type: ignore[assignment]
    engine._thread = RacingWorker()  # type: ignore[assignment]
    future = engine.call(lambda model: "ran")
    assert stopped.wait(30)
    assert future.done()
    if future.exception() is not None:
        assert isinstance(future.exception(), NotReadyError)


def test_stop_ends_every_request_while_a_long_forward_still_runs() -> None:
    """Shutdown must not wait on a forward that takes minutes: the request gets its 503 once `stop` gave up
    waiting for the step, and the step finishing later changes nothing."""
    backend = FakeBackend()
    backend.gate = threading.Event()  # the step never ends until the test lets it
    engine = Engine(backend, Metrics(), max_queue=8)
    engine.start()
    events: list[Event] = []
    engine.submit(_job(events))
    assert backend.entered.wait(30)
    engine.stop(join_s=0.01)
    assert len(events) == 1 and isinstance(events[0], ErrorEvent) and isinstance(events[0].error, NotReadyError)
    backend.gate.set()
    assert engine._thread is not None
    engine._thread.join(30)
    assert len(events) == 1


def test_drain_counts_its_grace_from_when_accepting_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The HTTP server's graceful wait and the engine's drain share one grace: a drain after the grace has passed
    returns at once."""
    now = [100.0]
    monkeypatch.setattr("service.engine.time.monotonic", lambda: now[0])
    backend = FakeBackend()
    backend.gate = threading.Event()
    engine = Engine(backend, Metrics(), max_queue=8)
    engine.start()
    try:
        engine.submit(_job([]))
        assert backend.entered.wait(30)
        engine.stop_accepting()  # SIGTERM
        now[0] += 30.0  # the HTTP server waited out its connections meanwhile
        waited = threading.Event()
        threading.Thread(target=lambda: (engine.drain(30.0), waited.set()), daemon=True).start()
        assert waited.wait(10)  # no grace left: it does not wait another 30 s
    finally:
        backend.gate.set()
        engine.stop()
