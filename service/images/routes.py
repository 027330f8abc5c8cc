"""OpenAI's images API on an image server, and clear 400s for routes of the other model kind."""

from __future__ import annotations

import re
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute

from ..disconnect import until_disconnected
from ..errors import BadRequestError, NotReadyError
from ..routes.deps import ApiAuth, Components, Deps
from .front import ImageFront, image_b64, seed_or_random
from .rows import ImageSpec
from .schemas import ImageGenerationRequest

__all__ = ["lm_refusals", "refusals_of", "router"]

router = APIRouter(dependencies=[ApiAuth], tags=["images"])
_SIZE = re.compile(r"^(\d+)x(\d+)$")


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


@router.post("/v1/images/generations")
async def generations(body: ImageGenerationRequest, c: Deps, request: Request) -> dict[str, Any]:
    """OpenAI-compatible image generation; image k of the request uses seed `seed + k`."""
    images = front(c)
    if body.response_format == "url":
        raise BadRequestError('response_format "url" is not served; use "b64_json"', code="invalid_response_format")
    sel = images.select(body.model, [(a.name, a.scale) for a in body.adapters or []])
    request.scope["lokr_adapter"] = sel.label
    loaded = images.backend.loaded
    width, height = parse_size(body.size, images.default_size)
    spec = ImageSpec(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        width=width,
        height=height,
        steps=loaded.default_steps if body.num_inference_steps is None else body.num_inference_steps,
        guidance_scale=loaded.default_guidance if body.guidance_scale is None else body.guidance_scale,
        seed=seed_or_random(body.seed),
        true_cfg_scale=1.0 if body.true_cfg_scale is None else body.true_cfg_scale,
        sampler=images.sampler(body.sampler, body.scheduler),
    )
    specs = images.specs(spec, body.n)
    pictures = await images.generate(specs, sel, lambda: until_disconnected(request))
    fmt, compression = body.output_format or "png", body.output_compression
    data = [
        {"b64_json": await run_in_threadpool(image_b64, p, fmt, compression), "revised_prompt": None, "seed": s.seed}
        for p, s in zip(pictures, specs, strict=True)
    ]  # `seed`, an extension: what reproduces each image (also when the request named none)
    return {"created": int(time.time()), "data": data, "output_format": fmt, "size": f"{width}x{height}"}


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
