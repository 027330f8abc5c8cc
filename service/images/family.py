"""What differs between pipeline families, behind one small interface; SD 1.x/2.x and SDXL in `sd`, SD3 in `sd3`,
Flux in `flux`.

A `Family` encodes prompts, starts a row (its latents and own scheduler), builds the denoiser's inputs for a
batch of rows and splits its output into one noise prediction per row, and turns finished rows' latents into
what the VAE decodes. `steps` drives them: the adapter batches, the scheduler steps, the decode itself.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

import lokr
from lokr.batch import RowSpec

from ..errors import BadRequestError
from .inpaint import Inpaint
from .rows import NO_PICTURE, Conditioning, ImageJob, ImageSpec, Moments, Row
from .samplers import Sampler

if TYPE_CHECKING:
    from .load import LoadedPipeline

__all__ = [
    "DenoiserBatch", "Family", "TransformerFamily", "batch_key", "cfg_predictions", "denoiser",
    "encode_with_negatives", "family_ops", "new_scheduler", "refuse_latent_upscaling", "refuse_true_cfg",
    "shifted_latents", "step_kwargs",
]  # fmt: skip


@dataclass
class DenoiserBatch:
    """One denoiser forward: `specs[i]` is batch row i's adapter selection, `kwargs` the denoiser's inputs."""

    specs: list[RowSpec]
    kwargs: dict[str, Any]


class Family(ABC):
    """The per-family parts of serving a pipeline (stateless; one instance per family)."""

    denoiser = "unet"  # the pipeline attribute holding the denoiser
    flow = False  # flow matching (Flux): one sampler, the pipeline's own (`samplers`)
    edits_from_reference = False  # Flux Kontext: a request's picture is a reference (`ImageSpec.reference`)
    rescales_cfg = False  # SD / SDXL: `ImageSpec.guidance_rescale` (diffusers' `guidance_rescale`) applies

    @abstractmethod
    def default_size(self, pipe: Any) -> tuple[int, int]:
        """`(width, height)` in pixels the pipeline draws when none is given."""

    def uses_cfg(self, pipe: Any) -> bool:
        """Whether a guidance scale above 1 means classifier-free guidance rows."""
        return False

    def check(self, spec: ImageSpec) -> None:
        """Raise `BadRequestError` for what this family cannot honour (beyond the shared size / step checks)."""
        return None

    def reference_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """`(width, height)` a picture of `size` takes as a reference (`edits_from_reference` families)."""
        return size

    def forwards(self, rows: Sequence[Row]) -> list[list[Row]]:
        """`rows` as the denoiser forwards of a step: one per size, text length and reference (`batch_key`)."""
        groups: dict[tuple[int, ...], list[Row]] = {}
        for row in rows:
            groups.setdefault(batch_key(row), []).append(row)
        return list(groups.values())

    def clip_layers(self, pipe: Any) -> int:
        """Layers of the CLIP text encoder(s) `clip_skip` counts from the end of (the fewest); 0: no CLIP skip."""
        return 0

    def first_step(self, steps: int, strength: float) -> int:
        """The schedule's steps img2img skips at `strength` (diffusers' SD / SDXL img2img: the rest, `int(steps *
        strength)`, run; before the scheduler's order multiplies them)."""
        return steps - min(int(steps * strength), steps)

    def renoised(self, row: Row, inpaint: Inpaint) -> Tensor:
        """A masked row's picture latents noised to its current timestep (the next one it runs), as the
        inpainting pipelines re-noise them after a step (`scheduler.add_noise`)."""
        at = row.scheduler.timesteps[row.index : row.index + 1]
        noised: Tensor = row.scheduler.add_noise(inpaint.image, inpaint.noise, at)
        return noised

    def keep_picture(self, row: Row) -> None:
        """After a masked row's step: the area its mask keeps set back to its picture, noised to the next timestep
        (the picture itself after the last)."""
        if row.inpaint is not None:
            kept = row.inpaint.image if row.done else self.renoised(row, row.inpaint)
            row.latents = row.inpaint.blend(row.latents, kept)

    @abstractmethod
    def encode(self, loaded: LoadedPipeline, jobs: Sequence[ImageJob], fold: int = 0) -> list[Conditioning]:
        """Every prompt of `jobs` encoded in one batch per text encoder, each job under its own adapters
        (`fold`: `lokr.adapter_batch`'s, the same as the denoiser's, which would otherwise drop its kept folds)."""

    @abstractmethod
    def start(self, loaded: LoadedPipeline, job: ImageJob, cond: Conditioning, moments: Moments = NO_PICTURE) -> Row:
        """A row with its own scheduler (timesteps set) and the initial latents diffusers draws for its seed
        (`moments`: the VAE's latent distributions of its starting picture, where the spec has one)."""

    @abstractmethod
    def batch(self, loaded: LoadedPipeline, rows: Sequence[Row]) -> DenoiserBatch:
        """The denoiser's inputs for `rows` (one of `forwards`' groups), each row at its own timestep."""

    @abstractmethod
    def predictions(self, rows: Sequence[Row], output: Tensor) -> list[Tensor]:
        """The denoiser's `output` for `batch(rows)` as one noise prediction per row, shaped like its latents."""

    @abstractmethod
    def vae_latents(self, loaded: LoadedPipeline, rows: Sequence[Row]) -> Tensor:
        """Finished rows' latents (same size) as the VAE decodes them: `(B, C, h, w)`, unscaled, in its dtype."""

    @abstractmethod
    def clean_estimate(self, row: Row, pred: Tensor) -> Tensor:
        """The finished latents `row` heads for, estimated from `pred` (`predictions`' for the row at its current
        timestep, before its scheduler step), shaped like its latents."""

    def preview(self, row: Row, pred: Tensor) -> Tensor:
        """`clean_estimate`, with a masked row's kept area set to its picture (as its finished latents will be)."""
        estimate = self.clean_estimate(row, pred).to(row.latents.dtype)
        return estimate if row.inpaint is None else row.inpaint.blend(estimate, row.inpaint.image)


