"""The batched work of a step: text encoding of new images, one denoiser forward, VAE decoding.

Every forward runs inside `lokr.adapter_batch(container, specs)`, `specs[i]` being batch row i's adapters, so
rows with different adapters and scales share it (both CFG rows of an image use the image's adapters). What
differs between pipeline families (inputs, predictions, latents layout) is the family's (`family`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

import lokr
from lokr.batch import RowSpec

from .family import denoiser
from .init_image import model_pixels
from .load import LoadedPipeline
from .rows import Conditioning, ImageJob, ImageSpec, Moments, Row

__all__ = [
    "VAE_PIXELS", "by_selection", "decode", "denoise", "encode", "encode_starts", "masked_key", "moments_of",
    "picture_key",
]  # fmt: skip

VAE_PIXELS = 1 << 22  # output pixels per VAE forward (4 images of 1024x1024): bounds the decoder's activations


@torch.inference_mode()
def encode(loaded: LoadedPipeline, jobs: Sequence[ImageJob], fold: int = 0) -> list[Conditioning]:
    """Encode every prompt (and negative prompt) of `jobs` in one batch per text encoder (`fold`: as `denoise`'s;
    a block with a smaller one drops the folded weights every layer of the pipeline keeps beyond it)."""
    return loaded.ops.encode(loaded, jobs, fold)


def picture_key(spec: ImageSpec) -> object:
    """Where `encode_starts` keeps the latent distribution of `spec`'s starting (or reference) picture (the images
    of a request share the picture's pixels, and so its encoding)."""
    return id(_picture(spec))


def _picture(spec: ImageSpec) -> Tensor | None:
    """The picture a row's VAE encoding is of: its starting picture, or its reference (Flux Kontext)."""
    return spec.init if spec.init is not None else spec.reference


def masked_key(spec: ImageSpec) -> object:
    """Where `encode_starts` keeps the latent distribution of `spec`'s masked picture (an inpainting model's)."""
    return id(spec.init), id(spec.mask)


def moments_of(starts: Mapping[object, Tensor], spec: ImageSpec) -> Moments:
    """What `spec`'s row starts from, of `encode_starts`' answer."""
    return Moments(starts.get(picture_key(spec)), starts.get(masked_key(spec)))


@torch.inference_mode()
def encode_starts(loaded: LoadedPipeline, jobs: Sequence[ImageJob]) -> dict[object, Tensor]:
    """The VAE's latent distribution `(1, 2C, h, w)` (mean and log-variance) of every distinct starting (or
    reference) picture of `jobs` (`picture_key`) and, for an inpainting model, of every distinct masked picture
    (`masked_key`: the picture with the repainted pixels zeroed, as the inpainting pipelines make it): one encoder
    forward per size (up to `VAE_PIXELS` of pictures each)."""
    distinct: dict[object, Tensor] = {}
    for job in jobs:
        spec = job.spec
        picture = None if spec is None else _picture(spec)
        if spec is None or picture is None:
            continue
        distinct.setdefault(picture_key(spec), picture)
        init, mask = spec.init, spec.mask
        if loaded.masked_channels and init is not None and mask is not None and masked_key(spec) not in distinct:
            distinct[masked_key(spec)] = model_pixels(init) * ~mask
    by_size: dict[tuple[int, ...], list[object]] = {}
    for key, pixels in distinct.items():
        by_size.setdefault(tuple(pixels.shape), []).append(key)
    vae, out = loaded.pipe.vae, dict[object, Tensor]()
    for size, same in by_size.items():
        per_call = max(1, VAE_PIXELS // (size[-1] * size[-2]))  # as `decode`: the encoder's activations are bounded
        for first in range(0, len(same), per_call):
            keys = same[first : first + per_call]
            floats = [p if p.is_floating_point() else model_pixels(p) for p in (distinct[key] for key in keys)]
            moments = vae.encode(torch.cat(floats).to(loaded.device, vae.dtype)).latent_dist.parameters
            out.update((key, moments[i : i + 1]) for i, key in enumerate(keys))
    return out


def by_selection(rows: Sequence[Row]) -> list[Row]:
    """`rows` reordered so that rows with the same adapter selection are consecutive (first-seen order): each
    folded layer op then reads one slice of the batch, with no gather / scatter per selection."""
    groups: dict[object, list[Row]] = {}
    for row in rows:
        groups.setdefault(_selection_key(row.job.selection), []).append(row)
    return [row for group in groups.values() for row in group]


def _selection_key(selection: RowSpec) -> object:
    if selection is None or isinstance(selection, str):
        return selection
    pairs = selection.items() if isinstance(selection, Mapping) else selection
    return tuple(sorted((str(name), float(scale)) for name, scale in pairs))


@torch.inference_mode()
def denoise(loaded: LoadedPipeline, rows: Sequence[Row], fold: int = 0) -> None:
    """One denoiser forward over `rows` (one of `Family.forwards`' groups), then each row's own scheduler step;
    advances `index`.

    `fold`: `lokr.adapter_batch`'s folded weight copies kept per layer (one-adapter steps, and mixed steps of at
    most `fold` row selections that fold), reused by the next steps with the same adapters."""
    family = loaded.ops
    rows = by_selection(rows)
    batch = family.batch(loaded, rows)
    with lokr.adapter_batch(loaded.container, batch.specs, fold=fold):
        output = denoiser(loaded, family)(**batch.kwargs, return_dict=False)[0]
    for row, pred in zip(rows, family.predictions(rows, output), strict=True):
        if row.previewing:
            row.preview = family.preview(row, pred)
        row.latents = row.scheduler.step(pred, row.timestep, row.latents, **row.step_kwargs, return_dict=False)[0]
        row.index += 1
        family.keep_picture(row)


@torch.inference_mode()
def decode(loaded: LoadedPipeline, rows: Sequence[Row], pixels: int = VAE_PIXELS) -> list[Any]:
    """VAE-decode `rows` (same size), as many images per VAE forward as `pixels` of output allow (at least one; the
    decoder's activations grow with the pixels: 16 SDXL images at 1024x1024 in one forward would need tens of
    GB); PIL images in row order. A slice that runs out of device memory is decoded again one image at a time."""
    latents = loaded.ops.vae_latents(loaded, rows)
    per_call = max(1, pixels // (rows[0].spec.width * rows[0].spec.height))
    parts = [_decode_slice(loaded, latents[i : i + per_call]) for i in range(0, len(rows), per_call)]
    images: list[Any] = loaded.pipe.image_processor.postprocess(torch.cat(parts), output_type="pil")
    return images


def _decode_slice(loaded: LoadedPipeline, latents: Tensor) -> Tensor:
    vae = loaded.pipe.vae
    try:
        decoded: Tensor = vae.decode(latents, return_dict=False)[0]
    except torch.OutOfMemoryError:
        if latents.shape[0] == 1:
            raise
        if loaded.device.type == "cuda":
            torch.cuda.empty_cache()
        return torch.cat([vae.decode(latents[i : i + 1], return_dict=False)[0] for i in range(latents.shape[0])])
    return decoded
