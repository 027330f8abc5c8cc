"""Image jobs and the per-row denoising state (own scheduler instance, timestep index, latents, generator)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..jobs import Job
from .load import LoadedPipeline

__all__ = ["Conditioning", "ImageJob", "ImageSpec", "Row", "start_row"]


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


@dataclass
class ImageJob(Job):
    """One image: `spec` in, `image` (a PIL image) out, set on the engine thread before the FinishEvent."""

    spec: ImageSpec | None = None
    image: Any = None


@dataclass
class Conditioning:
    """Text conditioning of one image. `cond`/`uncond`: `(1, L, D)`; SDXL pooled: `(1, P)`; uncond None = no CFG."""

    cond: Tensor
    uncond: Tensor | None
    pooled: Tensor | None = None
    uncond_pooled: Tensor | None = None


@dataclass
class Row:
    """One image being denoised: its own scheduler (per-row timestep and multistep history)."""

    job: ImageJob
    spec: ImageSpec
    cond: Conditioning
    scheduler: Any
    latents: Tensor  # (1, C, h, w)
    step_kwargs: dict[str, Any] = field(default_factory=dict)
    index: int = 0

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


def random_seed() -> int:
    return secrets.randbits(62)


def start_row(loaded: LoadedPipeline, job: ImageJob, cond: Conditioning) -> Row:
    """A fresh scheduler from the pipeline's config, its timesteps, and the latents diffusers would draw.

    Latents: `randn_tensor((1, C, H/f, W/f), generator=Generator("cpu").manual_seed(seed))` times the
    scheduler's initial sigma, as `pipe(..., generator=...)` draws them; the generator then feeds
    stochastic schedulers' steps, as in the pipeline.
    """
    from diffusers.utils.torch_utils import randn_tensor

    assert job.spec is not None
    spec, pipe = job.spec, loaded.pipe
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(spec.steps, device=loaded.device)
    if loaded.family == "sdxl" and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    generator = torch.Generator("cpu").manual_seed(spec.seed)
    f = loaded.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, spec.height // f, spec.width // f)
    latents = randn_tensor(shape, generator=generator, device=loaded.device, dtype=cond.cond.dtype)
    latents = latents * scheduler.init_noise_sigma
    step_kwargs = _step_kwargs(scheduler, generator)
    return Row(job, spec, cond, scheduler, latents, step_kwargs)


def _step_kwargs(scheduler: Any, generator: torch.Generator) -> dict[str, Any]:
    """`eta=0` and the generator where the scheduler's `step` takes them (the pipeline's extra_step_kwargs)."""
    import inspect

    params = set(inspect.signature(scheduler.step).parameters)
    out: dict[str, Any] = {}
    if "eta" in params:
        out["eta"] = 0.0
    if "generator" in params:
        out["generator"] = generator
    return out
