"""Engine -> event-loop hand-over: events from the engine thread wait for the step's flush, in order."""

from __future__ import annotations

import asyncio
import threading

from service.jobs import FinishEvent
from service.outbox import Outbox


def _event(i: int) -> FinishEvent:
    return FinishEvent("length", i, i)


def test_owner_events_wait_for_flush_and_keep_their_order() -> None:
    async def scenario() -> list[int]:
        loop = asyncio.get_running_loop()
        got: list[int] = []
        outbox = Outbox()
        flushed = threading.Event()

        def engine() -> None:
            outbox.bind()
            for i in range(5):
                outbox.post(loop, lambda e: got.append(e.prompt_tokens), _event(i))
            loop.call_soon_threadsafe(lambda: got.append(-1))  # runs before anything posted is delivered
            outbox.flush()
            flushed.set()

        thread = threading.Thread(target=engine)
        thread.start()
        await asyncio.to_thread(flushed.wait)
        await asyncio.sleep(0.01)
        thread.join()
        return got

    assert asyncio.run(scenario()) == [-1, 0, 1, 2, 3, 4]


def test_events_from_other_threads_go_out_at_once() -> None:
    async def scenario() -> list[int]:
        loop = asyncio.get_running_loop()
        got: list[int] = []
        outbox = Outbox()
        outbox.bind()  # this (loop) thread owns it: a post from another thread is not held back
        await asyncio.to_thread(outbox.post, loop, lambda e: got.append(e.prompt_tokens), _event(7))
        await asyncio.sleep(0.01)
        return got

    assert asyncio.run(scenario()) == [7]


def test_flush_after_the_loop_closed_is_harmless() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    outbox = Outbox()
    outbox.bind()
    outbox.post(loop, lambda e: None, _event(0))
    outbox.flush()  # nobody listens any more: dropped, no exception
