"""Image jobs and the per-row denoising state (own scheduler instance, timestep index, latents, step kwargs)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from lokr.batch import RowSpec

from ..jobs import Job
from .inpaint import Inpaint
from .load import LoadedPipeline
from .samplers import Sampler

__all__ = ["NO_PICTURE", "Conditioning", "ImageJob", "ImageSpec", "Moments", "Row", "preview_steps", "start_row"]


@dataclass(frozen=True)
class ImageSpec:
    """What one image needs; `seed` is the seed of this image (request seed + k)."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    true_cfg_scale: float = 1.0  # Flux: > 1 with a negative prompt runs true classifier-free guidance
    # SD / SDXL with CFG: diffusers' `guidance_rescale` (0: off), the guided prediction's std matched to the text's
    guidance_rescale: float = 0.0
    sampler: Sampler | None = None  # None: the pipeline's own scheduler
    # img2img: the starting picture `(1, 3, H, W)` uint8 at the output size (`init_image.pixels_for`) and the share
    # of the schedule run from it (diffusers' `strength`: `int(steps * strength)` denoiser steps); None: from noise
    init: Tensor | None = field(default=None, compare=False, repr=False)
    strength: float = 1.0
    # or the starting latents `(1, C, H/f, W/f)` as the denoiser sees them (the hires fix's latent upscalers; what
    # diffusers' img2img takes as a 4-channel `image`)
    init_latents: Tensor | None = field(default=None, compare=False, repr=False)
    # inpainting (with `init`): `(1, 1, H, W)` bool, True where the picture is repainted (`inpaint.mask_pixels`)
    mask: Tensor | None = field(default=None, compare=False, repr=False)
    # Flux Kontext: the picture the image is edited from `(1, 3, h, w)` uint8 at its own size (`Family.reference_size`);
    # a reference the transformer attends to, not a start: every step runs from noise
    reference: Tensor | None = field(default=None, compare=False, repr=False)
    latent_output: bool = False  # the final latents (`(1, C, H/f, W/f)`, not decoded) are the job's `image`
    clip_skip: int | None = None  # CLIP layers skipped from the end (diffusers' `clip_skip`; A1111's CLIP skip - 1)
    a1111_prompts: bool = False  # SD / SDXL: prompts in A1111's syntax (emphasis, BREAK, any length; `prompts`)
    previews: int = 0  # OpenAI's `partial_images`: estimates of the finished image sent part way (`preview_steps`)
    # a ControlNet pipeline's control image `(1, 3, H, W)` float in [0, 1] at the output size (its
    # `control_image_processor`), and the ControlNet's residuals' scale (diffusers' `controlnet_conditioning_scale`)
    control: Tensor | None = field(default=None, compare=False, repr=False)
    control_scale: float = 1.0
    control_start: float = 0.0  # the share of the steps the ControlNet acts on (diffusers' control_guidance_start
    control_end: float = 1.0  # and _end)

    @property
    def from_image(self) -> bool:
        """Img2img: the image starts from a picture or from latents, part way into the schedule."""
        return self.init is not None or self.init_latents is not None


@dataclass
class ImageJob(Job):
    """One image: `spec` in, `image` (a PIL image) out, set on the engine thread before the FinishEvent."""

    spec: ImageSpec | None = None
    image: Any = None
    # the text encoders' adapters where they differ from the denoiser's (A1111's te multiplier); None: `selection`
    text_selection: RowSpec = None

    @property
    def text_spec(self) -> RowSpec:
        """The adapter selection the job's prompts are encoded under."""
        return self.selection if self.text_selection is None else self.text_selection


@dataclass
class Conditioning:
    """Text conditioning of one image. `cond`/`uncond`: `(1, L, D)`; SDXL / Flux pooled: `(1, P)`; uncond None = no
    CFG (Flux: `cond` is T5's and `pooled` CLIP's; `uncond` only for true CFG)."""

    cond: Tensor
    uncond: Tensor | None
    pooled: Tensor | None = None
    uncond_pooled: Tensor | None = None
    mask: Tensor | None = None  # Chroma: which of `cond`'s tokens the transformer attends to `(1, L)`
    uncond_mask: Tensor | None = None


@dataclass
class Row:
    """One image being denoised: its own scheduler (per-row timestep and multistep history)."""

    job: ImageJob
    spec: ImageSpec
    cond: Conditioning
    scheduler: Any
    latents: Tensor  # (1, C, h, w); Flux: packed (1, h/2 * w/2, 4C)
    step_kwargs: dict[str, Any] = field(default_factory=dict)
    index: int = 0
    first: int = 0  # the timestep index it starts at (img2img skips the schedule's first ones)
    inpaint: Inpaint | None = None  # a masked row: what it keeps of its picture after each step
    # an inpainting model's further denoiser inputs `(1, 1 + C, h, w)`: the mask and the masked picture's latents
    extra: Tensor | None = None
    # Flux Kontext: the reference picture's packed latents `(1, N_ref, 4C)`, which follow the row's own tokens
    reference: Tensor | None = None
    control: Tensor | None = None  # `spec.control` on the device, in the ControlNet's dtype
    # the denoiser's estimate of the finished latents (like `latents`), taken at a preview step, until it is sent
    preview: Tensor | None = None
    previews_sent: int = 0

    @property
    def previewing(self) -> bool:
        """Whether the step the row runs next is one after which its spec wants a preview."""
        if not self.spec.previews:
            return False
        run = len(self.scheduler.timesteps) - self.first
        return self.index + 1 - self.first in preview_steps(run, self.spec.previews)

    @property
    def timestep(self) -> Tensor:
        return self.scheduler.timesteps[self.index]

    @property
    def done(self) -> bool:
        return self.index >= len(self.scheduler.timesteps)

    @property
    def size(self) -> tuple[int, int]:
        return self.spec.width, self.spec.height

    @property
    def cfg(self) -> bool:
        return self.cond.uncond is not None


def preview_steps(run: int, previews: int) -> frozenset[int]:
    """After which of a row's `run` steps (counted from 1) its `previews` are taken: evenly spaced, never after the
    last (the finished image follows it); fewer when the run is too short to space them."""
    return frozenset(round(run * (k + 1) / (previews + 1)) for k in range(previews)) - {0, run}


def random_seed() -> int:
    return secrets.randbits(62)


@dataclass(frozen=True)
class Moments:
    """The VAE latent distributions `(1, 2C, h, w)` (mean and log-variance) a row starts from: its starting
    picture's and, on an inpainting model, its masked picture's (`steps.encode_starts`)."""

    picture: Tensor | None = None
    masked: Tensor | None = None


NO_PICTURE = Moments()


def start_row(loaded: LoadedPipeline, job: ImageJob, cond: Conditioning, moments: Moments = NO_PICTURE) -> Row:
    """A fresh row for `job`: its family's scheduler, timesteps and the initial latents diffusers would draw
    (from `moments` where it starts from a picture)."""
    return loaded.ops.start(loaded, job, cond, moments)
