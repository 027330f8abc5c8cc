"""AUTOMATIC1111's API: `POST /sdapi/v1/txt2img` and `/sdapi/v1/img2img` (adapters as `<lora:NAME:WEIGHT>` tags,
`sampler_name`, `scheduler`), `GET /sdapi/v1/loras`, `/sdapi/v1/samplers`, `/sdapi/v1/schedulers`, and what clients
read or set as they connect: `/sdapi/v1/sd-models`, `/sdapi/v1/options`, the upscalers and the lists of what this
server does not keep (VAEs, styles, embeddings); `/sdapi/v1/progress`."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from ..disconnect import until_disconnected
from ..errors import BadRequestError
from ..routes.deps import ApiAuth, Components, Deps
from .backend import HIRES_NAMES, size_unit
from .controlnet import control_unit
from .front import A1111_NAMES, ImageFront, image_b64, seed_or_random
from .hires import LATENT_UPSCALERS, PIXEL_UPSCALERS, Hires, hires_pass, upscaled_to
from .init_image import decode_b64
from .inpaint import Repaint, a1111_mask, repaint_plan
from .lora_tags import parse_lora_tags
from .routes import front
from .rows import ImageSpec
from .samplers import sampler_listing, schedule_listing
from .schemas import A1111Request, Img2ImgRequest, Txt2ImgRequest

__all__ = ["router"]

router = APIRouter(dependencies=[ApiAuth], tags=["automatic1111"])
# A1111's img2img resize modes served: just resize, crop and resize, resize and fill (diffusers' `resize_mode`s
# are written after them); 3, latent upscaling, is not
RESIZE_MODES = {0: "default", 1: "crop", 2: "fill"}


@router.post("/sdapi/v1/txt2img")
async def txt2img(body: Txt2ImgRequest, c: Deps, request: Request) -> dict[str, Any]:
    """`batch_size * n_iter` images, seeds `seed, seed + 1, ...` (seed -1: random)."""
    images = front(c)
    width, height = images.default_size
    size = (body.width or width, body.height or height)
    if body.enable_hr and images.backend.loaded.ops.edits_from_reference:
        raise BadRequestError(
            "enable_hr: the hires fix's second pass is img2img, which a Flux Kontext pipeline does not do (it edits "
            "from a picture as a reference): leave enable_hr out",
            code="invalid_request",
        )
    hires = hires_pass(body, size, size_unit(images.backend.loaded)) if body.enable_hr else None
    return await _generate(body, c, request, size, body.batch_size, hires=hires)


@router.post("/sdapi/v1/img2img")
async def img2img(body: Img2ImgRequest, c: Deps, request: Request) -> dict[str, Any]:
    """Images that start from `init_images` (`denoising_strength`: the share of the schedule run, as diffusers'
    img2img `strength`); sized as asked (the image stretched) or as the first image."""
    images = front(c)
    if body.resize_mode not in RESIZE_MODES:
        raise BadRequestError(
            f"resize_mode {body.resize_mode} is not served; 0 (just resize), 1 (crop and resize) and 2 (resize and "
            "fill) are (3, latent upscaling, is not)",
            code="invalid_request",
        )
    if len(body.init_images) > 1 and body.batch_size < len(body.init_images):
        raise BadRequestError(
            f"{len(body.init_images)} init_images for batch_size {body.batch_size}: send one image (it serves the "
            "whole batch) or at most batch_size",
            code="invalid_request",
        )
    starts = await run_in_threadpool(_open_all, images, body.init_images)  # up to the body limit: off the loop
    size = images.output_size(starts[0], body.width, body.height)
    repaint = None if body.mask is None else await run_in_threadpool(_repaint, images, body, size, starts)
    batch = body.batch_size if len(starts) == 1 else len(starts)
    strength = images.strength(body.denoising_strength)
    start = Start(starts, strength, repaint, body.mask_blur, RESIZE_MODES[body.resize_mode])
    return await _generate(body, c, request, size, batch, start)


@dataclass(frozen=True)
class Start:
    """Where img2img images start: the pictures (image k from `images[k % len]`), the strength, and for
    inpainting what is repainted (`blur`: the mask's, as asked); `resize`: how pictures take the output size."""

    images: list[Any]
    strength: float
    repaint: Repaint | None = None
    blur: int = 0
    resize: str = "default"


def _open_all(images: ImageFront, texts: list[str]) -> list[Any]:
    """`init_images` as PIL images; a 400 naming the first that is not base64 of an image file."""
    fields = [f"init_images[{i}]" for i in range(len(texts))]
    return images.starting_images([(field, decode_b64(text, field)) for field, text in zip(fields, texts)])


def _repaint(images: ImageFront, body: Img2ImgRequest, size: tuple[int, int], starts: list[Any]) -> Repaint:
    """What the request repaints: its mask as A1111 reads it (`inpaint.a1111_mask`), blurred by `mask_blur`,
    with `inpaint_full_res` ("only masked") the region around it; a 400 for a mask that is not an image."""
    assert body.mask is not None
    mask = a1111_mask(images.mask_image(decode_b64(body.mask, "mask"), "mask"), bool(body.inpainting_mask_invert))
    padding = body.inpaint_full_res_padding if body.inpaint_full_res else None
    return repaint_plan(mask, body.mask_blur, padding, size, starts)


async def _generate(
    body: A1111Request,
    c: Components,
    request: Request,
    size: tuple[int, int],
    batch: int,
    start: Start | None = None,
    hires: Hires | None = None,
) -> dict[str, Any]:
    """`batch * n_iter` images of `size`, seeds `seed, seed + 1, ...`; from `start` when given; then `hires`'
    pass, when given. A1111's answer: base64 PNGs, the body, and `info` as JSON text."""
    images = front(c)
    prompt, tags = parse_lora_tags(body.prompt)
    sel = images.select(None, [(tag.name, tag.unet) for tag in tags])
    text_sel = None if all(t.te == t.unet for t in tags) else images.select(None, [(t.name, t.te) for t in tags])
    request.scope["lokr_adapter"] = sel.label
    seed = seed_or_random(body.seed)
    unit, control, field = control_unit(body.alwayson_scripts), None, "alwayson_scripts.controlnet image"
    if unit is not None:
        control = await run_in_threadpool(images.control_pixels, unit.image, size, field, unit.resize_mode)
    spec = ImageSpec(
        prompt=prompt,
        negative_prompt=body.negative_prompt,
        width=size[0],
        height=size[1],
        steps=body.steps,
        guidance_scale=body.cfg_scale,
        seed=seed,
        true_cfg_scale=1.0 if body.true_cfg_scale is None else body.true_cfg_scale,
        guidance_rescale=body.guidance_rescale or 0.0,
        sampler=images.sampler(body.sampler_name or body.sampler_index, body.scheduler),
        strength=1.0 if start is None else start.strength,
        clip_skip=clip_skip_of(body.override_settings, c.settings.base_name),
        a1111_prompts=True,
        latent_output=hires is not None and hires.latent is not None,
        control=control,
        control_scale=1.0 if unit is None else unit.weight,
        control_start=0.0 if unit is None else unit.start,
        control_end=1.0 if unit is None else unit.end,
    )
    count = batch * body.n_iter
    specs = images.specs(spec, count, A1111_NAMES, masked=start is not None and start.repaint is not None)
    second = None
    if hires is not None:  # checked before the first pass runs
        if unit is not None:  # the control image again, at the second pass's size
            control = await run_in_threadpool(images.control_pixels, unit.image, hires.size, field, unit.resize_mode)
        hr_spec = replace(spec, width=hires.size[0], height=hires.size[1], steps=hires.steps, strength=hires.strength,
                          latent_output=False, control=control)  # fmt: skip
        second = images.specs(hr_spec, count, HIRES_NAMES)
    if start is not None:
        specs = await run_in_threadpool(images.starting_from, specs, start.images, start.repaint, start.resize)
    pictures = await images.generate(specs, sel, lambda: until_disconnected(request), text_sel)
    if start is not None and start.repaint is not None and start.repaint.crop is not None:
        pictures = await run_in_threadpool(images.overlaid, pictures, start.images, start.repaint)
    if hires is not None and second is not None:
        upscaled = await run_in_threadpool(upscaled_to, hires, pictures, images.backend.loaded.vae_scale_factor)
        if hires.latent is None:
            second = await run_in_threadpool(images.starting_from, second, upscaled)
        else:
            second = [replace(s, init_latents=latents) for s, latents in zip(second, upscaled, strict=True)]
        pictures = await images.generate(second, sel, lambda: until_disconnected(request), text_sel)
    encoded = [await run_in_threadpool(image_b64, p) for p in pictures]
    info = {
        "prompt": prompt, "all_prompts": [prompt] * count, "negative_prompt": body.negative_prompt,
        "seed": seed, "all_seeds": [s.seed for s in specs], "width": spec.width, "height": spec.height,
        "steps": spec.steps, "cfg_scale": spec.guidance_scale, "sd_model_name": c.settings.base_name,
        "loras": [{"name": t.name, "weight": t.unet, "te": t.te, "unet": t.unet} for t in tags],
    }  # fmt: skip
    if start is not None:
        info["denoising_strength"] = spec.strength
        if start.repaint is not None:
            info.update(mask_blur=start.blur, inpainting_fill=1, inpaint_full_res=start.repaint.crop is not None)
    if hires is not None:
        info.update(denoising_strength=hires.strength, hr_upscaler=hires.upscaler, hr_second_pass_steps=hires.steps,
                    hr_resize_x=hires.size[0], hr_resize_y=hires.size[1])  # fmt: skip
    info["clip_skip"] = 1 if spec.clip_skip is None else spec.clip_skip + 1
    if spec.guidance_rescale > 0.0:
        info["guidance_rescale"] = spec.guidance_rescale
    info["sampler_name"], info["scheduler"] = images.sampler_label(spec.sampler)
    if unit is not None:
        info["controlnet"] = {"weight": unit.weight, "guidance_start": unit.start, "guidance_end": unit.end}
    parameters = body.model_dump(exclude={"init_images", "mask"})  # A1111 leaves the images out of `parameters` too
    return {"images": encoded, "parameters": parameters, "info": json.dumps(info)}


@router.get("/sdapi/v1/loras")
async def loras(c: Deps) -> list[dict[str, Any]]:
    """Every loaded adapter, as A1111 lists LoRA/LyCORIS files; `path` is the file's name only (the server's
    directories are for the admin API, as in `/v1/adapters`' public listings)."""
    front(c)
    assert c.registry is not None
    return [
        {"name": r.name, "alias": r.name, "path": r.source.name, "metadata": {"format": r.info.format}}
        for r in c.registry.records()
        if r.info is not None
    ]


@router.get("/sdapi/v1/upscalers")
async def upscalers(c: Deps) -> list[dict[str, Any]]:
    """The pixel upscalers the hires fix takes as `hr_upscaler` (no upscaling models)."""
    front(c)
    return [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4} for n in PIXEL_UPSCALERS]


