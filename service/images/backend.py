"""`ImageBackend`: the engine's backend for diffusion pipelines. A step = one denoiser forward per image size
(and text length: `Family.forwards`).

Images join at any step (their prompts are encoded together first), leave when their last timestep is
done (decoded together), and cancelled ones leave before the next forward.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..errors import BadRequestError
from ..jobs import FinishEvent, PreviewEvent, fail_jobs
from ..metrics import Metrics
from . import steps
from .load import LoadedPipeline
from .rows import ImageJob, ImageSpec, Row, start_row

__all__ = [
    "A1111_NAMES", "HIRES_NAMES", "MAX_PIXELS", "MAX_STEPS", "OPENAI_NAMES", "FieldNames", "ImageBackend", "Progress",
    "check_spec", "round_to_unit", "size_unit",
]  # fmt: skip

log = logging.getLogger("lokr_serve.images")
MAX_PIXELS = 2048 * 2048
MAX_STEPS = 200


@dataclass(frozen=True)
class FieldNames:
    """What a route calls the image count, the step count and img2img's strength, for its 400s."""

    n: str
    steps: str
    strength: str
    clip_skip: str
    clip_skip_offset: int = 0  # A1111 counts CLIP skip from 1 (1: the last layer), diffusers from 0
    guidance: str = "guidance_scale"

    def clip_skip_value(self, clip_skip: int) -> int:
        return clip_skip + self.clip_skip_offset


OPENAI_NAMES = FieldNames("n", "num_inference_steps", "strength", "clip_skip")
A1111_NAMES = FieldNames(
    "batch_size x n_iter", "steps", "denoising_strength", "override_settings.CLIP_stop_at_last_layers", 1, "cfg_scale"
)
HIRES_NAMES = replace(A1111_NAMES, steps="hr_second_pass_steps (or steps)")


def size_unit(loaded: LoadedPipeline) -> int:
    """What image widths and heights must be multiples of: 8 and twice the VAE factor (latents 2x2-packable)."""
    return max(8, loaded.vae_scale_factor * 2)


