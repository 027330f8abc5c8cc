"""Flux-style pipelines (`FluxPipeline`: a DiT `transformer`, CLIP `text_encoder`, T5 `text_encoder_2`, flow matching).

Each row does what `FluxPipeline.__call__` does for one image: CLIP pooled + T5 embeddings, latents drawn with
the row's generator and packed 2x2, sigmas `linspace(1, 1/steps, steps)` shifted by `mu` for the image's
sequence length, the distilled guidance embedding, `timestep / 1000`. The transformer takes a `(B,)` timestep
and guidance, so rows at different steps (and guidance) share a forward; text / image position ids are shared,
so rows in one forward have the same size and text length. True CFG (`true_cfg_scale` > 1 with a negative prompt,
as the pipeline's own arguments) adds the image's negative row to the same forward, combined as
`neg + true_cfg_scale * (pos - neg)`. A Flux Fill checkpoint (`FluxFillPipeline`) inpaints by its transformer's
inputs: each row's masked picture and mask, packed, follow its latents (`_fill_inputs`). A Flux Kontext checkpoint
(`FluxKontextPipeline`, `FluxKontext`) edits from a reference picture: its packed latents follow the row's own tokens
in the sequence, at position ids whose first coordinate is 1, and the transformer's output for them is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..errors import BadRequestError
from .family import DenoiserBatch, TransformerFamily, encode_with_negatives, refuse_latent_upscaling, shifted_latents
from .inpaint import Inpaint, latent_mask
from .rows import NO_PICTURE, Conditioning, ImageJob, ImageSpec, Moments, Row

if TYPE_CHECKING:
    from .load import LoadedPipeline

__all__ = ["Flux", "FluxKontext", "cfg_pair", "text_ids"]


class Flux(TransformerFamily):
    """`FluxPipeline` rows: packed latents `(1, N, 4C)` with `N = (H/2f) * (W/2f)`; a negative row with true CFG."""

    def check(self, spec: ImageSpec) -> None:
        refuse_latent_upscaling(spec, "Flux")
        if spec.negative_prompt and spec.true_cfg_scale <= 1.0:
            raise BadRequestError(
                "negative_prompt on a Flux pipeline takes effect only with true_cfg_scale above 1 (true "
                "classifier-free guidance, two transformer rows per image; guidance_scale is the distilled "
                "guidance): set true_cfg_scale, e.g. 4.0, or leave negative_prompt out",
                code="invalid_request",
            )

    def encode(self, loaded: LoadedPipeline, jobs: Sequence[ImageJob], fold: int = 0) -> list[Conditioning]:
        """T5 embeddings `(1, L, D)` (L = the pipeline's max_sequence_length, 512) and CLIP pooled `(1, P)`; with
        true CFG, the negative prompt's too, under the same adapters."""

        def run(texts: list[str]) -> tuple[Tensor, Tensor]:
            embeds, pooled, _ = loaded.pipe.encode_prompt(texts, device=loaded.device, num_images_per_prompt=1)
            return embeds, pooled

        return encode_with_negatives(loaded, jobs, fold, _true_cfg, run)

    def start(self, loaded: LoadedPipeline, job: ImageJob, cond: Conditioning, moments: Moments = NO_PICTURE) -> Row:
        """Latents: `randn_tensor((1, C, 2*(H//2f), 2*(W//2f)), generator=Generator("cpu").manual_seed(seed))`
        packed to `(1, N, 4C)`; the scheduler's sigmas and shift as `pipe(...)` sets them. With a starting image
        (`moments.picture`: its VAE latent distribution), a draw from it, shifted and scaled, then that noise mixed
        in at the first sigma run (`scale_noise`), as `FluxImg2ImgPipeline` does; with a mask too, what
        `FluxInpaintPipeline` keeps of the picture (`Inpaint`, packed like the latents), or on a Flux Fill model
        the transformer's further inputs (`Row.extra`), as `FluxFillPipeline` starts an image. With a reference
        picture (Flux Kontext), the mode of its latent distribution (no draw), shifted, scaled and packed
        (`Row.reference`), as `FluxKontextPipeline` takes it; the image runs every step from the noise."""
        from diffusers.utils.torch_utils import randn_tensor

        assert job.spec is not None
        spec, pipe = job.spec, loaded.pipe
        h, w = _latent_size(loaded, spec)
        channels, dtype = pipe.vae.config.latent_channels, cond.cond.dtype
        generator = torch.Generator("cpu").manual_seed(spec.seed)
        scheduler = _scheduler(loaded, spec.steps, (h // 2) * (w // 2))
        first = self.first_step(spec.steps, spec.strength)
        scheduler.set_begin_index(first)
        reference = None if spec.reference is None else _reference_tokens(loaded, moments.picture, dtype)
        image: Tensor | None = None
        if spec.init is not None:
            assert moments.picture is not None, "an img2img row needs its image's latent distribution"
            image = shifted_latents(loaded, moments.picture, generator).to(dtype)
        noise = randn_tensor((1, channels, h, w), generator=generator, device=loaded.device, dtype=dtype)
        latents = noise
        if image is not None:
            latents = scheduler.scale_noise(image, scheduler.timesteps[first : first + 1], noise)
        inpaint, extra = None, None
        if loaded.masked_channels:  # Flux Fill: the masked picture (its draw follows the noise's) and the mask
            extra = _fill_inputs(loaded, spec, moments.masked, generator, (h, w), dtype)
        elif spec.mask is not None and image is not None:  # no draws follow: a Flux step takes no generator
            mask = latent_mask(spec.mask, (h, w), loaded.device, dtype).repeat(1, channels, 1, 1)
            inpaint = Inpaint(*(pipe._pack_latents(t, 1, channels, h, w) for t in (mask, image, noise)))
        latents = pipe._pack_latents(latents, 1, channels, h, w)
        return Row(job, spec, cond, scheduler, latents, index=first, first=first, inpaint=inpaint, extra=extra,
                   reference=reference)  # fmt: skip

    def batch(self, loaded: LoadedPipeline, rows: Sequence[Row]) -> DenoiserBatch:
        """Per-row timestep / 1000 `(B,)`, the text inputs (`text_inputs`), shared image ids `(N, 3)` (with
        reference pictures, of the same size in one forward: `(N + N_ref, 3)`, the reference's tokens after the
        image's). An image with CFG has two rows, positive then negative, at its timestep."""
        pipe = loaded.pipe

        def per_row(values: Sequence[Any]) -> list[Any]:  # one value per image, repeated for its negative row
            return _per_row(rows, values)

        latents = torch.cat(per_row([row.latents for row in rows]))
        timestep = torch.stack(per_row([row.timestep for row in rows])).to(loaded.device, latents.dtype)
        if loaded.masked_channels:  # Flux Fill: each row's masked picture and mask after its latents' channels
            latents = torch.cat([latents, torch.cat(per_row([row.extra for row in rows]))], dim=2)
        if rows[0].reference is not None:  # Kontext: each row's reference tokens after its own
            latents = torch.cat([latents, torch.cat(per_row([row.reference for row in rows]))], dim=1)
        text = self.text_inputs(loaded, rows, int(latents.shape[1]))
        dtype = text["encoder_hidden_states"].dtype
        h, w = _latent_size(loaded, rows[0].spec)
        image_ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, loaded.device, dtype)
        if rows[0].spec.reference is not None:
            image_ids = torch.cat([image_ids, _reference_ids(loaded, rows[0].spec.reference, dtype)])
        kwargs = {"hidden_states": latents, "timestep": timestep / 1000, "img_ids": image_ids, **text}
        return DenoiserBatch(per_row([row.job.selection for row in rows]), kwargs)

    def text_inputs(self, loaded: LoadedPipeline, rows: Sequence[Row], tokens: int) -> dict[str, Any]:
        """The transformer's text inputs for `rows` (`tokens`: the image tokens per row): T5 embeddings `(B, L, D)`
        and CLIP pooled `(B, P)` (positive then negative rows), shared text ids `(L, 3)`, the distilled guidance
        `(B,)` where the transformer takes it."""
        pipe = loaded.pipe
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            scales = _per_row(rows, [row.spec.guidance_scale for row in rows])
            guidance = torch.tensor(scales, dtype=torch.float32).to(loaded.device)
        embeds = torch.cat([t for row in rows for t in cfg_pair(row.cond.cond, row.cond.uncond)])
        pooled = torch.cat([t for row in rows for t in cfg_pair(_pooled(row), row.cond.uncond_pooled)])
        return {"guidance": guidance, "pooled_projections": pooled, "encoder_hidden_states": embeds,
                "txt_ids": text_ids(loaded, embeds.shape[1])}  # fmt: skip

    def cfg_scale(self, spec: ImageSpec) -> float:
        """What an image's negative row's prediction is extrapolated by: Flux's true CFG scale."""
        return spec.true_cfg_scale

    def predictions(self, rows: Sequence[Row], output: Tensor) -> list[Tensor]:
        """`neg + scale * (pos - neg)` for an image with (true) CFG (`cfg_scale`), as `FluxPipeline` combines them;
        the image's own tokens only (a reference's follow them)."""
        output = output[:, : rows[0].latents.shape[1]]
        preds, at = [], 0
        for row in rows:
            pos = output[at : at + 1]
            if row.cfg:
                neg = output[at + 1 : at + 2]
                preds.append(neg + self.cfg_scale(row.spec) * (pos - neg))
                at += 2
            else:
                preds.append(pos)
                at += 1
        return preds

    def vae_latents(self, loaded: LoadedPipeline, rows: Sequence[Row]) -> Tensor:
        """Unpacked `(B, C, h, w)`, then `latents / scaling_factor + shift_factor` as the pipeline decodes."""
        pipe, spec = loaded.pipe, rows[0].spec
        latents = torch.cat([row.latents for row in rows])
        latents = pipe._unpack_latents(latents, spec.height, spec.width, pipe.vae_scale_factor)
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        return latents.to(pipe.vae.device, pipe.vae.dtype)


class FluxKontext(Flux):
    """`FluxKontextPipeline` rows: a request's picture is the reference the image is edited from (every step runs
    from noise; strength does not apply), taken at the Kontext resolution nearest its aspect ratio; without one, a
    row is a plain Flux text-to-image row."""

    edits_from_reference = True

    def check(self, spec: ImageSpec) -> None:
        super().check(spec)
        if spec.mask is not None or spec.init is not None:
            raise BadRequestError(
                "a Flux Kontext pipeline edits from its picture as a reference: inpainting and img2img from a "
                "starting picture are not served on it",
                code="invalid_request",
            )

    def reference_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """`FluxKontextPipeline`'s: the resolution it was trained on (`PREFERRED_KONTEXT_RESOLUTIONS`) whose aspect
        ratio is nearest the picture's."""
        from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

        aspect = size[0] / size[1]
        _, width, height = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        return width, height


def _reference_tokens(loaded: LoadedPipeline, moments: Tensor | None, dtype: torch.dtype) -> Tensor:
    """A reference picture's packed tokens `(1, N_ref, 4C)`: the mode of its latent distribution `moments` (no
    draw), shifted and scaled."""
    assert moments is not None, "a reference row needs its picture's latent distribution"
    latents = shifted_latents(loaded, moments, None).to(dtype)
    _, channels, h, w = latents.shape
    packed: Tensor = loaded.pipe._pack_latents(latents, 1, channels, h, w)
    return packed


def _reference_ids(loaded: LoadedPipeline, reference: Tensor, dtype: torch.dtype) -> Tensor:
    """Position ids `(N_ref, 3)` of a reference picture's packed tokens (`reference`: its pixels `(1, 3, H, W)`):
    the image's grid at its size, first coordinate 1."""
    f = 2 * loaded.vae_scale_factor
    ids: Tensor = loaded.pipe._prepare_latent_image_ids(1, reference.shape[2] // f, reference.shape[3] // f,
                                                        loaded.device, dtype)  # fmt: skip
    ids[..., 0] = 1
    return ids


def _latent_size(loaded: LoadedPipeline, spec: ImageSpec) -> tuple[int, int]:
    """`(h, w)` of the unpacked latents: even, as the pipeline rounds them for the 2x2 packing."""
    f = loaded.vae_scale_factor
    return 2 * (spec.height // (f * 2)), 2 * (spec.width // (f * 2))


def _fill_inputs(
    loaded: LoadedPipeline,
    spec: ImageSpec,
    masked: Tensor | None,
    gen: torch.Generator,
    size: tuple[int, int],
    dtype: torch.dtype,
) -> Tensor:
    """What `FluxFillPipeline` feeds its transformer after a row's packed latents `(1, N, 4C + 4f^2)`: a draw from
    the masked picture's latent distribution (`masked`), shifted and scaled, packed; then the pixel mask folded
    into `f x f` channels per latent pixel, packed."""
    assert masked is not None and spec.mask is not None, "a Flux Fill row needs its masked picture and mask"
    pipe, (h, w), f = loaded.pipe, size, loaded.vae_scale_factor
    channels = pipe.vae.config.latent_channels
    picture = shifted_latents(loaded, masked, gen)
    mask = spec.mask.to(loaded.device, dtype)[:, 0].view(1, h, f, w, f).permute(0, 2, 4, 1, 3).reshape(1, f * f, h, w)
    packed = [pipe._pack_latents(picture.to(dtype), 1, channels, h, w), pipe._pack_latents(mask, 1, f * f, h, w)]
    return torch.cat(packed, dim=-1)


def text_ids(loaded: LoadedPipeline, length: int) -> Tensor:
    """The text tokens' position ids `(L, 3)`: zeros, in the text encoder's dtype (the transformer's without one)."""
    pipe = loaded.pipe
    encoder = getattr(pipe, "text_encoder", None)
    dtype = encoder.dtype if encoder is not None else pipe.transformer.dtype
    return torch.zeros(length, 3).to(device=loaded.device, dtype=dtype)


def _per_row(rows: Sequence[Row], values: Sequence[Any]) -> list[Any]:
    """One value per image, repeated for its negative row."""
    return [v for v, row in zip(values, rows, strict=True) for _ in range(2 if row.cfg else 1)]


def _true_cfg(spec: ImageSpec) -> bool:
    """As `FluxPipeline`: a negative prompt given (even "") and `true_cfg_scale` above 1."""
    return spec.negative_prompt is not None and spec.true_cfg_scale > 1.0


def cfg_pair(pos: Tensor, neg: Tensor | None) -> list[Tensor]:
    """An image's denoiser rows' values: positive, then negative with CFG."""
    return [pos] if neg is None else [pos, neg]


def _pooled(row: Row) -> Tensor:
    assert row.cond.pooled is not None
    return row.cond.pooled


def _scheduler(loaded: LoadedPipeline, steps: int, seq_len: int) -> Any:
    """An image's own flow-matching scheduler, its sigmas and shift (`mu`, from the packed sequence length) set as
    `FluxPipeline` sets them."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    pipe = loaded.pipe
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    config = scheduler.config
    sigmas = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps).tolist()
    mu = calculate_shift(
        seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5), config.get("max_shift", 1.15),
    )  # fmt: skip
    retrieve_timesteps(scheduler, steps, loaded.device, sigmas=sigmas, mu=mu)
    return scheduler
