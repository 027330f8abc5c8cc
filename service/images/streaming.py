"""A streamed image request (OpenAI's `stream: true`): its images' previews and finished pictures as they come."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..jobs import Job, PreviewEvent

__all__ = ["ImageStream", "ImageUpdate", "JobHooks"]


@dataclass(frozen=True)
class ImageUpdate:
    """Image `image` of the request (0-based): its preview number `preview`, or (None) its finished picture."""

    image: int
    picture: Any
    preview: int | None = None


@dataclass(frozen=True)
class JobHooks:
    """What one image's job tells its stream: `launched(job)` once submitted (or refused), `preview(event)`."""

    launched: Callable[[Job], None]
    preview: Callable[[PreviewEvent], None]


class ImageStream:
    """`count` images run by `run(k, hooks)` (each returns its finished picture), started at once.

    `admitted()` returns once the engine took every image, or raises what refused one (so a full queue or a lost
    adapter is an HTTP error before the answer starts); `updates()` yields `ImageUpdate`s in the order they come and
    raises the first failure; `close()` cancels every image still running (a client gone, the answer done)."""

    def __init__(self, count: int, run: Callable[[int, JobHooks], Awaitable[Any]]) -> None:
        loop = asyncio.get_running_loop()
        self.count = count
        self._updates: asyncio.Queue[ImageUpdate | BaseException] = asyncio.Queue()
        # per image: None once launched, or the error that refused it
        self._admission: list[asyncio.Future[BaseException | None]] = [loop.create_future() for _ in range(count)]
        self._tasks = [asyncio.ensure_future(self._image(k, run)) for k in range(count)]

    async def admitted(self) -> None:
        for future in self._admission:
            error = await future
            if error is not None:
                raise error

    async def updates(self) -> AsyncIterator[ImageUpdate]:
        finished = 0
        while finished < self.count:
            update = await self._updates.get()
            if isinstance(update, BaseException):
                raise update
            finished += update.preview is None
            yield update

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def _image(self, k: int, run: Callable[[int, JobHooks], Awaitable[Any]]) -> None:
        admission = self._admission[k]

        def launched(job: Job) -> None:
            if not job.done:  # a refused job is done already; its error ends `run` below
                _settle(admission, None)

        def preview(event: PreviewEvent) -> None:
            self._updates.put_nowait(ImageUpdate(k, event.image, event.index))

        try:
            picture = await run(k, JobHooks(launched, preview))
        except asyncio.CancelledError:
            _settle(admission, asyncio.CancelledError())
            raise
        except Exception as exc:
            _settle(admission, exc)
            self._updates.put_nowait(exc)
            return
        _settle(admission, None)
        self._updates.put_nowait(ImageUpdate(k, picture))


def _settle(future: asyncio.Future[BaseException | None], value: BaseException | None) -> None:
    with contextlib.suppress(asyncio.InvalidStateError):
        future.set_result(value)
