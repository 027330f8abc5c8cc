"""Torch work off the engine thread runs in a thread that exits when it is done.

torch's CPU builds parallelise ops with libgomp, which keeps a team of worker threads for every thread that
ever ran a parallel region, until that thread exits. Once the process holds more such threads than the machine
has CPUs, libgomp stops spinning between parallel regions (100 spins instead of 300,000) and every region of
the engine's forward starts with a futex wake-up of its workers. Loading the model on the main thread was
enough: decode steps ran 35% slower on 2 cores and the second core sat half idle. A thread that exits frees
its team, so model loads and adapter file reads run in one.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

__all__ = ["run_in_scratch_thread", "torch_threads"]

T = TypeVar("T")


def run_in_scratch_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` in a new thread, joined before returning; its result, or its exception re-raised."""
    outcome: list[Any] = []

    def body() -> None:
        try:
            outcome.append((True, fn(*args, **kwargs)))
        except BaseException as exc:  # handed to the caller as is
            outcome.append((False, exc))

    thread = threading.Thread(target=body, name=f"lokr-scratch-{getattr(fn, '__name__', 'call')}", daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to `n` inside the block (process-wide), restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
