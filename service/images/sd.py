"""SD 1.x / 2.x and SDXL pipelines (a UNet, CLIP text encoder(s), classifier-free guidance rows), their
inpainting checkpoints (a 9-channel UNet) included."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lokr.batch import RowSpec

from .clip_text import PromptText, encode_prompts, text_states
from .family import DenoiserBatch, Family, cfg_predictions, new_scheduler, refuse_true_cfg, step_kwargs
from .inpaint import Inpaint, latent_mask
from .prompts import check_prompt
from .rows import NO_PICTURE, Conditioning, ImageJob, ImageSpec, Moments, Row

if TYPE_CHECKING:
    from .load import LoadedPipeline

__all__ = ["StableDiffusion"]

MERGE_ROWS = 8  # a text length with fewer denoiser rows than this joins the size's largest forward


class StableDiffusion(Family):
    """SD 1.x/2.x (`xl=False`) and SDXL (`xl=True`): a UNet, CLIP encoder(s), classifier-free guidance rows."""

    rescales_cfg = True

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
        refuse_true_cfg(spec, "Stable Diffusion")

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
            texts.append(PromptText(spec.prompt, job.text_spec, spec.clip_skip, spec.a1111_prompts))
            neg: int | None = None
            zeros = (zero_neg and spec.negative_prompt is None) or (
                self.xl and spec.a1111_prompts and not spec.negative_prompt
            )
            if self._needs_cfg(loaded, spec.guidance_scale) and not zeros:
                neg = len(texts)
                texts.append(PromptText(spec.negative_prompt or "", job.text_spec, None, spec.a1111_prompts))
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
        control = None
        if spec.control is not None:
            control = spec.control.to(loaded.device, loaded.controlnet.dtype)
        return Row(job, spec, cond, scheduler, latents, step_kwargs(scheduler, generator), index=first, first=first,
                   inpaint=inpaint, extra=extra, control=control)  # fmt: skip

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
        if loaded.controlnet is not None:
            kwargs.update(_control_residuals(loaded.controlnet, rows, kwargs))
        return DenoiserBatch(specs, kwargs)

    def predictions(self, rows: Sequence[Row], output: Tensor) -> list[Tensor]:
        return cfg_predictions(rows, output)

    def clean_estimate(self, row: Row, pred: Tensor) -> Tensor:
        """`x0` from the UNet's view of the latents, variance-preserving `sqrt(a) x0 + sqrt(1 - a) noise`
        (`scale_model_input`), and its noise (or v) prediction. `a` is `1 / (sigma^2 + 1)` on schedulers that scale
        their latents for the UNet (sigma-based: Euler, Heun, LMS, DPM2: exactly what their step reaches at sigma
        0), else `alphas_cumprod` at the timestep (DDIM, PNDM, DPM++, UniPC: exact for DDIM and DDPM; an estimate
        on the multistep solvers with Karras sigmas, whose timesteps are rounded)."""
        scheduler, t, latents = row.scheduler, row.timestep, row.latents
        scale = float(scheduler.scale_model_input(torch.ones((), device=latents.device, dtype=latents.dtype), t))
        alpha = scale * scale if scale < 1.0 else float(scheduler.alphas_cumprod[int(round(float(t)))])
        seen = latents * scale
        kind = scheduler.config.prediction_type
        if kind == "sample":
            estimate = pred
        elif kind == "v_prediction":
            estimate = alpha**0.5 * seen - (1.0 - alpha) ** 0.5 * pred
        else:
            estimate = (seen - (1.0 - alpha) ** 0.5 * pred) / alpha**0.5
        if scheduler.config.get("clip_sample", False):  # DDIM / DDPM clip their own estimate so
            bound = scheduler.config.get("clip_sample_range", 1.0)
            estimate = estimate.clamp(-bound, bound)
        return estimate

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


def _control_residuals(controlnet: Any, rows: Sequence[Row], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The ControlNet's residuals for the UNet over the batch `kwargs` (both CFG rows of an image take its control
    image), each row's scaled by its `control_scale` as diffusers' `conditioning_scale` scales them, and by 0 on
    steps outside its `control_start` to `control_end` share (diffusers' `controlnet_keep`). A ControlNet takes no
    text mask: where A1111 prompts of different lengths were padded (`text_states`), it runs once per length on
    unpadded text, as A1111 runs such rows apart."""
    controls, scales = [], []
    for row in rows:
        assert row.control is not None
        copies = 2 if row.cfg else 1
        controls.extend([row.control] * copies)
        scales.extend([row.spec.control_scale * _keep(row)] * copies)
    inputs = {"sample": kwargs["sample"], "timestep": kwargs["timestep"],
              "encoder_hidden_states": kwargs["encoder_hidden_states"], "controlnet_cond": torch.cat(controls),
              "added_cond_kwargs": kwargs["added_cond_kwargs"]}  # fmt: skip
    mask = kwargs.get("encoder_attention_mask")
    if mask is None:
        down, mid = controlnet(**inputs, return_dict=False)
    else:
        down, mid = _by_text_length(controlnet, inputs, [int(n) for n in mask.sum(dim=1)])
    scale = torch.tensor(scales, device=mid.device, dtype=mid.dtype).view(-1, 1, 1, 1)
    return {"down_block_additional_residuals": [d * scale for d in down], "mid_block_additional_residual": mid * scale}