def batch_key(row: Row) -> tuple[int, ...]:
    """The size and text length of `row` (the longer of its prompt's and negative prompt's), and the tokens of its
    reference picture (Flux Kontext; 0 without one)."""
    texts = [t for t in (row.cond.cond, row.cond.uncond) if t is not None]
    reference = 0 if row.reference is None else int(row.reference.shape[1])
    return row.spec.width, row.spec.height, max(int(t.shape[1]) for t in texts), reference


def encode_with_negatives(
    loaded: LoadedPipeline,
    jobs: Sequence[ImageJob],
    fold: int,
    negative: Callable[[ImageSpec], bool],
    run: Callable[[list[str]], tuple[Tensor, Tensor]],
) -> list[Conditioning]:
    """Every job's prompt, then the negative prompts ("" when unset) of the jobs `negative` picks, encoded in one
    batch by `run` (texts -> embeddings `(N, L, D)` and pooled `(N, P)`), each text under its job's adapters."""
    specs = [job.spec for job in jobs]
    assert all(spec is not None for spec in specs)
    texts = [spec.prompt for spec in specs if spec is not None]
    selections: list[RowSpec] = [job.text_spec for job in jobs]
    negatives: list[int | None] = []  # per job: the index of its negative prompt's text
    for job, spec in zip(jobs, specs):
        assert spec is not None
        negatives.append(len(texts) if negative(spec) else None)
        if negative(spec):
            texts.append(spec.negative_prompt or "")
            selections.append(job.text_spec)
    with lokr.adapter_batch(loaded.container, selections, fold=fold):
        embeds, pooled = run(texts)
    out = []
    for i, n in enumerate(negatives):
        cond = Conditioning(embeds[i : i + 1], None, pooled[i : i + 1])
        if n is not None:
            cond.uncond, cond.uncond_pooled = embeds[n : n + 1], pooled[n : n + 1]
        out.append(cond)
    return out


