"""The ingress's FastAPI app: the same OpenAI, admin and ops routes, schemas and error shape as `serve`."""

from __future__ import annotations

import shutil
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ..app import _install_error_handlers  # the single-process app's own handlers and middleware
from ..observe import ObserveMiddleware
from ..routes.admin import _save_upload
from ..routes.deps import AdminAuth, ApiAuth
from ..routes.models import card_named, model_card
from ..schemas import (
    ERROR_RESPONSES,
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
    app = FastAPI(title="lokr-serve (Ray Serve)", version="0.1.0")
    app.state.components = ingress.components
    for router in (_ops(ingress), _openai(ingress), _admin(ingress)):
        app.include_router(router, responses=ERROR_RESPONSES)
    _install_error_handlers(app)
    limit = ingress.components.settings.body_limit(images=False)  # the ingress serves the completions routes
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


def _openai(ingress: LokrIngress) -> APIRouter:
    router = APIRouter(dependencies=[ApiAuth], tags=["openai"])

    def cards() -> list[dict[str, Any]]:
        base, created = ingress.settings.base_name, ingress.components.created
        names = ingress.snapshot.names()
        return [model_card(base, created, None), *(model_card(name, created, base) for name in names)]

    @router.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        """The base model and every registered adapter (created: when this ingress started)."""
        return {"object": "list", "data": cards()}

    @router.get("/v1/models/{model_id}")
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        return card_named(cards(), model_id)

    @router.post("/v1/completions", response_model=None, responses=STREAMABLE)
    async def completions(body: CompletionRequest, request: Request) -> StreamingResponse:
        return await ingress.forward(request, body.model, body.adapters)

    @router.post("/v1/chat/completions", response_model=None, responses=STREAMABLE)
    async def chat_completions(body: ChatRequest, request: Request) -> StreamingResponse:
        return await ingress.forward(request, body.model, body.adapters)

    return router


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
