"""The ingress's FastAPI app: the same OpenAI, admin and ops routes, schemas and error shape as `serve`."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import TypeAdapter

from ..app import _install_error_handlers  # the single-process app's own handlers and middleware
from ..errors import ServiceError
from ..images.backend import ImageBackend
from ..images.load import is_pipeline_dir
from ..images.lora_tags import parse_lora_tags
from ..images.routes import lm_refusals, refusals_of
from ..images.schemas import ImageAdapterRef, ImageGenerationRequest
from ..lm import CausalLMBackend
from ..observe import ObserveMiddleware
from ..routes.admin import _save_upload
from ..routes.deps import AdminAuth, ApiAuth
from ..routes.models import card_named, model_card
from ..schemas import (
    ERROR_RESPONSES,
    AdapterRef,
    ChatRequest,
    CompletionRequest,
    LoadAdapterRequest,
    VllmLoadRequest,
    VllmUnloadRequest,
)
from ..security import resolve_in_roots, validate_adapter_name
from ..sse import STREAMABLE

if TYPE_CHECKING:
    from .ingress import LokrIngress

__all__ = ["build_ingress_app"]


def build_ingress_app(ingress: LokrIngress) -> FastAPI:
    """The completions routes on a causal LM, the image routes (OpenAI's and A1111's) on a diffusers pipeline."""
    app = FastAPI(title="lokr-serve (Ray Serve)", version="0.1.0")
    app.state.components = ingress.components
    images = is_pipeline_dir(ingress.settings.model)
    # the other kind's routes answer as `serve` does: a 400 naming the routes to use
    served = [_images(ingress), lm_refusals] if images else [_openai(ingress), refusals_of(_images(ingress))]
    kind = ImageBackend.kind if images else CausalLMBackend.kind
    for router in (_ops(ingress), _models(ingress, kind), *served, _admin(ingress)):
        app.include_router(router, responses=ERROR_RESPONSES)
    _install_error_handlers(app)
    limit = ingress.components.settings.body_limit(images=images)
    app.add_middleware(ObserveMiddleware, components=ingress.components, body_limit=limit)
    return app


def _ops(ingress: LokrIngress) -> APIRouter:
    router = APIRouter(tags=["ops"])

    @router.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/ready")
    async def ready() -> JSONResponse:
        """200 once at least one replica has loaded the model and reports to the catalog."""
        replicas = await ingress.live_replicas()
        if not replicas:
            return JSONResponse({"status": "not ready"}, status_code=503)
        return JSONResponse({"status": "ready", "model": ingress.settings.base_name, "replicas": replicas})

    @router.get("/metrics")
    async def metrics() -> Response:
        """The ingress's request series (engine series live in each replica's app)."""
        return Response(ingress.components.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return router


def _models(ingress: LokrIngress, kind: str) -> APIRouter:
    """`/v1/models` as the single-process app lists it (`kind`: the model's), from the application's catalog."""
    router = APIRouter(dependencies=[ApiAuth], tags=["openai"])

    def cards() -> list[dict[str, Any]]:
        base, created = ingress.settings.base_name, ingress.components.created
        names = ingress.snapshot.names()
        return [model_card(base, created, None, kind), *(model_card(name, created, base, kind) for name in names)]

    @router.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        """The base model and every registered adapter (created: when this ingress started)."""
        return {"object": "list", "data": cards()}

    @router.get("/v1/models/{model_id}")
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        return card_named(cards(), model_id)

    return router


def _openai(ingress: LokrIngress) -> APIRouter:
    router = APIRouter(dependencies=[ApiAuth], tags=["openai"])

    @router.post("/v1/completions", response_model=None, responses=STREAMABLE)
    async def completions(body: CompletionRequest, request: Request) -> StreamingResponse:
        return await ingress.forward(request, body.model, body.adapters)

    @router.post("/v1/chat/completions", response_model=None, responses=STREAMABLE)
    async def chat_completions(body: ChatRequest, request: Request) -> StreamingResponse:
        return await ingress.forward(request, body.model, body.adapters)

    return router


def _images(ingress: LokrIngress) -> APIRouter:
    """The image routes, forwarded as the completions are: to a replica holding the request's first adapter (an
    A1111 prompt's first `<lora:...>` tag). Listings that are the model's (samplers, options, ...) come from any
    replica; `/sdapi/v1/loras` is the application's registry, as `/v1/adapters`."""
    router = APIRouter(dependencies=[ApiAuth], tags=["images"])
    base = ingress.settings.base_name

    @router.post("/v1/images/generations", response_model=None, responses=STREAMABLE)
    async def generations(body: ImageGenerationRequest, request: Request) -> StreamingResponse:
        return await ingress.forward(request, body.model or base, body.adapters)

    @router.post("/v1/images/edits", response_model=None, responses=STREAMABLE)
    async def edits(request: Request) -> StreamingResponse:
        await request.body()  # read whole: forwarded as it came, and the form below parses it from memory
        async with request.form(max_files=4, max_fields=64) as form:
            model, adapters = form.get("model"), form.get("adapters")
        model = model if isinstance(model, str) and model else base
        return await ingress.forward(request, model, _form_adapters(adapters))

    @router.post("/sdapi/v1/txt2img")
    @router.post("/sdapi/v1/img2img")
    async def a1111(request: Request) -> StreamingResponse:
        return await ingress.forward(request, base, _tag_adapters(await request.body()))

    @router.get("/sdapi/v1/loras")
    async def loras() -> list[dict[str, Any]]:
        entries = ingress.snapshot.entries
        return [{"name": name, "alias": name, "path": Path(entries[name].source).name,
                 "metadata": {"format": entries[name].info.get("format")}}
                for name in ingress.snapshot.names()]  # fmt: skip

    @router.get("/sdapi/v1/{listing}")
    async def listing(listing: str, request: Request) -> StreamingResponse:
        return await ingress.forward(request, base, None)

    @router.post("/sdapi/v1/options")
    async def set_options(request: Request) -> StreamingResponse:
        return await ingress.forward(request, base, None)

    return router


def _form_adapters(text: Any) -> Sequence[AdapterRef] | None:
    """The adapters of an edit's form (JSON text), for routing only: the replica validates the form itself, so
    what does not parse here routes as the base model and gets the replica's 400."""
    try:
        return TypeAdapter(list[ImageAdapterRef]).validate_json(text) if isinstance(text, str) else None
    except ValueError:
        return None


def _tag_adapters(body: bytes) -> list[AdapterRef] | None:
    """The `<lora:NAME:...>` tags of an A1111 body's prompts, as adapters at their denoiser multipliers, for
    routing (a body that does not parse routes as the base model and gets the replica's 400)."""
    try:
        fields = json.loads(body)
        prompts = [fields.get(key) for key in ("prompt", "hr_prompt")] if isinstance(fields, dict) else []
        tags = [tag for p in prompts if isinstance(p, str) for tag in parse_lora_tags(p)[1]]
        return [AdapterRef(name=tag.name, scale=tag.unet) for tag in tags] or None
    except (ValueError, ServiceError):  # pydantic's ValidationError is a ValueError
        return None


def _admin(ingress: LokrIngress) -> APIRouter:
    router = APIRouter(dependencies=[AdminAuth], tags=["admin"])
    settings = ingress.settings

    @router.get("/v1/adapters")
    async def list_adapters() -> dict[str, Any]:
        """Every registered adapter; `replicas` maps each replica holding it to its tier there."""
        return {"object": "list", "data": await ingress.listing()}

    @router.get("/v1/adapters/{name}")
    async def describe_adapter(name: str) -> dict[str, Any]:
        return await ingress.describe_one(name)

    @router.post("/v1/adapters", status_code=201)
    async def load_adapter(body: LoadAdapterRequest) -> dict[str, Any]:
        """Register for the whole application; one replica validates it, the others load it on first use."""
        name = validate_adapter_name(body.name, settings.base_name)
        return await ingress.register(name, resolve_in_roots(body.source, settings.adapter_root))

    @router.put("/v1/adapters/{name}", status_code=201)
    async def upload_adapter(name: str, request: Request) -> dict[str, Any]:
        """Multipart upload, stored under `--upload-dir` (shared storage on a multi-node cluster)."""
        name = validate_adapter_name(name, settings.base_name)
        target = settings.upload_root() / f"{name}-{uuid.uuid4().hex[:8]}"
        target.mkdir(parents=True)
        try:
            source = await _save_upload(request, target, settings.max_upload_bytes)
            return await ingress.register(name, source, owned_dir=target)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise

    @router.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str) -> dict[str, Any]:
        """Hidden from new requests at once; returns once every replica has unloaded it."""
        return await ingress.unregister(name)

    @router.post("/v1/load_lora_adapter")
    async def vllm_load(body: VllmLoadRequest) -> dict[str, Any]:
        return await load_adapter(LoadAdapterRequest(name=body.lora_name, source=body.lora_path))

    @router.post("/v1/unload_lora_adapter")
    async def vllm_unload(body: VllmUnloadRequest) -> dict[str, Any]:
        return await unload_adapter(body.lora_name)

    return router
