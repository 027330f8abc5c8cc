"""`create_app`: wires settings, metrics, engine, registry and routes; errors map to HTTP in one place."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import lokr

from .backend import LoadedModel, load_causal_lm, resolve_dtype
from .engine import Engine
from .errors import HttpError, ServiceError, http_error_for
from .foldsize import fold_copies
from .images import routers as image_routers
from .images.backend import ImageBackend
from .images.front import ImageFront
from .images.load import LoadedPipeline, is_pipeline_dir, load_pipeline
from .inference import Inference
from .lm import CausalLMBackend
from .metrics import Metrics
from .observe import ObserveMiddleware
from .registry import Registry, TierLimits
from .routes import admin, models, openai, ops
from .routes.deps import Components
from .routes.docs import install_docs
from .schemas import ERROR_RESPONSES
from .scratch import run_in_scratch_thread
from .settings import Settings

__all__ = ["create_app", "load_model", "start_components"]

log = logging.getLogger("lokr_serve")
STOP_JOIN_S = 5.0  # after a drain that ran out of grace: how long shutdown waits for the step still running


def create_app(
    settings: Settings,
    loaded: LoadedModel | LoadedPipeline | None = None,
    on_ready: Callable[[], None] | None = None,
) -> FastAPI:
    """The ASGI app. The model is loaded in the lifespan unless `loaded` is given (the CLI, tests);
    `start_components` may start it before serving; `on_ready` runs once the app is about to serve.

    `--model` a diffusers pipeline dir (`model_index.json`): the image backend and routes, else a causal LM.
    """
    components = Components(settings=settings, metrics=Metrics())
    images = isinstance(loaded, LoadedPipeline) or (loaded is None and is_pipeline_dir(settings.model))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if components.engine is None:
            model = loaded
            if model is None:  # in a thread that exits: see service.scratch
                model = await run_in_threadpool(run_in_scratch_thread, load_model, settings)
            await run_in_threadpool(run_in_scratch_thread, _start, components, model)
        if on_ready is not None:
            on_ready()
        components.metrics.gc_pauses.install()
        try:
            yield
        finally:
            components.metrics.gc_pauses.remove()
            engine = components.engine
            if engine is not None:
                drained = await run_in_threadpool(engine.drain, settings.shutdown_grace_s)
                await run_in_threadpool(engine.stop, 30.0 if drained else STOP_JOIN_S)
            if components.registry is not None:
                components.registry.close()

    app = FastAPI(title="lokr-serve", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_docs(app)  # Swagger UI from the installed package: /docs works offline
    app.state.components = components
    app.state.loaded = loaded
    for router in (ops.router, *image_routers(images), models.router, openai.router, admin.router):
        app.include_router(router, responses=ERROR_RESPONSES)
    if settings.cors_origin:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin, allow_methods=["*"], allow_headers=["*"])
    _install_error_handlers(app)
    limit = settings.body_limit(images)
    app.add_middleware(ObserveMiddleware, components=components, body_limit=limit)  # outermost: sees every answer
    return app


def load_model(settings: Settings) -> LoadedModel | LoadedPipeline:
    """`--model` as a diffusers pipeline (a dir with `model_index.json`) or a transformers causal LM."""
    if is_pipeline_dir(settings.model):
        return load_pipeline(str(settings.model), settings.device, settings.dtype)
    return load_causal_lm(str(settings.model), settings.device, settings.dtype)


def start_components(app: FastAPI) -> None:
    """Build the engine and registry and preload `--adapter` pairs now (errors raise here, not in the lifespan)."""
    components: Components = app.state.components
    if components.engine is None:
        _start(components, app.state.loaded)


def _start(c: Components, loaded: LoadedModel | LoadedPipeline) -> None:
    """Build engine + registry, preload `--adapter` pairs (operator-trusted paths), start the worker."""
    s = c.settings
    backend: CausalLMBackend | ImageBackend
    images = isinstance(loaded, LoadedPipeline)
    served = loaded.container if isinstance(loaded, LoadedPipeline) else loaded.model
    fold = fold_copies(s.fold_cache, served, loaded.device, images=images, max_batch_size=s.max_batch_size)
    if isinstance(loaded, LoadedPipeline):
        backend = ImageBackend(loaded, c.metrics, s.max_batch_size, fold, s.max_image_pixels)
    else:
        backend = CausalLMBackend(loaded, c.metrics, s.max_batch_size, s.max_prefill_tokens, s.prefill_stall, fold)
    engine = Engine(backend, c.metrics, s.max_queue)
    adapter_dtype = None if s.adapter_dtype == "auto" else resolve_dtype(s.adapter_dtype, loaded.device)
    limits = TierLimits(s.max_resident_adapters, s.max_resident_bytes, s.max_host_adapters, s.max_host_bytes)
    registry = Registry(engine, c.metrics, dtype=adapter_dtype, max_bytes=s.max_adapter_bytes, limits=limits)
    for name, source in s.preload_pairs():
        registry.load(name, Path(source).resolve())  # listed as absolute, like admin loads
    c.engine, c.registry = engine, registry
    if isinstance(backend, ImageBackend):
        c.images = ImageFront(engine, backend, registry, c.metrics, s.base_name, s.max_n, s.max_queue)
    else:
        c.inference = Inference(engine, backend, registry, c.metrics, s.base_name)
    engine.start()
    log.info("ready: model %s on %s (%s), %d adapters", s.base_name, loaded.device, loaded.dtype, len(registry.names()))


def _json_error(err: HttpError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _install_error_handlers(app: FastAPI) -> None:
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        if _not_json(request, exc):
            message = (
                "the request body must be a JSON object sent with the header 'content-type: application/json' "
                f"(got content-type {request.headers.get('content-type') or 'none'!r}); "
                "e.g. curl -H 'content-type: application/json' -d '{\"model\": ...}'"
            )
            return _json_error(HttpError(400, "invalid_request_error", "invalid_content_type", message))
        parts = [_describe_invalid(e) for e in exc.errors()[:5]]
        return _json_error(HttpError(400, "invalid_request_error", "invalid_request", "; ".join(parts)))

    async def on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        headers = getattr(exc, "headers", None)
        if isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's "There was an error parsing the body"
            return _json_error(HttpError(400, kind, "invalid_encoding", _not_utf8(exc.__cause__)))
        return _json_error(HttpError(exc.status_code, kind, f"http_{exc.status_code}", str(exc.detail), headers))

    async def on_error(_: Request, exc: Exception) -> JSONResponse:
        err = http_error_for(exc)
        if err.status >= 500 and isinstance(exc, ServiceError) and err.status != 500:  # a state it answers for
            log.warning("request refused (%d %s): %s", err.status, err.code, exc)  # shutting down, queue full...
        elif err.status >= 500:  # a defect: its traceback
            log.error("request failed: %s", exc, exc_info=exc)
        return _json_error(err)

    app.add_exception_handler(RequestValidationError, on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http)  # type: ignore[arg-type]
    app.add_exception_handler(ServiceError, on_error)
    app.add_exception_handler(lokr.LoKrError, on_error)
    app.add_exception_handler(Exception, on_error)


def _describe_invalid(error: Mapping[str, Any]) -> str:
    """One validation error as `field: what is wrong`; a body that is not JSON says where it broke."""
    loc = tuple(error.get("loc", ()))
    if error.get("type") == "json_invalid":
        reason = (error.get("ctx") or {}).get("error", "")
        at = f" at character {loc[1]}" if len(loc) > 1 else ""
        return f"the request body is not valid JSON ({reason}{at})" if reason else f"the request body is not JSON{at}"
    where = ".".join(str(p) for p in loc if p != "body")
    return f"{where or 'body'}: {str(error.get('msg')).removeprefix('Value error, ')}"


def _not_utf8(error: UnicodeDecodeError) -> str:
    byte = error.object[error.start : error.start + 1].hex()
    return (
        f"the request body is not UTF-8 (byte 0x{byte} at offset {error.start}): JSON bodies must be UTF-8 encoded; "
        "re-encode the text (e.g. from Latin-1 or UTF-16) before sending it"
    )


def _not_json(request: Request, exc: RequestValidationError) -> bool:
    """A JSON route got a body it could not read as JSON (no or another content-type)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body_errors = [e for e in exc.errors() if tuple(e.get("loc", ())) == ("body",)]
    json_type = content_type == "application/json" or content_type.endswith("+json")
    return bool(body_errors) and bool(content_type) and not json_type
