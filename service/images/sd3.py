"""Stable Diffusion 3-style pipelines (`StableDiffusion3Pipeline`: an MMDiT `transformer`, CLIP-L / CLIP-G /
T5 text encoders, flow matching).

Each row does what `StableDiffusion3Pipeline.__call__` does for one image: the three encoders' prompt embeddings
(CLIP's side by side, padded to T5's width, then T5's tokens after them) and pooled CLIP embeddings, latents drawn
with the row's generator (not packed), the scheduler's sigmas (shifted by `mu` for the image's sequence length
where the scheduler shifts dynamically), and classifier-free guidance rows `[negative, prompt]` combined as
`uncond + guidance_scale * (text - uncond)`. The transformer takes a `(B,)` timestep, so rows at different steps
share a forward; rows in one forward have the same size (the text length is the pipeline's, the same for all).
Img2img rows start from their picture as `StableDiffusion3Img2ImgPipeline` does, masked rows as
`StableDiffusion3InpaintPipeline` does with SD3's own 16-channel transformer (the kept area set back to the picture,
re-noised with `scale_noise`, after every step). Every image is decoded as the text-to-image pipeline decodes
(`latents / scaling_factor + shift_factor`): diffusers' SD3 inpainting pipeline leaves the shift out of its decode,
which tints its pictures, and is matched in latents, not in that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lokr.batch import RowSpec

from .family import (
    DenoiserBatch,
    TransformerFamily,
    cfg_predictions,
    encode_with_negatives,
    refuse_latent_upscaling,
    refuse_true_cfg,
    shifted_latents,
)
from .inpaint import Inpaint, latent_mask
from .rows import NO_PICTURE, Conditioning, ImageJob, ImageSpec, Moments, Row

if TYPE_CHECKING:
    from .load import LoadedPipeline

__all__ = ["StableDiffusion3"]


class StableDiffusion3(TransformerFamily):
    """`StableDiffusion3Pipeline` rows: latents `(1, C, H/f, W/f)`; a negative row first with CFG."""

    def uses_cfg(self, pipe: Any) -> bool:
        return True

    def check(self, spec: ImageSpec) -> None:
        refuse_latent_upscaling(spec, "SD3")
        refuse_true_cfg(spec, "SD3")

    def encode(self, loaded: LoadedPipeline, jobs: Sequence[ImageJob], fold: int = 0) -> list[Conditioning]:
        """Every prompt (and, with CFG, negative prompt: "" when none, as the pipeline) in one batch per encoder,
        each under its job's adapters: `(1, L, D)` embeddings and `(1, P)` pooled ones."""

        def run(texts: list[str]) -> tuple[Tensor, Tensor]:
            embeds, _, pooled, _ = loaded.pipe.encode_prompt(
                prompt=texts, prompt_2=None, prompt_3=None, device=loaded.device, num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )  # fmt: skip
            return embeds, pooled

        return encode_with_negatives(loaded, jobs, fold, lambda spec: spec.guidance_scale > 1.0, run)

    def start(self, loaded: LoadedPipeline, job: ImageJob, cond: Conditioning, moments: Moments = NO_PICTURE) -> Row:
        """Latents `randn_tensor((1, C, H/f, W/f), generator=Generator("cpu").manual_seed(seed))`, the scheduler's
        timesteps as `pipe(...)` sets them. With a starting picture (`moments.picture`), a draw from its latent
        distribution first, shifted and scaled, and the noise mixed in at the first sigma run (`scale_noise`), as
        `StableDiffusion3Img2ImgPipeline` does; with a mask too, what `StableDiffusion3InpaintPipeline` keeps of the
        picture (`Inpaint`: no draws follow the noise's, a flow-matching step takes no generator)."""
        from diffusers.utils.torch_utils import randn_tensor

        assert job.spec is not None
        spec, pipe = job.spec, loaded.pipe
        f, dtype = loaded.vae_scale_factor, cond.cond.dtype
        shape = (1, pipe.transformer.config.in_channels, spec.height // f, spec.width // f)
        generator = torch.Generator("cpu").manual_seed(spec.seed)
        scheduler = _scheduler(loaded, spec.steps, shape)
        first = self.first_step(spec.steps, spec.strength)
        image = None
        if spec.init is not None:
            assert moments.picture is not None, "an img2img row needs its picture's latent distribution"
            scheduler.set_begin_index(first)
            image = shifted_latents(loaded, moments.picture, generator).to(dtype)
        latents = randn_tensor(shape, generator=generator, device=loaded.device, dtype=dtype)
        inpaint = None
        if image is not None:
            noise, latents = latents, scheduler.scale_noise(image, scheduler.timesteps[first : first + 1], latents)
            if spec.mask is not None:
                inpaint = Inpaint(latent_mask(spec.mask, (shape[2], shape[3]), loaded.device, dtype), image, noise)
        return Row(job, spec, cond, scheduler, latents, index=first, first=first, inpaint=inpaint)

    def batch(self, loaded: LoadedPipeline, rows: Sequence[Row]) -> DenoiserBatch:
        """Per-row timestep `(B,)`; an image with CFG has two rows, negative then prompt."""
        latents: list[Tensor] = []
        timesteps: list[Tensor] = []
        embeds: list[Tensor] = []
        pooled: list[Tensor] = []
        specs: list[RowSpec] = []
        for row in rows:
            copies = 2 if row.cfg else 1
            latents.extend([row.latents] * copies)
            timesteps.extend([row.timestep] * copies)
            if row.cfg:
                embeds += [_given(row.cond.uncond), row.cond.cond]
                pooled += [_given(row.cond.uncond_pooled), _given(row.cond.pooled)]
            else:
                embeds.append(row.cond.cond)
                pooled.append(_given(row.cond.pooled))
            specs.extend([row.job.selection] * copies)
        sample = torch.cat(latents)
        kwargs = {"hidden_states": sample, "timestep": torch.stack(timesteps).to(loaded.device),
                  "encoder_hidden_states": torch.cat(embeds), "pooled_projections": torch.cat(pooled)}  # fmt: skip
        return DenoiserBatch(specs, kwargs)

    def predictions(self, rows: Sequence[Row], output: Tensor) -> list[Tensor]:
        return cfg_predictions(rows, output)

    def vae_latents(self, loaded: LoadedPipeline, rows: Sequence[Row]) -> Tensor:
        """`latents / scaling_factor + shift_factor`, as the pipeline decodes."""
        vae = loaded.pipe.vae
        latents = torch.cat([row.latents for row in rows])
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        return latents.to(vae.device, vae.dtype)


def _given(t: Tensor | None) -> Tensor:
    assert t is not None
    return t


def _scheduler(loaded: LoadedPipeline, steps: int, shape: tuple[int, ...]) -> Any:
    """An image's own flow-matching scheduler with its timesteps set as `StableDiffusion3Pipeline` sets them: `mu`
    from the patched sequence length where the scheduler shifts dynamically."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

    pipe = loaded.pipe
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    config, kwargs = scheduler.config, {}
    if config.get("use_dynamic_shifting", None):
        patch = int(pipe.transformer.config.patch_size)
        seq_len = (shape[-2] // patch) * (shape[-1] // patch)
        kwargs["mu"] = calculate_shift(
            seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5), config.get("max_shift", 1.16),
        )  # fmt: skip
    retrieve_timesteps(scheduler, steps, loaded.device, **kwargs)
    return scheduler
