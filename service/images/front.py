"""From an image request to engine jobs and back: adapter selection, one job per image, cancellation."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import io
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from lokr.batch import RowSpec

from ..disconnect import unless_gone
from ..engine import Engine
from ..errors import BadRequestError
from ..inference import Selection, select_adapters
from ..jobs import ErrorEvent, Event, FinishEvent, Job, PreviewEvent, SamplingParams
from ..metrics import Metrics
from ..registry import Registry
from .backend import (
    A1111_NAMES,
    OPENAI_NAMES,
    FieldNames,
    ImageBackend,
    check_spec,
    round_to_unit,
    size_unit,
)
from .init_image import decode_b64, open_image, pixels_for
from .inpaint import Repaint, mask_pixels, overlay
from .rows import ImageJob, ImageSpec, random_seed
from .samplers import Sampler, resolve
from .streaming import ImageStream, JobHooks

__all__ = ["A1111_NAMES", "OPENAI_NAMES", "FieldNames", "ImageFront", "image_b64", "seed_or_random"]

Disconnected = Callable[[], Awaitable[None]]  # returns when the client has gone away


_NO_TOKENS = SamplingParams(max_tokens=0)


class ImageFront:
    """Turns validated image requests into one engine job per image and gathers the PNGs."""

    def __init__(
        self,
        engine: Engine,
        backend: ImageBackend,
        registry: Registry,
        metrics: Metrics,
        base_name: str,
        max_n: int,
        max_queue: int,
    ) -> None:
        self.engine, self.backend, self.registry = engine, backend, registry
        self.metrics, self.base_name, self.max_n, self.max_queue = metrics, base_name, max_n, max_queue

    @property
    def default_size(self) -> tuple[int, int]:
        return self.backend.loaded.default_size

    def select(self, model: str | None, pairs: Sequence[tuple[str, float]]) -> Selection:
        """`model` = the base name (or None) or one adapter; `pairs` composes adapters on the base."""
        return select_adapters(model or self.base_name, pairs, set(self.registry.names()), self.base_name)

    def sampler(self, name: str | None, schedule: str | None) -> Sampler | None:
        """The sampler and schedule type a request names (None: the pipeline's own); a 400 for unknown ones."""
        loaded = self.backend.loaded
        return resolve(name, schedule, loaded.pipe.scheduler, loaded.ops.flow)

    def sampler_label(self, sampler: Sampler | None) -> tuple[str, str]:
        """`(sampler, schedule type)` as A1111's `info` reports them."""
        if sampler is not None:
            return sampler.name, sampler.schedule
        loaded = self.backend.loaded
        return ("Euler" if loaded.ops.flow else type(loaded.pipe.scheduler).__name__), "Automatic"

    def specs(self, spec: ImageSpec, n: int, names: FieldNames = OPENAI_NAMES, masked: bool = False) -> list[ImageSpec]:
        """Image k of a request gets seed `seed + k` (a random seed when none is given); checked for 400s, which
        name the request's own fields (`names`; `masked`: a picture and a mask will start them, `starting_from`).
        All `n` images must be able to wait in the queue at once (else the request could only ever get a 503,
        however often it is retried)."""
        limit = min(self.max_n, self.max_queue)
        if not 1 <= n <= limit:
            why = "LOKR_MAX_N" if limit == self.max_n else "--max-queue: the images the server queues at once"
            raise BadRequestError(
                f"{names.n} must be in [1, {limit}] on this server ({why}), got {n}", code="invalid_n"
            )
        check_spec(self.backend.loaded, spec, self.backend.max_pixels, names, masked)
        return [replace(spec, seed=spec.seed + k) for k in range(n)]

    def starting_images(self, files: Sequence[tuple[str, bytes]]) -> list[Any]:
        """img2img's starting images: `(field, file bytes)` pairs as RGB PIL images; a 400 naming the field for
        one that is not an image or is over the pixel limit (blocking: run it off the event loop)."""
        return [open_image(data, field, self.backend.max_pixels) for field, data in files]

    def output_size(self, image: Any, width: int | None, height: int | None) -> tuple[int, int]:
        """The size asked for, or what of it is missing from `image`'s own size rounded down to the size unit (on a
        pipeline that edits from a reference: the size it takes the picture at, `Family.reference_size`)."""
        loaded = self.backend.loaded
        if loaded.ops.edits_from_reference:
            own = loaded.ops.reference_size(image.size)
        else:
            own = round_to_unit(image.width, image.height, size_unit(loaded))
        return width or own[0], height or own[1]

    def strength(self, asked: float) -> float:
        """The share of the schedule an image from a picture runs: `asked`, or all of it on a pipeline that edits
        from the picture as a reference (Flux Kontext: strength does not apply)."""
        return 1.0 if self.backend.loaded.ops.edits_from_reference else asked

    def control_pixels(
        self, b64: str, size: tuple[int, int], field: str = "control_image", resize_mode: str = "default"
    ) -> Any:
        """A ControlNet's control image from base64 file bytes as the pipeline prepares it for an image of `size`
        (`control_image_processor`: resized as `resize_mode` says, diffusers' default a stretch; `(1, 3, H, W)`
        float32 in [0, 1]); a 400 naming `field` for one that is not an image, and on a pipeline without a
        ControlNet (blocking: run it off the event loop)."""
        loaded = self.backend.loaded
        if loaded.controlnet is None:
            raise BadRequestError(f"{field} needs a ControlNet pipeline (an SD or SDXL ControlNet pipeline dir); "
                                  "this one has none: leave it out", code="invalid_request")  # fmt: skip
        image = open_image(decode_b64(b64, field), field, self.backend.max_pixels)
        width, height = size
        processor = loaded.pipe.control_image_processor
        return processor.preprocess(image, height=height, width=width, resize_mode=resize_mode).to(torch.float32)

    def mask_image(self, data: bytes, field: str) -> Any:
        """An inpainting mask's file bytes as a PIL image in its own mode (alpha kept); a 400 as for a starting
        image (blocking: run it off the event loop)."""
        return open_image(data, field, self.backend.max_pixels, mode=None)

    def starting_from(
        self,
        specs: Sequence[ImageSpec],
        images: Sequence[Any],
        repaint: Repaint | None = None,
        resize: str = "default",
    ) -> list[ImageSpec]:
        """`specs` (checked, so their size is) with image k starting from `images[k % len(images)]`, resized to
        the spec's size (`resize`: `init_image.pixels_for`'s modes); with `repaint` (`inpaint.repaint_plan`), each
        inpainted within its mask (and with a crop, that region of the picture only). On a pipeline that edits from
        a reference (Flux Kontext), the picture is image k's reference, at `Family.reference_size` (blocking: run
        it off the event loop)."""
        loaded, size = self.backend.loaded, (specs[0].width, specs[0].height)
        if loaded.ops.edits_from_reference:  # checked: no mask
            sized = [(image, loaded.ops.reference_size(image.size)) for image in images]
            references = [pixels_for(loaded.pipe.image_processor, image, at, None, resize) for image, at in sized]
            return [replace(spec, reference=references[k % len(references)]) for k, spec in enumerate(specs)]
        crop = None if repaint is None else repaint.crop
        pixels = [pixels_for(loaded.pipe.image_processor, image, size, crop, resize) for image in images]
        mask = None if repaint is None else mask_pixels(repaint.mask, size, loaded.vae_scale_factor, crop, resize)
        return [replace(spec, init=pixels[k % len(pixels)], mask=mask) for k, spec in enumerate(specs)]

    def overlaid(self, pictures: Sequence[Any], images: Sequence[Any], repaint: Repaint) -> list[Any]:
        """ "Only masked" inpainting's answers: image k pasted into its crop of `images[k % len(images)]` where
        the mask repaints (blocking: run it off the event loop)."""
        processor = self.backend.loaded.pipe.image_processor
        return [overlay(processor, repaint, images[k % len(images)], p) for k, p in enumerate(pictures)]

    async def generate(
        self, specs: Sequence[ImageSpec], sel: Selection, disconnected: Disconnected, text_sel: Selection | None = None
    ) -> list[Any]:
        """PIL images in order; the first error fails the request; a client that leaves cancels every image.
        `text_sel`: the text encoders' adapters where they differ from the denoiser's `sel` (the same names)."""
        text_spec = None if text_sel is None else text_sel.spec
        tasks = [asyncio.ensure_future(self._one(spec, sel, text_spec)) for spec in specs]
        try:
            return await unless_gone(asyncio.gather(*tasks), disconnected, "its images were")
        finally:
            for task in tasks:  # each outcome read: no "exception was never retrieved"
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def stream(self, specs: Sequence[ImageSpec], sel: Selection, text_sel: Selection | None = None) -> ImageStream:
        """Start `specs` for a streamed answer: their previews and finished images as they come (`ImageStream`);
        `text_sel` as `generate`'s."""
        text_spec = None if text_sel is None else text_sel.spec
        return ImageStream(len(specs), lambda k, hooks: self._one(specs[k], sel, text_spec, hooks))

    async def _one(
        self, spec: ImageSpec, sel: Selection, text_spec: RowSpec = None, hooks: JobHooks | None = None
    ) -> Any:
        """Lease the adapters (bringing them back if needed) and run one image; the job co-holds the lease until
        the engine is done with its rows, also when the client has gone away. `hooks`: told when the job is
        launched and of each preview."""
        async with self.registry.lease(sel.names) as lease:
            holder: list[ImageJob] = []

            def make_job(sink: Callable[[Event], None]) -> Job:
                done = functools.partial(self._done, lease.hold(), sel.label)
                job = ImageJob([], _NO_TOKENS, sel.spec, sink, on_done=done, spec=spec, text_selection=text_spec)
                holder.append(job)
                return job

            async for event in self.engine.stream(make_job, None if hooks is None else hooks.launched):
                if isinstance(event, ErrorEvent):
                    raise event.error
                if isinstance(event, FinishEvent):
                    break
                if isinstance(event, PreviewEvent) and hooks is not None:
                    hooks.preview(event)
            return holder[0].image

    def _done(self, release: Callable[[], None], label: str, event: Event) -> None:
        """An image's last event (engine thread, client gone or not): give the lease back, count the image and
        its denoiser steps (a `FinishEvent`'s `completion_tokens`)."""
        release()
        if isinstance(event, FinishEvent):
            if event.reason == "stop":
                self.metrics.images.labels(label).inc()
            self.metrics.denoiser_steps.labels(label).inc(event.completion_tokens)


def image_b64(image: Any, output_format: str = "png", compression: int | None = None) -> str:
    """A PIL image as base64 text of a PNG (lossless), JPEG or WebP file; `compression` 0-100 is OpenAI's
    `output_compression` (0: best quality; JPEG / WebP only, 100 - compression is their quality)."""
    buf = io.BytesIO()
    if output_format == "png":
        image.save(buf, format="PNG")
    else:
        quality = 100 - (compression if compression is not None else 25)  # PIL's default quality is 75
        image.save(buf, format="JPEG" if output_format == "jpeg" else "WEBP", quality=quality)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def seed_or_random(seed: int | None) -> int:
    return random_seed() if seed is None or seed < 0 else seed