def round_to_unit(width: int, height: int, unit: int) -> tuple[int, int]:
    """`(width, height)` rounded down to multiples of `unit` (`size_unit`), at least `unit` each."""
    return max(unit, width // unit * unit), max(unit, height // unit * unit)


def check_spec(
    loaded: LoadedPipeline,
    spec: ImageSpec,
    max_pixels: int = MAX_PIXELS,
    names: FieldNames = OPENAI_NAMES,
    masked: bool | None = None,
) -> None:
    """A 400 for sizes that are not multiples of 8 (and of the VAE factor x 2), over `max_pixels`, bad step counts,
    an img2img strength that leaves no step, an image without a picture and a mask on an inpainting model, or what
    the pipeline's family cannot honour (Flux: a negative prompt without true CFG); the messages name the request's
    own fields (`names`). `masked`: whether a picture and a mask will start the image (a route checks before it
    attaches them); None: as the spec says."""
    unit = size_unit(loaded)
    if spec.width % unit or spec.height % unit or spec.width < unit or spec.height < unit:
        raise BadRequestError(
            f"size {spec.width}x{spec.height}: width and height must be positive multiples of {unit}",
            code="invalid_size",
        )
    if spec.width * spec.height > max_pixels:
        side = math.isqrt(max_pixels)
        raise BadRequestError(
            f"size {spec.width}x{spec.height} is over this server's {max_pixels}-pixel limit ({side}x{side}; "
            "--max-image-pixels)",
            code="invalid_size",
        )
    if not 1 <= spec.steps <= MAX_STEPS:
        raise BadRequestError(f"{names.steps} must be in [1, {MAX_STEPS}], got {spec.steps}", code="invalid_steps")
    run = spec.steps - loaded.ops.first_step(spec.steps, spec.strength)
    if not 0.0 <= spec.strength <= 1.0 or run < 1:
        raise BadRequestError(
            f"{names.strength} {spec.strength} with {names.steps} {spec.steps} runs {run} of the {spec.steps} "
            f"denoising steps; it must be in [0, 1] and leave at least one: raise {names.strength} or {names.steps}",
            code="invalid_strength",
        )
    if spec.mask is not None and (spec.init is None or tuple(spec.mask.shape[-2:]) != (spec.height, spec.width)):
        raise BadRequestError("an inpainting mask needs a starting image, and the mask must have the output size",
                              code="invalid_request")  # fmt: skip
    if masked is None:
        masked = spec.mask is not None and spec.init is not None
    if loaded.masked_channels and not masked:
        raise BadRequestError(
            "this pipeline is an inpainting model (its denoiser takes a mask and the masked picture): every image "
            "needs a picture and a mask (A1111's /sdapi/v1/img2img with `mask`, or /v1/images/edits with a `mask` "
            "file)",
            code="invalid_request",
        )
    if masked and loaded.ops.edits_from_reference:
        raise BadRequestError(
            "a Flux Kontext pipeline edits from the picture as a reference; inpainting is not served on it: leave the "
            "mask out",
            code="invalid_request",
        )
    if loaded.masked_channels and loaded.ops.flow and spec.true_cfg_scale > 1.0:
        raise BadRequestError(
            "true_cfg_scale: Flux Fill (FluxFillPipeline) has no true classifier-free guidance; leave it and "
            "negative_prompt out (guidance_scale is its distilled guidance)",
            code="invalid_request",
        )
    _check_control(loaded, spec)
    if spec.clip_skip is not None:
        _check_clip_skip(loaded, spec.clip_skip, names)
    if spec.guidance_rescale > 0.0 and not (loaded.ops.rescales_cfg and loaded.uses_cfg_model):
        raise BadRequestError("guidance_rescale rescales classifier-free guidance on Stable Diffusion and SDXL "
                              "pipelines; leave it out on this one", code="invalid_request")  # fmt: skip
    if spec.guidance_rescale > 0.0 and spec.guidance_scale <= 1.0:
        raise BadRequestError(
            f"guidance_rescale rescales classifier-free guidance, which runs with {names.guidance} above 1 (got "
            f"{spec.guidance_scale}): raise {names.guidance} or leave guidance_rescale out",
            code="invalid_request",
        )
    loaded.ops.check(spec)


def _check_control(loaded: LoadedPipeline, spec: ImageSpec) -> None:
    """A ControlNet pipeline's images each need a control image and start from noise; other pipelines take none."""
    if loaded.controlnet is None:
        if spec.control is not None:
            raise BadRequestError("control_image needs a ControlNet pipeline (an SD or SDXL ControlNet pipeline "
                                  "dir); this one has none: leave it out", code="invalid_request")  # fmt: skip
        return
    if spec.control is None:
        raise BadRequestError(
            "this pipeline has a ControlNet: every image needs a control image (`control_image`, base64, on "
            "/v1/images/generations; A1111's ControlNet arguments in alwayson_scripts are not served)",
            code="invalid_request",
        )
    if spec.mask is not None:
        raise BadRequestError("inpainting is not served on a ControlNet pipeline; text to image and img2img are",
                              code="invalid_request")  # fmt: skip
    if not 0.0 <= spec.control_start < spec.control_end <= 1.0 or not 0.0 <= spec.control_scale <= 10.0:
        raise BadRequestError(
            f"the ControlNet's guidance start {spec.control_start} and end {spec.control_end} must satisfy 0 <= start "
            f"< end <= 1, and its scale ({spec.control_scale}) be in [0, 10]",
            code="invalid_request",
        )


def _check_clip_skip(loaded: LoadedPipeline, clip_skip: int, names: FieldNames) -> None:
    layers = loaded.ops.clip_layers(loaded.pipe)
    if not layers:
        raise BadRequestError(f"{names.clip_skip} applies to Stable Diffusion and SDXL's CLIP text encoders; leave it "
                              "out on this pipeline", code="invalid_request")  # fmt: skip
    if not 0 <= clip_skip < layers:
        low, high = names.clip_skip_value(0), names.clip_skip_value(layers - 1)
        raise BadRequestError(
            f"{names.clip_skip} must be in [{low}, {high}] (the text encoder has {layers} layers), got "
            f"{names.clip_skip_value(clip_skip)}",
            code="invalid_request",
        )


@dataclass(frozen=True)
class Progress:
    """Images denoising and waiting to start, their forwards done and in all, and the seconds left estimated."""

    running: int
    waiting: int
    done: int
    total: int
    eta_s: float


class ImageBackend:
    """Up to `max_batch_size` images denoise together, each with its own scheduler and adapters.

    `fold`: weight copies each adapted denoiser layer keeps with adapters folded in (`lokr.adapter_batch`'s
    `fold`): steps whose rows all use one adapter at scale 1, and mixed steps of at most `fold` row selections
    that fold, reuse them while the next steps run the same adapters.
    """

    kind = "image"

    def __init__(
        self,
        loaded: LoadedPipeline,
        metrics: Metrics,
        max_batch_size: int = 16,
        fold: int = 0,
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        self.loaded, self.metrics, self.max_batch_size, self.fold = loaded, metrics, max_batch_size, fold
        self.max_pixels = max_pixels
        self._rows: list[Row] = []
        self._new: list[ImageJob] = []
        self._step_s = 0.0  # a moving average of one step's seconds, for `progress`'s estimate

    @property
    def model(self) -> Any:
        return self.loaded.container

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    # ---------------------------------------------------------------------------------- Backend
    def check(self, job: ImageJob) -> None:
        if job.spec is None:
            raise BadRequestError("an image job needs an ImageSpec")
        check_spec(self.loaded, job.spec, self.max_pixels)

    def offer(self, job: ImageJob) -> bool:
        if len(self._rows) + len(self._new) >= self.max_batch_size:
            return False
        self._new.append(job)
        return True

    def step(self) -> None:
        """Admit new images, drop cancelled ones, the forwards `Family.forwards` groups them in, decode and finish the
        done ones."""
        started = time.perf_counter()
        self._admit()
        self._drop_cancelled()
        for rows in self.loaded.ops.forwards(self._rows):
            self.metrics.batch_size.observe(len(rows))
            try:
                steps.denoise(self.loaded, rows, self.fold)
            except Exception as exc:  # one group's forward (an out-of-memory size) fails only that group's images
                self._fail_rows(rows, exc)
        self._send_previews()
        self._finish_done()
        took = time.perf_counter() - started
        self._step_s = took if not self._step_s else 0.8 * self._step_s + 0.2 * took

    def progress(self) -> Progress:
        """What the running images have done: read from any thread (a snapshot of the rows; every row advances
        one denoiser forward per step, so the longest left sets the estimate)."""
        rows, waiting = list(self._rows), len(self._new)
        done = sum(row.index - row.first for row in rows)
        total = sum(len(row.scheduler.timesteps) - row.first for row in rows)
        left = max((len(row.scheduler.timesteps) - row.index for row in rows), default=0)
        return Progress(len(rows), waiting, done, total, left * self._step_s)

    def jobs(self) -> list[ImageJob]:
        return [row.job for row in self._rows] + self._new

    def clear(self) -> None:
        self._rows, self._new = [], []

    # ---------------------------------------------------------------------------------- parts
    def _admit(self) -> None:
        new: list[ImageJob] = []
        for job in self._new:
            if job.cancelled.is_set():
                job.finish_cancelled()
            else:
                new.append(job)
        self._new = []
        if not new:
            return
        try:
            conds = steps.encode(self.loaded, new, self.fold)
            starts = steps.encode_starts(self.loaded, new)
        except Exception as exc:  # the joiners' prompts (and images) are encoded together: a failure fails only them
            fail_jobs(new, exc)
            return
        for job, cond in zip(new, conds, strict=True):
            try:
                assert job.spec is not None
                row = start_row(self.loaded, job, cond, steps.moments_of(starts, job.spec))
            except Exception as exc:  # this joiner alone: no row of a failed job may run on
                fail_jobs([job], exc)
                continue
            self._rows.append(row)

    def _fail_rows(self, rows: list[Row], exc: Exception) -> None:
        """Fail the jobs of `rows` and take every row of those jobs out of the batch."""
        failed = {id(row.job): row.job for row in rows}
        self._rows = [row for row in self._rows if id(row.job) not in failed]
        fail_jobs(list(failed.values()), exc)

    def _drop_cancelled(self) -> None:
        kept = []
        for row in self._rows:
            if row.job.cancelled.is_set():
                row.job.finish(FinishEvent("cancelled", 0, row.index - row.first))
            else:
                kept.append(row)
        self._rows = kept

    def _send_previews(self) -> None:
        """Decode the previews the step took (`Row.preview`) and send each to its image's client."""

        def send(row: Row, image: Any) -> None:
            row.preview = None
            row.job.sink(PreviewEvent(row.previews_sent, image))
            row.previews_sent += 1

        self._decode_by_size([(row, row.preview) for row in self._rows if row.preview is not None], send)

    def _finish_done(self) -> None:
        done = [row for row in self._rows if row.done]
        if not done:
            return
        self._rows = [row for row in self._rows if not row.done]
        for row in done:
            if row.spec.latent_output:  # the hires fix's first pass: its latents are the answer, not decoded
                self._finish(row, row.latents)
        self._decode_by_size([(row, row.latents) for row in done if not row.spec.latent_output], self._finish)

    def _decode_by_size(self, items: list[tuple[Row, torch.Tensor]], deliver: Callable[[Row, Any], None]) -> None:
        """VAE-decode each `(row, latents)` (the row's own, or a preview's) in one `steps.decode` per image size,
        as many images per VAE forward as it allows, and `deliver(row, image)`; a size whose decode fails fails
        those images (and takes their rows out of the batch)."""
        by_size: dict[tuple[int, int], list[tuple[Row, torch.Tensor]]] = defaultdict(list)
        for row, latents in items:
            by_size[row.size].append((row, latents))
        for pairs in by_size.values():
            rows = [row for row, _ in pairs]
            try:
                images = steps.decode(self.loaded, [replace(row, latents=latents) for row, latents in pairs])
            except Exception as exc:
                self._fail_rows(rows, exc)
                continue
            for row, image in zip(rows, images, strict=True):
                deliver(row, image)

    @staticmethod
    def _finish(row: Row, image: Any) -> None:
        row.job.image = image
        row.job.finish(FinishEvent("stop", 0, row.index - row.first))
