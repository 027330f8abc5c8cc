"""OpenAI's images API on an image server (generations; edits as img2img), and clear 400s for routes of the other
model kind."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from ..disconnect import unless_gone, until_disconnected
from ..errors import BadRequestError, NotReadyError, http_error_for
from ..inference import Selection
from ..routes.deps import ApiAuth, Components, Deps
from ..sse import STREAMABLE, SseResponse, sse_event
from .front import ImageFront, image_b64, seed_or_random
from .inpaint import Repaint, openai_mask
from .rows import ImageSpec
from .schemas import ImageEditRequest, ImageGenerationRequest

__all__ = ["lm_refusals", "refusals_of", "router"]

router = APIRouter(dependencies=[ApiAuth], tags=["images"])
_SIZE = re.compile(r"^(\d+)x(\d+)$")
Selections = tuple[Selection, Selection | None]  # the denoiser's adapters, and the text encoders' where they differ


def front(c: Components) -> ImageFront:
    if c.images is None:
        raise NotReadyError("the pipeline is still loading; retry shortly")
    images: ImageFront = c.images
    return images


def parse_size(size: str | None, default: tuple[int, int]) -> tuple[int, int]:
    if size is None or size == "auto":
        return default
    match = _SIZE.match(size)
    if match is None:
        raise BadRequestError(f'size must be "WIDTHxHEIGHT" (e.g. "512x512"), got {size!r}', code="invalid_size")
    return int(match.group(1)), int(match.group(2))


@router.post("/v1/images/generations", response_model=None, responses=STREAMABLE)
async def generations(body: ImageGenerationRequest, c: Deps, request: Request) -> dict[str, Any] | StreamingResponse:
    """OpenAI-compatible image generation; image k of the request uses seed `seed + k`."""
    images = front(c)
    size = parse_size(body.size, images.default_size)
    sel = _selection(images, body, request)
    specs = images.specs(replace(_spec(images, body, size), control=await _control(images, body, size)), body.n)
    if body.stream:
        return await _stream(images, body, specs, sel, request, "image_generation")
    return await _answer(images, body, specs, sel, request)


def _edit_form_schema() -> dict[str, Any]:
    """The multipart body of `/v1/images/edits` for the OpenAPI document (the route reads the form itself)."""
    properties = dict(ImageEditRequest.model_json_schema()["properties"])
    properties["adapters"] = {"type": "string", "description": 'JSON text, e.g. [{"name": "ink", "scale": 0.8}]'}
    properties = {"image": {"type": "string", "format": "binary", "description": "the starting picture (on a Flux "
                            "Kontext pipeline: the reference the image is edited from)"},
                  "mask": {"type": "string", "format": "binary", "description": "inpainting: a PNG of the image's "
                           "size whose fully transparent pixels are edited"}, **properties}  # fmt: skip
    schema = {"type": "object", "required": ["image", "prompt"], "properties": properties}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


@router.post("/v1/images/edits", openapi_extra=_edit_form_schema(), response_model=None, responses=STREAMABLE)
async def edits(c: Deps, request: Request) -> dict[str, Any] | StreamingResponse:
    """OpenAI's image edits (multipart form) as img2img: every image starts from the form's `image` file, at
    `strength`; sized as `size` (the image stretched) or as the image. With a `mask` file (the image's size; its
    fully transparent pixels are edited), inpainting. On a Flux Kontext pipeline the image is the reference each
    image is edited from (`ImageFront.starting_from`). Image k uses seed `seed + k`."""
    images = front(c)
    async with request.form(max_files=4, max_fields=64) as form:
        body, upload, mask_upload = _edit_form(form)
        data = await upload.read()
        mask_data = None if mask_upload is None else await mask_upload.read()
    (start,) = await run_in_threadpool(images.starting_images, [("image", data)])
    mask = None if mask_data is None else await run_in_threadpool(_edit_mask, images, mask_data, start.size)
    size = parse_size(body.size, images.output_size(start, None, None))
    sel = _selection(images, body, request)
    control = await _control(images, body, size)
    spec = replace(_spec(images, body, size, images.strength(body.strength)), control=control)
    specs = images.specs(spec, body.n, masked=mask is not None)
    specs = await run_in_threadpool(images.starting_from, specs, [start], mask)
    if body.stream:
        return await _stream(images, body, specs, sel, request, "image_edit")
    return await _answer(images, body, specs, sel, request)


async def _control(images: ImageFront, body: ImageGenerationRequest, size: tuple[int, int]) -> Any:
    """The request's `control_image` prepared for images of `size` (`ImageFront.control_pixels`), or None."""
    if body.control_image is None:
        return None
    return await run_in_threadpool(images.control_pixels, body.control_image, size)