@router.get("/sdapi/v1/latent-upscale-modes")
async def latent_upscale_modes(c: Deps) -> list[dict[str, str]]:
    """The latent upscalers the hires fix takes as `hr_upscaler`."""
    front(c)
    return [{"name": name} for name in LATENT_UPSCALERS]


@router.get("/sdapi/v1/sd-vae")
@router.get("/sdapi/v1/prompt-styles")
@router.get("/sdapi/v1/hypernetworks")
@router.get("/sdapi/v1/face-restorers")
async def none_here(c: Deps) -> list[Any]:
    """What A1111 keeps beside the checkpoint and clients list as they connect, none of which this server has: other
    VAEs (the pipeline's own is used), saved styles, hypernetworks, face restorers."""
    front(c)
    return []


@router.get("/sdapi/v1/embeddings")
async def embeddings(c: Deps) -> dict[str, dict[str, Any]]:
    """Textual-inversion embeddings: none are loaded on this server."""
    front(c)
    return {"loaded": {}, "skipped": {}}


@router.post("/sdapi/v1/refresh-loras")
async def refresh_loras(c: Deps) -> None:
    """Clients ask A1111 to rescan its LoRA folder; here `/sdapi/v1/loras` is always the registry's current list
    (adapters load through the admin API), so there is nothing to rescan."""
    front(c)


