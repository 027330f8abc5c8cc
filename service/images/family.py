"""What differs between pipeline families, behind one small interface; SD 1.x/2.x and SDXL here, Flux in `flux`.

A `Family` encodes prompts, starts a row (its latents and own scheduler), builds the denoiser's inputs for a
batch of rows and splits its output into one noise prediction per row, and turns finished rows' latents into
what the VAE decodes. `steps` drives them: the adapter batches, the scheduler steps, the decode itself.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lokr.batch import RowSpec

from ..errors import BadRequestError
from .clip_text import PromptText, encode_prompts, text_states
from .inpaint import Inpaint, latent_mask
from .prompts import check_prompt
from .rows import NO_PICTURE, Conditioning, ImageJob, ImageSpec, Moments, Row
from .samplers import Sampler

if TYPE_CHECKING:
    from .load import LoadedPipeline

__all__ = ["DenoiserBatch", "Family", "StableDiffusion", "denoiser", "family_ops", "new_scheduler", "step_kwargs"]


@dataclass
class DenoiserBatch:
    """One denoiser forward: `specs[i]` is batch row i's adapter selection, `kwargs` the denoiser's inputs."""

    specs: list[RowSpec]
    kwargs: dict[str, Any]


class Family(ABC):
    """The per-family parts of serving a pipeline (stateless; one instance per family)."""

    denoiser = "unet"  # the pipeline attribute holding the denoiser
    flow = False  # flow matching (Flux): one sampler, the pipeline's own (`samplers`)

    @abstractmethod
    def default_size(self, pipe: Any) -> tuple[int, int]:
        """`(width, height)` in pixels the pipeline draws when none is given."""

    def uses_cfg(self, pipe: Any) -> bool:
        """Whether a guidance scale above 1 means classifier-free guidance rows."""
        return False

    def check(self, spec: ImageSpec) -> None:
        """Raise `BadRequestError` for what this family cannot honour (beyond the shared size / step checks)."""
        return None

    def forwards(self, rows: Sequence[Row]) -> list[list[Row]]:
        """`rows` as the denoiser forwards of a step: one per size and text length (`batch_key`)."""
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


MERGE_ROWS = 8  # a text length with fewer denoiser rows than this joins the size's largest forward


def batch_key(row: Row) -> tuple[int, int, int]:
    """The size and text length of `row` (the longer of its prompt's and negative prompt's)."""
    texts = [t for t in (row.cond.cond, row.cond.uncond) if t is not None]
    return row.spec.width, row.spec.height, max(int(t.shape[1]) for t in texts)


def _denoiser_rows(rows: Sequence[Row]) -> int:
    return sum(2 if row.cfg else 1 for row in rows)


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


class StableDiffusion(Family):
    """SD 1.x/2.x (`xl=False`) and SDXL (`xl=True`): a UNet, CLIP encoder(s), classifier-free guidance rows."""

    def __init__(self, xl: bool) -> None:
        self.xl = xl

    def default_size(self, pipe: Any) -> tuple[int, int]:
        size = pipe.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        return int(w) * int(pipe.vae_scale_factor), int(h) * int(pipe.vae_scale_factor)

    def check(self, spec: ImageSpec) -> None:
        if spec.a1111_prompts:  # a 400 now, not a failed encoder batch later
            for text in (spec.prompt, spec.negative_prompt or ""):
                check_prompt(text)
        if spec.true_cfg_scale != 1.0:
            raise BadRequestError(
                "true_cfg_scale applies to Flux pipelines; on Stable Diffusion, guidance_scale sets classifier-free "
                "guidance: leave true_cfg_scale out",
                code="invalid_request",
            )

    def forwards(self, rows: Sequence[Row]) -> list[list[Row]]:
        """One forward per size and text length, except that a text length with fewer than `MERGE_ROWS` denoiser
        rows joins the size's largest one, its texts padded and masked (`clip_text.text_states`): a forward of few
        rows costs about as much as many, while the mask slows a large batch's cross-attention (measured on CPU,
        tiny UNet: 1 + 1 images merged 1.28x faster than apart, 4 + 4 1.11x, 8 + 8 0.89x)."""
        by_size: dict[tuple[int, int], list[list[Row]]] = {}
        for group in super().forwards(rows):
            by_size.setdefault((group[0].spec.width, group[0].spec.height), []).append(group)
        out: list[list[Row]] = []
        for groups in by_size.values():
            groups.sort(key=_denoiser_rows, reverse=True)
            merged = list(groups[0])
            for group in groups[1:]:
                if _denoiser_rows(group) < MERGE_ROWS:
                    merged += group
                else:
                    out.append(group)
            out.append(merged)
        return out

    def clip_layers(self, pipe: Any) -> int:
        encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2")]
        return min(int(e.config.num_hidden_layers) for e in encoders if e is not None)

    def uses_cfg(self, pipe: Any) -> bool:
        """Classifier-free guidance is possible (no guidance-distilled timestep_cond)."""
        return pipe.unet.config.time_cond_proj_dim is None

    def _needs_cfg(self, loaded: LoadedPipeline, guidance_scale: float) -> bool:
        return guidance_scale > 1.0 and self.uses_cfg(loaded.pipe)

    def encode(self, loaded: LoadedPipeline, jobs: Sequence[ImageJob], fold: int = 0) -> list[Conditioning]:
        """A negative prompt of None is "" (SD) or, where the SDXL pipeline zeroes empty prompts, zeros; an empty
        one in A1111's reading is zeros on SDXL (A1111 zeroes an empty negative prompt's embeddings). A job's
        `clip_skip` applies to its prompt alone, as in diffusers (whose negative prompts take the encoder's own
        output, the penultimate layer's on SDXL)."""
        texts: list[PromptText] = []
        plan: list[tuple[int, int | None]] = []  # per job: (prompt index, negative index | None = zeros / no CFG)
        zero_neg = self.xl and bool(loaded.pipe.config.get("force_zeros_for_empty_prompt", False))
        for job in jobs:
            spec = job.spec
            assert spec is not None
            p = len(texts)
            texts.append(PromptText(spec.prompt, job.selection, spec.clip_skip, spec.a1111_prompts))
            neg: int | None = None
            zeros = (zero_neg and spec.negative_prompt is None) or (
                self.xl and spec.a1111_prompts and not spec.negative_prompt
            )
            if self._needs_cfg(loaded, spec.guidance_scale) and not zeros:
                neg = len(texts)
                texts.append(PromptText(spec.negative_prompt or "", job.selection, None, spec.a1111_prompts))
            plan.append((p, neg))
        embeds, pooled = self._encode_texts(loaded, texts, fold)
        result = []
        for job, (p, n) in zip(jobs, plan):
            assert job.spec is not None
            cond = Conditioning(embeds[p], None, pooled[p])
            if self._needs_cfg(loaded, job.spec.guidance_scale):
                cond.uncond = embeds[n] if n is not None else torch.zeros_like(cond.cond)
                if cond.pooled is not None:
                    cond.uncond_pooled = pooled[n] if n is not None else torch.zeros_like(cond.pooled)
            result.append(cond)
        return result

    def _encode_texts(
        self, loaded: LoadedPipeline, texts: Sequence[PromptText], fold: int
    ) -> tuple[list[Tensor], list[Tensor | None]]:
        """Every prompt encoded, one encoder batch per CLIP skip: `(1, L, D)` embeddings and (SDXL) `(1, P)` pooled
        ones, in order."""
        groups: dict[int | None, list[int]] = {}
        for i, text in enumerate(texts):
            groups.setdefault(text.clip_skip, []).append(i)
        embeds: list[Tensor] = [torch.empty(0)] * len(texts)
        pooled: list[Tensor | None] = [None] * len(texts)
        for members in groups.values():
            out, pools = encode_prompts(loaded, [texts[i] for i in members], self.xl, fold)
            for k, i in enumerate(members):
                embeds[i], pooled[i] = out[k], pools[k]
        return embeds, pooled

    def start(self, loaded: LoadedPipeline, job: ImageJob, cond: Conditioning, moments: Moments = NO_PICTURE) -> Row:
        """Latents: `randn_tensor((1, C, H/f, W/f), generator=Generator("cpu").manual_seed(seed))` times the
        scheduler's initial sigma, as `pipe(..., generator=...)` draws them; with a starting image (`spec.init`),
        its VAE latents noised to the first timestep run, as the img2img pipelines do (an inpainting model's rows:
        as its inpainting pipeline, `_model_inpainting`). The generator then feeds stochastic schedulers' steps, as
        in the pipeline."""
        from diffusers.utils.torch_utils import randn_tensor

        assert job.spec is not None
        spec, pipe = job.spec, loaded.pipe
        scheduler = new_scheduler(pipe.scheduler, spec.sampler)
        scheduler.set_timesteps(spec.steps, device=loaded.device)
        first = self.first_step(spec.steps, spec.strength) * scheduler.order
        if (self.xl or spec.from_image) and hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(first)
        generator = torch.Generator("cpu").manual_seed(spec.seed)
        inpaint, extra = None, None
        if loaded.masked_channels:
            latents, extra = self._model_inpainting(loaded, spec, moments, scheduler, first, generator)
        elif spec.from_image:
            latents, inpaint = self._noised_image(loaded, spec, moments.picture, scheduler, first, generator,
                                                  cond.cond.dtype)  # fmt: skip
        else:
            f = loaded.vae_scale_factor
            shape = (1, pipe.unet.config.in_channels, spec.height // f, spec.width // f)
            latents = randn_tensor(shape, generator=generator, device=loaded.device, dtype=cond.cond.dtype)
            latents = latents * scheduler.init_noise_sigma
        return Row(job, spec, cond, scheduler, latents, step_kwargs(scheduler, generator), index=first, first=first,
                   inpaint=inpaint, extra=extra)  # fmt: skip

    def _model_inpainting(
        self,
        loaded: LoadedPipeline,
        spec: ImageSpec,
        moments: Moments,
        scheduler: Any,
        first: int,
        gen: torch.Generator,
    ) -> tuple[Tensor, Tensor]:
        """An inpainting model's row, as its inpainting pipeline starts one: the picture's latents drawn (below
        strength 1 only) and noised to timestep `first`, else pure noise; then the masked picture's latents drawn
        (`moments`: both latent distributions). Returns the latents and the further denoiser inputs `(1, 1 + C,
        h, w)`: the mask shrunk to the latents and the masked picture's latents."""
        from diffusers.utils.torch_utils import randn_tensor

        picture, masked = moments.picture, moments.masked
        assert picture is not None and masked is not None and spec.mask is not None, "an inpainting model's row"
        dtype = loaded.dtype
        shape = (1, loaded.pipe.vae.config.latent_channels, *picture.shape[-2:])
        image = None
        if spec.strength < 1.0:
            image = self._picture_latents(loaded, picture, gen, normalise=False).to(dtype)
        noise = randn_tensor(shape, generator=gen, device=loaded.device, dtype=dtype)
        if image is None:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(image, noise, scheduler.timesteps[first : first + 1])
        masked_latents = self._picture_latents(loaded, masked, gen, normalise=False).to(dtype)
        mask = latent_mask(spec.mask, (shape[-2], shape[-1]), loaded.device, dtype)
        return latents, torch.cat([mask, masked_latents], dim=1)

    def _noised_image(
        self,
        loaded: LoadedPipeline,
        spec: ImageSpec,
        moments: Tensor | None,
        scheduler: Any,
        first: int,
        gen: torch.Generator,
        dtype: Any,
    ) -> tuple[Tensor, Inpaint | None]:
        """The starting latents noised to timestep `first`: `spec.init_latents` as they are, or a draw from the
        starting picture's VAE latent distribution (`moments` `(1, 2C, h, w)`), scaled (SDXL img2img: normalised by
        the VAE's latents mean / std where it has them). With a mask, as the inpainting pipelines: the picture only
        scaled, pure noise at strength 1, one more draw (theirs of the masked picture, unused by a 4-channel UNet),
        and the row's `Inpaint`."""
        from diffusers.utils.torch_utils import randn_tensor

        if spec.init_latents is not None:
            image = spec.init_latents.to(loaded.device, dtype)
        else:
            assert moments is not None, "an img2img row needs its picture's latent distribution"
            image = self._picture_latents(loaded, moments, gen, normalise=spec.mask is None).to(dtype)
        noise = randn_tensor(image.shape, generator=gen, device=loaded.device, dtype=dtype)
        if spec.mask is None:
            return scheduler.add_noise(image, noise, scheduler.timesteps[first : first + 1]), None
        if spec.strength == 1.0:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(image, noise, scheduler.timesteps[first : first + 1])
        assert moments is not None
        randn_tensor(image.shape, generator=gen, device=moments.device, dtype=moments.dtype)
        mask = latent_mask(spec.mask, (image.shape[-2], image.shape[-1]), loaded.device, dtype)
        return latents, Inpaint(mask, image, noise)

    def _picture_latents(
        self, loaded: LoadedPipeline, moments: Tensor, gen: torch.Generator, normalise: bool = True
    ) -> Tensor:
        """A draw from a picture's VAE latent distribution, scaled as the denoiser's latents are (SDXL, `normalise`:
        by the VAE's latents mean / std where it has them, as its img2img pipeline does; its inpainting one does
        not)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        vae = loaded.pipe.vae
        latents: Tensor = DiagonalGaussianDistribution(moments).sample(gen)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if self.xl and normalise and mean is not None and std is not None:
            m, s = (torch.tensor(v).view(1, len(v), 1, 1).to(latents) for v in (mean, std))
            return (latents - m) * vae.config.scaling_factor / s
        return latents * vae.config.scaling_factor

    def batch(self, loaded: LoadedPipeline, rows: Sequence[Row]) -> DenoiserBatch:
        """Both CFG rows of an image (uncond first) use the image's adapters; SDXL adds pooled embeds + time ids."""
        inputs: list[Tensor] = []
        timesteps: list[Tensor] = []
        hidden: list[Tensor] = []
        specs: list[RowSpec] = []
        pooled: list[Tensor] = []
        time_ids: list[Tensor] = []
        for row in rows:
            t = row.timestep
            copies = 2 if row.cfg else 1
            model_input = row.scheduler.scale_model_input(torch.cat([row.latents] * copies), t)
            if row.extra is not None:  # an inpainting model: the mask and the masked picture, after the latents
                model_input = torch.cat([model_input, torch.cat([row.extra] * copies)], dim=1)
            inputs.append(model_input)
            timesteps.extend([t] * copies)
            hidden.extend(_cfg_pair(row.cond.uncond, row.cond.cond))
            specs.extend([row.job.selection] * copies)
            if self.xl:
                pooled.extend(_cfg_pair(row.cond.uncond_pooled, row.cond.pooled))
                time_ids.extend([_time_ids(row)] * copies)
        added: dict[str, Tensor] | None = None
        if self.xl:
            dev = loaded.device
            added = {"text_embeds": torch.cat(pooled).to(dev), "time_ids": torch.cat(time_ids).to(dev)}
        states, mask = text_states(hidden)
        kwargs = {"sample": torch.cat(inputs), "timestep": torch.stack(timesteps).to(loaded.device),
                  "encoder_hidden_states": states, "added_cond_kwargs": added}  # fmt: skip
        if mask is not None:
            kwargs["encoder_attention_mask"] = mask
        return DenoiserBatch(specs, kwargs)

    def predictions(self, rows: Sequence[Row], output: Tensor) -> list[Tensor]:
        preds, offset = [], 0
        for row in rows:
            if row.cfg:
                uncond, text = output[offset : offset + 1], output[offset + 1 : offset + 2]
                preds.append(uncond + row.spec.guidance_scale * (text - uncond))
                offset += 2
            else:
                preds.append(output[offset : offset + 1])
                offset += 1
        return preds

    def vae_latents(self, loaded: LoadedPipeline, rows: Sequence[Row]) -> Tensor:
        vae = loaded.pipe.vae
        latents = torch.cat([row.latents for row in rows]).to(vae.dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if self.xl and mean is not None and std is not None:
            shape = (1, len(mean), 1, 1)
            m = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
            s = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
            return latents * s / vae.config.scaling_factor + m
        return latents / vae.config.scaling_factor


def _cfg_pair(uncond: Tensor | None, cond: Tensor | None) -> list[Tensor]:
    """The rows of one image in the denoiser batch: `[uncond, cond]` with CFG, else `[cond]`."""
    assert cond is not None
    return [cond] if uncond is None else [uncond, cond]


def _time_ids(row: Row) -> Tensor:
    """SDXL's micro-conditioning `(1, 6)`: original size, crop (0, 0), target size, as the pipeline's defaults."""
    h, w = row.spec.height, row.spec.width
    return torch.tensor([[h, w, 0, 0, h, w]], dtype=row.cond.cond.dtype)


def family_ops(name: str) -> Family:
    """The `Family` of a family name ("sd", "sdxl", "sd3", "flux")."""
    if name == "flux":
        from .flux import Flux

        return Flux()
    if name == "sd3":
        from .sd3 import StableDiffusion3

        return StableDiffusion3()
    if name in ("sd", "sdxl"):
        return StableDiffusion(xl=name == "sdxl")
    raise ValueError(f"unknown pipeline family {name!r}")


def denoiser(loaded: LoadedPipeline, family: Family) -> nn.Module:
    """The pipeline's denoiser module (`unet` or `transformer`)."""
    module: nn.Module = getattr(loaded.pipe, family.denoiser)
    return module
