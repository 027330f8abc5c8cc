"""`run_in_scratch_thread`: results and errors come back, and a parallel torch op leaves no OpenMP team behind."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from service.scratch import run_in_scratch_thread, torch_threads

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


def _os_threads() -> int:
    return len(os.listdir(TASKS))


def _settle(expected: int) -> int:
    """The OS thread count once it reaches `expected` (workers exit asynchronously), or after 10 s."""
    deadline = time.monotonic() + 10
    while (n := _os_threads()) != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return n


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
        assert _os_threads() == before + 2  # the thread and its OpenMP worker
    finally:
        release.set()
        thread.join()


@pytest.mark.usefixtures("two_torch_threads")
def test_a_scratch_thread_leaves_no_openmp_team() -> None:
    before = _os_threads()
    run_in_scratch_thread(_parallel_op)
    assert _settle(before) == before