@router.get("/sdapi/v1/samplers")
async def samplers(c: Deps) -> list[dict[str, Any]]:
    """The samplers `sampler_name` takes on this pipeline, with their aliases and the diffusers class each is."""
    loaded = front(c).backend.loaded
    return await run_in_threadpool(sampler_listing, loaded.pipe.scheduler, loaded.ops.flow)


@router.get("/sdapi/v1/schedulers")
async def schedulers(c: Deps) -> list[dict[str, Any]]:
    """The schedule types `scheduler` takes on this pipeline."""
    return schedule_listing(front(c).backend.loaded.ops.flow)


@router.get("/sdapi/v1/sd-models")
async def sd_models(c: Deps) -> list[dict[str, Any]]:
    """The one checkpoint this server serves (clients list it before they pick one)."""
    front(c)
    name = c.settings.base_name
    return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}]


@router.get("/sdapi/v1/options")
async def options(c: Deps) -> dict[str, Any]:
    """The options a client reads at connect time: which checkpoint is loaded."""
    front(c)
    return {"sd_model_checkpoint": c.settings.base_name, "sd_checkpoint_hash": None}


@router.post("/sdapi/v1/options")
async def set_options(body: dict[str, Any], c: Deps) -> None:
    """Choosing the checkpoint this server already serves is accepted (clients do so before generating); other
    checkpoints, and options this server does not have, are 400s rather than silently ignored."""
    front(c)
    _check_checkpoint(body.get("sd_model_checkpoint"), c.settings.base_name)
    others = sorted(k for k in body if k != "sd_model_checkpoint")
    if others:
        raise BadRequestError(
            f"options not settable on this server: {', '.join(others[:10])}; only sd_model_checkpoint is (CLIP "
            "skip is per request: override_settings.CLIP_stop_at_last_layers)",
            code="invalid_request",
        )