def cfg_predictions(rows: Sequence[Row], output: Tensor) -> list[Tensor]:
    """Each row's noise prediction from a batch of `[uncond, text]` rows per image with CFG (`[text]` without):
    `uncond + guidance_scale * (text - uncond)`, rescaled towards the text prediction's standard deviation by
    `guidance_rescale` where set (diffusers' `rescale_noise_cfg`)."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    preds, at = [], 0
    for row in rows:
        if row.cfg:
            uncond, text = output[at : at + 1], output[at + 1 : at + 2]
            guided = uncond + row.spec.guidance_scale * (text - uncond)
            rescale = row.spec.guidance_rescale
            preds.append(rescale_noise_cfg(guided, text, guidance_rescale=rescale) if rescale > 0.0 else guided)
            at += 2
        else:
            preds.append(output[at : at + 1])
            at += 1
    return preds


class TransformerFamily(Family, ABC):
    """A DiT pipeline (Flux, SD3): flow matching, a `transformer` denoiser, the pipeline's default sample size."""

    denoiser = "transformer"
    flow = True

    def default_size(self, pipe: Any) -> tuple[int, int]:
        side = int(pipe.default_sample_size) * int(pipe.vae_scale_factor)
        return side, side

    def first_step(self, steps: int, strength: float) -> int:
        """SD3's and Flux's img2img round as SD3's does: `int(steps - steps * strength)` steps are skipped."""
        return int(max(steps - min(steps * strength, steps), 0))

    def clean_estimate(self, row: Row, pred: Tensor) -> Tensor:
        """Flow matching: the latents are `(1 - sigma) x0 + sigma noise` and the prediction `noise - x0`, so
        `x0 = latents - sigma * pred` (what the scheduler's Euler step reaches when the next sigma is 0)."""
        sigma = row.scheduler.sigmas[row.index].to(row.latents.device, row.latents.dtype)
        return row.latents - sigma * pred

    def renoised(self, row: Row, inpaint: Inpaint) -> Tensor:
        """The DiT inpainting pipelines' re-noising of the picture: flow matching's `scale_noise` at the next
        sigma."""
        at = row.scheduler.timesteps[row.index : row.index + 1]
        noised: Tensor = row.scheduler.scale_noise(inpaint.image, at, inpaint.noise)
        return noised


def refuse_true_cfg(spec: ImageSpec, family: str) -> None:
    """A 400 for `true_cfg_scale` on a pipeline (`family`, as the message names it) whose CFG is `guidance_scale`."""
    if spec.true_cfg_scale != 1.0:
        raise BadRequestError(
            f"true_cfg_scale applies to Flux pipelines; on {family}, guidance_scale sets classifier-free guidance: "
            "leave true_cfg_scale out",
            code="invalid_request",
        )


def refuse_latent_upscaling(spec: ImageSpec, family: str) -> None:
    """A 400 for the hires fix's latent upscalers on a pipeline (`family`) whose latents they do not fit."""
    if spec.init_latents is not None or spec.latent_output:
        raise BadRequestError(
            f"latent upscaling (the hires fix's Latent upscalers) is served on Stable Diffusion and SDXL; on {family} "
            "use hr_upscaler 'Lanczos' or 'Nearest'",
            code="invalid_request",
        )


def shifted_latents(loaded: LoadedPipeline, moments: Tensor, gen: torch.Generator | None) -> Tensor:
    """A draw with `gen` from a picture's VAE latent distribution `moments` (None: its mode, no draw), shifted and
    scaled as a DiT pipeline's latents are: `(x - shift_factor) * scaling_factor`."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    vae, dist = loaded.pipe.vae.config, DiagonalGaussianDistribution(moments)
    latents = dist.mode() if gen is None else dist.sample(gen)
    shifted: Tensor = (latents - vae.shift_factor) * vae.scaling_factor
    return shifted


def new_scheduler(base: Any, sampler: Sampler | None) -> Any:
    """An image's own scheduler: `sampler`'s, or the pipeline's (`base`) class, from `base`'s config."""
    return type(base).from_config(base.config) if sampler is None else sampler.make(base)


def step_kwargs(scheduler: Any, generator: torch.Generator) -> dict[str, Any]:
    """`eta=0` and the generator where the scheduler's `step` takes them (SD's extra_step_kwargs)."""
    params = set(inspect.signature(scheduler.step).parameters)
    out: dict[str, Any] = {}
    if "eta" in params:
        out["eta"] = 0.0
    if "generator" in params:
        out["generator"] = generator
    return out


def family_ops(name: str) -> Family:
    """The `Family` of a family name ("sd", "sdxl", "sd3", "flux", "flux-kontext", "chroma")."""
    if name == "flux":
        from .flux import Flux

        return Flux()
    if name == "flux-kontext":
        from .flux import FluxKontext

        return FluxKontext()
    if name == "chroma":
        from .chroma import Chroma

        return Chroma()
    if name == "sd3":
        from .sd3 import StableDiffusion3

        return StableDiffusion3()
    if name in ("sd", "sdxl"):
        from .sd import StableDiffusion

        return StableDiffusion(xl=name == "sdxl")
    raise ValueError(f"unknown pipeline family {name!r}")


def denoiser(loaded: LoadedPipeline, family: Family) -> nn.Module:
    """The pipeline's denoiser module (`unet` or `transformer`)."""
    module: nn.Module = getattr(loaded.pipe, family.denoiser)
    return module