def _edit_mask(images: ImageFront, data: bytes, image_size: tuple[int, int]) -> Repaint:
    """OpenAI's mask file (transparent: edited) as what to repaint, over the whole picture; 400s as
    `openai_mask`'s."""
    return Repaint(openai_mask(images.mask_image(data, "mask"), image_size))


def _edit_form(form: FormData) -> tuple[ImageEditRequest, UploadFile, UploadFile | None]:
    """The edit's fields, validated, its one image file and its mask file, if any; a 400 for several images, none,
    or a mask that is not a file."""
    files = [(key, value) for key, value in form.multi_items() if isinstance(value, UploadFile)]
    masks = [value for key, value in files if key == "mask"]
    pictures = [(key, value) for key, value in files if key != "mask"]
    if len(pictures) != 1 or pictures[0][0] not in ("image", "image[]") or len(masks) > 1:
        raise BadRequestError(
            f"send one image file as the multipart/form-data field `image` (got {len(pictures)} files), and at most "
            "one `mask` file; several images are not served",
            code="invalid_image",
        )
    if "mask" in form and not masks:
        raise BadRequestError("mask must be a file: a PNG whose transparent pixels mark what to edit",
                              code="invalid_image")  # fmt: skip
    fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
    try:
        body = ImageEditRequest.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc
    return body, pictures[0][1], masks[0] if masks else None


def _selection(images: ImageFront, body: ImageGenerationRequest, request: Request) -> Selections:
    """The denoiser's adapters, and the text encoders' where an adapter's `text_encoder_scale` differs (else None)."""
    if body.response_format == "url":
        raise BadRequestError('response_format "url" is not served; use "b64_json"', code="invalid_response_format")
    refs = body.adapters or []
    sel = images.select(body.model, [(a.name, a.scale) for a in refs])
    request.scope["lokr_adapter"] = sel.label
    if all(a.text_encoder_scale in (None, a.scale) for a in refs):
        return sel, None
    text = [(a.name, a.scale if a.text_encoder_scale is None else a.text_encoder_scale) for a in refs]
    return sel, images.select(body.model, text)


def _spec(images: ImageFront, body: ImageGenerationRequest, size: tuple[int, int], strength: float = 1.0) -> ImageSpec:
    """Image 0's spec; the pipeline's defaults where the request leaves steps and guidance out."""
    loaded = images.backend.loaded
    return ImageSpec(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        width=size[0],
        height=size[1],
        steps=loaded.default_steps if body.num_inference_steps is None else body.num_inference_steps,
        guidance_scale=loaded.default_guidance if body.guidance_scale is None else body.guidance_scale,
        seed=seed_or_random(body.seed),
        true_cfg_scale=1.0 if body.true_cfg_scale is None else body.true_cfg_scale,
        guidance_rescale=body.guidance_rescale or 0.0,
        sampler=images.sampler(body.sampler, body.scheduler),
        strength=strength,
        clip_skip=body.clip_skip,
        previews=body.partial_images or 0,  # only with `stream` (the schema says so)
        control_scale=body.controlnet_conditioning_scale,
        control_start=body.control_guidance_start,
        control_end=body.control_guidance_end,
    )


