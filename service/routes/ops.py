"""Operational routes: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from .deps import Deps

router = APIRouter(tags=["ops"])

__all__ = ["router"]


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


_NOT_READY = {
    "description": "Starting or draining",
    "content": {"application/json": {"example": {"status": "not ready"}}},
}


@router.get("/ready", responses={503: _NOT_READY})
async def ready(c: Deps) -> JSONResponse:
    """200 once the model is loaded and the engine accepts work; 503 otherwise (also while draining)."""
    if c.engine is None or not c.engine.accepting:
        return JSONResponse({"status": "not ready"}, status_code=503)
    return JSONResponse({"status": "ready", "model": c.settings.base_name})


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(c: Deps) -> Response:
    return Response(c.metrics.render(), media_type=CONTENT_TYPE_LATEST)
