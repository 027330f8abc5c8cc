"""`run_in_scratch_thread`: results and errors come back, a parallel torch op leaves no OpenMP team behind, and
the model loads (CLI and app lifespan) and adapter file reads run in one."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

import lokr
from service import app as app_module
from service import server
from service.engine import Engine
from service.metrics import Metrics
from service.registry import Registry
from service.scratch import run_in_scratch_thread, torch_threads
from service.settings import Settings

from .test_engine_core import FakeBackend

TASKS = Path("/proc/self/task")


def test_returns_the_result_from_another_thread() -> None:
    here = threading.get_ident()
    assert run_in_scratch_thread(lambda a, b=0: (a + b, threading.get_ident()), 2, b=3)[0] == 5
    assert run_in_scratch_thread(threading.get_ident) != here


def test_reraises_the_callers_exception_itself() -> None:
    error = KeyError("boom")

    def fail() -> None:
        raise error

    with pytest.raises(KeyError) as caught:
        run_in_scratch_thread(fail)
    assert caught.value is error


def _parallel_op() -> None:
    """One op big enough for at::parallel_for to open an OpenMP region."""
    torch.ones(1 << 20).exp_()


def _os_threads() -> set[int]:
    """This process's OS thread ids (threads that are exiting may still be listed; only new ids are compared)."""
    return {int(tid) for tid in os.listdir(TASKS)}


def _settle(before: set[int]) -> set[int]:
    """The thread ids not in `before` once none are left (workers exit asynchronously), or after 10 s."""
    deadline = time.monotonic() + 10
    while (new := _os_threads() - before) and time.monotonic() < deadline:
        time.sleep(0.02)
    return new


@pytest.fixture
def two_torch_threads() -> Iterator[None]:
    if not TASKS.is_dir() or not torch.backends.openmp.is_available():
        pytest.skip("needs Linux /proc and torch built with OpenMP")
    with torch_threads(2):
        yield


@pytest.mark.usefixtures("two_torch_threads")
def test_a_thread_that_stays_keeps_its_openmp_team() -> None:
    """The control: the measure below sees a team that a living thread keeps."""
    ran, release = threading.Event(), threading.Event()

    def stay() -> None:
        _parallel_op()
        ran.set()
        release.wait()

    before = _os_threads()
    thread = threading.Thread(target=stay)
    thread.start()
    ran.wait()
    try:
        new = _os_threads() - before
        assert thread.native_id in new and len(new) == 2  # the thread and its OpenMP worker
    finally:
        release.set()
        thread.join()


@pytest.mark.usefixtures("two_torch_threads")
def test_a_scratch_thread_leaves_no_openmp_team() -> None:
    before = _os_threads()
    run_in_scratch_thread(_parallel_op)
    assert _settle(before) == set()


class _Stop(Exception):
    """Raised by a stand-in once it has recorded its thread."""


def _recording(seen: list[threading.Thread]) -> Any:
    def record(*args: Any, **kwargs: Any) -> None:
        seen.append(threading.current_thread())
        raise _Stop

    return record


def _ran_in_a_scratch_thread(seen: list[threading.Thread]) -> bool:
    (thread,) = seen
    thread.join(10)
    return thread is not threading.current_thread() and thread.name.startswith("lokr-scratch") and not thread.is_alive()


def test_the_cli_loads_the_model_in_a_scratch_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[threading.Thread] = []
    monkeypatch.setattr(server, "load_model", _recording(seen))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        with pytest.raises(_Stop):
            server.serve(Settings(model="unused", served_model_name="tiny", device="cpu"), sock)
    assert _ran_in_a_scratch_thread(seen)


def test_the_app_lifespan_loads_the_model_in_a_scratch_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[threading.Thread] = []
    monkeypatch.setattr(app_module, "load_model", _recording(seen))
    with pytest.raises(_Stop), TestClient(app_module.create_app(Settings(model="unused", served_model_name="t"))):
        pass
    assert _ran_in_a_scratch_thread(seen)


def test_adapter_files_are_read_in_a_scratch_thread(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[threading.Thread] = []
    monkeypatch.setattr(lokr, "read_adapter", _recording(seen))
    registry = Registry(Engine(FakeBackend(), Metrics()), Metrics(), dtype=None, max_bytes=1 << 20)
    with pytest.raises(_Stop):
        registry.load("a", tmp_path)
    assert _ran_in_a_scratch_thread(seen) and registry.names() == []
