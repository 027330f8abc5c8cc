"""The batched work of a step: text encoding of new images, one denoiser forward, VAE decoding.

Every forward runs inside `lokr.adapter_batch(container, specs)`, `specs[i]` being row i's adapters, so
rows with different adapters and scales share it (both CFG rows of an image use the image's adapters).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

import lokr
from lokr.batch import RowSpec

from .load import LoadedPipeline
from .rows import Conditioning, ImageJob, Row

__all__ = ["by_selection", "decode", "denoise", "encode"]


def _needs_cfg(loaded: LoadedPipeline, guidance_scale: float) -> bool:
    return guidance_scale > 1.0 and loaded.uses_cfg_model


@torch.inference_mode()
def encode(loaded: LoadedPipeline, jobs: Sequence[ImageJob]) -> list[Conditioning]:
    """Encode every prompt and negative prompt of `jobs` in one batch per text encoder.

    A negative prompt of None is "" (SD) or, where the SDXL pipeline zeroes empty prompts, zeros.
    """
    texts: list[str] = []
    specs: list[RowSpec] = []
    plan: list[tuple[int, int | None]] = []  # per job: (prompt index, negative index | None = zeros / no CFG)
    zero_neg = loaded.family == "sdxl" and bool(loaded.pipe.config.get("force_zeros_for_empty_prompt", False))
    for job in jobs:
        assert job.spec is not None
        p = len(texts)
        texts.append(job.spec.prompt)
        specs.append(job.selection)
        neg: int | None = None
        if _needs_cfg(loaded, job.spec.guidance_scale) and not (zero_neg and job.spec.negative_prompt is None):
            neg = len(texts)
            texts.append(job.spec.negative_prompt or "")
            specs.append(job.selection)
        plan.append((p, neg))
    with lokr.adapter_batch(loaded.container, specs):
        out = loaded.pipe.encode_prompt(texts, device=loaded.device, num_images_per_prompt=1,
                                        do_classifier_free_guidance=False)  # fmt: skip
    embeds: Tensor = out[0]
    pooled: Tensor | None = out[2] if loaded.family == "sdxl" else None
    result = []
    for job, (p, n) in zip(jobs, plan):
        assert job.spec is not None
        cfg = _needs_cfg(loaded, job.spec.guidance_scale)
        cond = Conditioning(embeds[p : p + 1], None, _row(pooled, p))
        if cfg:
            cond.uncond = embeds[n : n + 1] if n is not None else torch.zeros_like(cond.cond)
            if pooled is not None:
                cond.uncond_pooled = _row(pooled, n) if n is not None else torch.zeros_like(pooled[p : p + 1])
        result.append(cond)
    return result


def _row(t: Tensor | None, i: int) -> Tensor | None:
    return None if t is None else t[i : i + 1]


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
    """One denoiser forward over `rows` (same size), then each row's own scheduler step; advances `index`.

    `fold`: `lokr.adapter_batch`'s folded weights kept per layer (for steps whose rows use one adapter)."""
    pipe = loaded.pipe
    rows = by_selection(rows)
    inputs: list[Tensor] = []
    timesteps: list[Tensor] = []
    hidden: list[Tensor] = []
    specs: list[RowSpec] = []
    pooled: list[Tensor] = []
    time_ids: list[Tensor] = []
    for row in rows:
        t = row.timestep
        copies = 2 if row.cfg else 1
        x = row.scheduler.scale_model_input(torch.cat([row.latents] * copies), t)
        inputs.append(x)
        timesteps.extend([t] * copies)
        hidden.extend(_cfg_pair(row.cond.uncond, row.cond.cond))
        specs.extend([row.job.selection] * copies)
        if loaded.family == "sdxl":
            pooled.extend(_cfg_pair(row.cond.uncond_pooled, row.cond.pooled))
            time_ids.extend([_time_ids(row)] * copies)
    added: dict[str, Tensor] | None = None
    if loaded.family == "sdxl":
        added = {"text_embeds": torch.cat(pooled).to(loaded.device), "time_ids": torch.cat(time_ids).to(loaded.device)}
    sample = torch.cat(inputs)
    with lokr.adapter_batch(loaded.container, specs, fold=fold):
        noise = pipe.unet(sample, torch.stack(timesteps).to(loaded.device), encoder_hidden_states=torch.cat(hidden),
                          added_cond_kwargs=added, return_dict=False)[0]  # fmt: skip
    offset = 0
    for row in rows:
        if row.cfg:
            uncond, text = noise[offset : offset + 1], noise[offset + 1 : offset + 2]
            pred = uncond + row.spec.guidance_scale * (text - uncond)
            offset += 2
        else:
            pred = noise[offset : offset + 1]
            offset += 1
        row.latents = row.scheduler.step(pred, row.timestep, row.latents, **row.step_kwargs, return_dict=False)[0]
        row.index += 1


def _cfg_pair(uncond: Tensor | None, cond: Tensor | None) -> list[Tensor]:
    """The rows of one image in the denoiser batch: `[uncond, cond]` with CFG, else `[cond]`."""
    assert cond is not None
    return [cond] if uncond is None else [uncond, cond]


def _time_ids(row: Row) -> Tensor:
    """SDXL's micro-conditioning `(1, 6)`: original size, crop (0, 0), target size, as the pipeline's defaults."""
    h, w = row.spec.height, row.spec.width
    return torch.tensor([[h, w, 0, 0, h, w]], dtype=row.cond.cond.dtype)


@torch.inference_mode()
def decode(loaded: LoadedPipeline, rows: Sequence[Row]) -> list[Any]:
    """VAE-decode `rows` (same size) in one batch; PIL images in row order."""
    vae = loaded.pipe.vae
    latents = torch.cat([row.latents for row in rows]).to(vae.dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if loaded.family == "sdxl" and mean is not None and std is not None:
        shape = (1, len(mean), 1, 1)
        m = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
        s = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
        latents = latents * s / vae.config.scaling_factor + m
    else:
        latents = latents / vae.config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]
    images: list[Any] = loaded.pipe.image_processor.postprocess(image, output_type="pil")
    return images
