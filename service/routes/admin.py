"""Admin routes (Bearer admin token): list, describe, load by path, upload, unload, vLLM aliases."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

import lokr
from lokr.formats import PICKLE_SUFFIXES

from ..errors import BadRequestError, PayloadTooLargeError
from ..registry import Registry
from ..schemas import LoadAdapterRequest, VllmLoadRequest, VllmUnloadRequest
from ..security import resolve_in_roots, validate_adapter_name
from .deps import AdminAuth, Components, Deps

router = APIRouter(dependencies=[AdminAuth], tags=["admin"])

_UPLOAD_NAMES = ("adapter_config.json", "adapter_model.safetensors")
_CHUNK = 1 << 20


def _registry(c: Components) -> Registry:
    return c.ready_registry()


@router.get("/v1/adapters")
async def list_adapters(c: Deps) -> dict[str, Any]:
    return {"object": "list", "data": [r.to_dict() for r in _registry(c).records()]}


@router.get("/v1/adapters/{name}")
async def describe_adapter(name: str, c: Deps) -> dict[str, Any]:
    return _registry(c).get(name).to_dict()


@router.post("/v1/adapters", status_code=201)
async def load_adapter(body: LoadAdapterRequest, c: Deps) -> dict[str, Any]:
    """Load from a path under an --adapter-root; validated against the base model before it is visible."""
    name = validate_adapter_name(body.name, c.settings.base_name)
    path = resolve_in_roots(body.source, c.settings.adapter_root)
    record = await run_in_threadpool(_registry(c).load, name, path)
    return record.to_dict()


@router.put("/v1/adapters/{name}", status_code=201)
async def upload_adapter(name: str, request: Request, c: Deps) -> dict[str, Any]:
    """Multipart upload: `adapter_config.json` + `adapter_model.safetensors`, or one LyCORIS `.safetensors`."""
    name = validate_adapter_name(name, c.settings.base_name)
    registry = _registry(c)
    target = c.settings.upload_root() / f"{name}-{uuid.uuid4().hex[:8]}"
    target.mkdir(parents=True)
    try:
        source = await _save_upload(request, target, c.settings.max_upload_bytes)
        record = await run_in_threadpool(registry.load, name, source, owned_dir=target)
    except lokr.LoKrError as exc:
        shutil.rmtree(target, ignore_errors=True)
        exc.args = (_as_uploaded(str(exc), target),)  # the server's scratch path is none of the client's business
        raise
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return record.to_dict()


def _as_uploaded(message: str, target: Path) -> str:
    """`message` with the upload's scratch paths (`target/file`, `target`) as the client named them."""
    return message.replace(f"{target}{os.sep}", "uploaded ").replace(str(target), "the upload")


@router.delete("/v1/adapters/{name}")
async def unload_adapter(name: str, c: Deps) -> dict[str, Any]:
    """Hide the adapter from new requests, wait for running ones, then free its memory. The wait (up to 60 s)
    holds a thread of its own pool, not one of the pool that loads, uploads and drains share."""
    await anyio.to_thread.run_sync(_registry(c).unload, name, limiter=c.unload_limiter())
    return {"id": name, "object": "adapter", "deleted": True}


@router.post("/v1/load_lora_adapter")
async def vllm_load(body: VllmLoadRequest, c: Deps) -> dict[str, Any]:
    """vLLM-compatible alias of POST /v1/adapters."""
    return await load_adapter(LoadAdapterRequest(name=body.lora_name, source=body.lora_path), c)


@router.post("/v1/unload_lora_adapter")
async def vllm_unload(body: VllmUnloadRequest, c: Deps) -> dict[str, Any]:
    """vLLM-compatible alias of DELETE /v1/adapters/{name}."""
    return await unload_adapter(body.lora_name, c)


async def _save_upload(request: Request, target: Path, limit: int) -> Path:
    """Stream each file part to `target` (never whole in memory); returns the path to load."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise BadRequestError(
            "upload with multipart/form-data (file parts, any field name: adapter_config.json + "
            "adapter_model.safetensors, or one .safetensors file), e.g. curl -F files=@adapter_config.json "
            "-F files=@adapter_model.safetensors",
            code="invalid_upload",
        )
    form = await request.form(max_files=4, max_fields=4)
    files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
    names = [Path(f.filename or "").name for f in files]
    single = len(files) == 1 and names[0].endswith(".safetensors") and names[0] not in _UPLOAD_NAMES
    if not files or not (single or sorted(names) == sorted(_UPLOAD_NAMES)):
        raise BadRequestError(_upload_problem(names), code="invalid_upload")
    total = 0
    for upload, filename in zip(files, names):
        with (target / filename).open("wb") as out:
            while chunk := await upload.read(_CHUNK):
                total += len(chunk)
                if total > limit:
                    raise PayloadTooLargeError(f"upload exceeds the {limit}-byte limit (--max-upload-bytes)")
                out.write(chunk)
    return target / names[0] if single else target


def _upload_problem(names: list[str]) -> str:
    """What is wrong with the uploaded file names, and what to send instead."""
    expected = (
        "send multipart/form-data file parts (any field name, e.g. -F files=@adapter_config.json "
        "-F files=@adapter_model.safetensors) for a PEFT adapter, or one LyCORIS/kohya .safetensors file"
    )
    pickled = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
    if pickled:
        return (
            f"{pickled[0]} is a pickle checkpoint, and pickles are never opened (loading one runs its code); "
            f"convert it to safetensors (safetensors.torch.save_file) and {expected}"
        )
    if names == [_UPLOAD_NAMES[1]]:
        return f"a PEFT {_UPLOAD_NAMES[1]} needs its {_UPLOAD_NAMES[0]} in the same upload; {expected}"
    if names == [_UPLOAD_NAMES[0]]:
        return f"{_UPLOAD_NAMES[0]} came without its {_UPLOAD_NAMES[1]}; {expected}"
    return f"got files {names or 'none'}; {expected}"