async def _answer(
    images: ImageFront,
    body: ImageGenerationRequest,
    specs: list[ImageSpec],
    sel: Selections,
    request: Request,
) -> dict[str, Any]:
    """Run `specs` (`sel`: `_selection`'s); OpenAI's answer, each image with its `seed` (an extension: what
    reproduces it)."""
    pictures = await images.generate(specs, sel[0], lambda: until_disconnected(request), sel[1])
    fmt, compression = body.output_format or "png", body.output_compression
    data = [
        {"b64_json": await run_in_threadpool(image_b64, p, fmt, compression), "revised_prompt": None, "seed": s.seed}
        for p, s in zip(pictures, specs, strict=True)
    ]
    size = f"{specs[0].width}x{specs[0].height}"
    return {"created": int(time.time()), "data": data, "output_format": fmt, "size": size}


async def _stream(
    images: ImageFront,
    body: ImageGenerationRequest,
    specs: list[ImageSpec],
    sel: Selections,
    request: Request,
    kind: str,
) -> StreamingResponse:
    """OpenAI's streamed images: `{kind}.partial_image` events (each image's previews, `partial_image_index` from
    0) and one `{kind}.completed` event per image, in the order they come; each names its image (`index`, an
    extension) and seed. The images are admitted before the answer starts (a refusal is its HTTP error); a failure
    after that is an `error` event that ends the stream."""
    running = images.stream(specs, *sel)
    try:
        await unless_gone(running.admitted(), lambda: until_disconnected(request), "its images were")
    except BaseException:
        running.close()
        raise
    fmt, compression = body.output_format or "png", body.output_compression
    common = {"size": f"{specs[0].width}x{specs[0].height}", "quality": "auto", "background": "opaque",
              "output_format": fmt}  # fmt: skip

    async def events() -> AsyncIterator[str]:
        try:
            async for update in running.updates():
                b64 = await run_in_threadpool(image_b64, update.picture, fmt, compression)
                index, seed = update.image, specs[update.image].seed
                data: dict[str, Any] = {"b64_json": b64, "created_at": int(time.time()), **common, "index": index,
                                        "seed": seed}  # fmt: skip
                if update.preview is not None:
                    event = data["type"] = f"{kind}.partial_image"
                    data["partial_image_index"] = update.preview
                else:
                    event = data["type"] = f"{kind}.completed"
                    data["usage"] = _NO_USAGE
                yield sse_event(data, event)
        except Exception as exc:
            yield sse_event(http_error_for(exc).body(), "error")

    return SseResponse(events(), running.close)


# OpenAI meters its image models in tokens; these images are not metered so (the openai client's event type needs it)
_NO_USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0,
             "total_tokens": 0}  # fmt: skip


# ------------------------------------------------------------------------------------------ wrong kind
# behind the same key as the routes they stand for: an unauthenticated caller learns nothing of the model
lm_refusals = APIRouter(dependencies=[ApiAuth], tags=["images"], include_in_schema=False)


@lm_refusals.post("/v1/completions")
@lm_refusals.post("/v1/chat/completions")
async def not_a_language_model(c: Deps) -> None:
    raise BadRequestError(
        f"{c.settings.base_name!r} is an image pipeline: use POST /v1/images/generations or /sdapi/v1/txt2img",
        code="wrong_model_kind",
    )


async def not_an_image_model(c: Deps) -> None:
    raise BadRequestError(
        f"{c.settings.base_name!r} is a causal language model: use /v1/completions or /v1/chat/completions",
        code="wrong_model_kind",
    )


def refusals_of(*routers: APIRouter) -> APIRouter:
    """A 400 `wrong_model_kind` at every path and method of `routers` (the image APIs, on a causal-LM server):
    derived from them, so a new image route is refused there without being listed twice."""
    refusals = APIRouter(dependencies=[ApiAuth], tags=["openai"], include_in_schema=False)
    for router_ in routers:
        for route in router_.routes:
            if isinstance(route, APIRoute):
                refusals.add_api_route(route.path, not_an_image_model, methods=sorted(route.methods or ()))
    return refusals