def clip_skip_of(overrides: dict[str, Any] | None, base: str) -> int | None:
    """diffusers' `clip_skip` from A1111's `override_settings` (`CLIP_stop_at_last_layers` N: N - 1; 1, the last
    layer, is None); the checkpoint may only be this server's; other settings are 400s, not ignored."""
    overrides = overrides or {}
    _check_checkpoint(overrides.get("sd_model_checkpoint"), base)
    others = sorted(k for k in overrides if k not in ("sd_model_checkpoint", "CLIP_stop_at_last_layers"))
    if others:
        raise BadRequestError(
            f"override_settings not served: {', '.join(others[:10])}; CLIP_stop_at_last_layers and "
            "sd_model_checkpoint are",
            code="invalid_request",
        )
    stop = overrides.get("CLIP_stop_at_last_layers")
    if stop is None:
        return None
    if not isinstance(stop, int) or isinstance(stop, bool) or stop < 1:
        raise BadRequestError(
            f"override_settings.CLIP_stop_at_last_layers must be a whole number from 1 (the last layer), got {stop!r}",
            code="invalid_request",
        )
    return None if stop == 1 else stop - 1


def _check_checkpoint(wanted: Any, base: str) -> None:
    if wanted is not None and wanted != base:
        raise BadRequestError(
            f"this server serves one checkpoint, {base!r}; adapters are chosen per request (<lora:NAME:WEIGHT>)",
            code="model_not_found",
        )


@router.get("/sdapi/v1/progress")
async def progress(c: Deps) -> dict[str, Any]:
    """A1111's progress poll, for the whole server (as A1111's is): the share of denoiser forwards the running
    images have done, and the seconds left estimated from recent steps. No preview image (`current_image`)."""
    now = front(c).backend.progress()
    state = {
        "skipped": False, "interrupted": False, "job": "", "job_count": now.running + now.waiting,
        "job_timestamp": "", "job_no": 0, "sampling_step": now.done, "sampling_steps": now.total,
    }  # fmt: skip
    share = now.done / now.total if now.total else 0.0
    return {"progress": share, "eta_relative": now.eta_s, "state": state, "current_image": None, "textinfo": None}