def _by_text_length(controlnet: Any, inputs: dict[str, Any], lengths: list[int]) -> tuple[list[Tensor], Tensor]:
    """The ControlNet's outputs for a batch whose rows' texts are `lengths` long (zero-padded to the longest): one
    forward per length on the rows of that length, their text unpadded, put back in row order."""
    down: list[Tensor] = []
    mid = torch.empty(0)
    for length in sorted(set(lengths)):
        at = torch.tensor([i for i, n in enumerate(lengths) if n == length], device=inputs["sample"].device)
        part_down, part_mid = controlnet(**_rows_of(inputs, at, length), return_dict=False)
        if not down:
            down = [d.new_empty((len(lengths), *d.shape[1:])) for d in part_down]
            mid = part_mid.new_empty((len(lengths), *part_mid.shape[1:]))
        for whole, piece in zip([*down, mid], [*part_down, part_mid], strict=True):
            whole.index_copy_(0, at, piece)
    return down, mid


def _rows_of(inputs: dict[str, Any], at: Tensor, length: int) -> dict[str, Any]:
    """The ControlNet's inputs for batch rows `at`, their text cut to its first `length` positions."""
    added = inputs["added_cond_kwargs"]
    return {
        "sample": inputs["sample"][at], "timestep": inputs["timestep"][at],
        "encoder_hidden_states": inputs["encoder_hidden_states"][at, :length],
        "controlnet_cond": inputs["controlnet_cond"][at],
        "added_cond_kwargs": None if added is None else {k: v[at] for k, v in added.items()},
    }  # fmt: skip


def _keep(row: Row) -> float:
    """1 while the row's step is within its ControlNet's share of the schedule, else 0 (as diffusers decides it,
    step `i` of the `n` timesteps the row runs: img2img's are the schedule's last ones)."""
    i, n, spec = row.index - row.first, len(row.scheduler.timesteps) - row.first, row.spec
    return 1.0 - float(i / n < spec.control_start or (i + 1) / n > spec.control_end)


def _cfg_pair(uncond: Tensor | None, cond: Tensor | None) -> list[Tensor]:
    """The rows of one image in the denoiser batch: `[uncond, cond]` with CFG, else `[cond]`."""
    assert cond is not None
    return [cond] if uncond is None else [uncond, cond]


def _time_ids(row: Row) -> Tensor:
    """SDXL's micro-conditioning `(1, 6)`: original size, crop (0, 0), target size, as the pipeline's defaults."""
    h, w = row.spec.height, row.spec.width
    return torch.tensor([[h, w, 0, 0, h, w]], dtype=row.cond.cond.dtype)


def _denoiser_rows(rows: Sequence[Row]) -> int:
    return sum(2 if row.cfg else 1 for row in rows)
