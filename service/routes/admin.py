"""Admin API: upload / register, activate, roll back and list model versions.

Every route needs the admin bearer token (see security.py) and does not exist without one.
Blocking work (extraction, hashing, onnxruntime loading, warm-up) runs in a worker thread; the
registry serialises swaps, so concurrent admin calls queue up rather than interleave.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect

from ..errors import OodguardError, error_body
from ..registry import ModelRegistry, Registration, SwapResult
from ..schemas import ErrorResponse
from ..security import AdminAuth

log = logging.getLogger(__name__)

_ARCHIVE_TYPES = {
    "application/gzip",
    "application/x-gzip",
    "application/x-tar",
    "application/x-compressed-tar",
    "application/octet-stream",
}


def _documented(description: str, example: dict[str, Any] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"model": ErrorResponse, "description": description}
    if example is not None:
        doc["content"] = {"application/json": {"example": example}}
    return doc


_ERRORS = {
    400: _documented("Path outside the models directory, not a bundle, or a malformed request"),
    401: _documented("No bearer token (`WWW-Authenticate: Bearer`)"),
    403: _documented("Wrong bearer token"),
    404: _documented("Admin API disabled (no OODGUARD_ADMIN_TOKEN), or unknown version"),
    409: _documented("No models directory, version exists with other contents, or nothing to roll back to"),
    413: _documented("Upload larger than max_upload_bytes"),
    415: _documented("Body is neither JSON, multipart nor a .tar.gz"),
    422: _documented(
        "Bundle failed validation; `error.check` names the failed check "
        "(archive, schema, files, hash, calibration, onnx, contract, golden, location, warm)",
        error_body("bundle_invalid", "hash: sha256 mismatch for model.onnx: …", details={"check": "hash"}),
    ),
}


class AdminModelsResponse(BaseModel):
    active: dict[str, Any] | None = Field(description="Summary of the served version.")
    models_dir: str | None = Field(description="The models directory; null in single --bundle mode.")
    versions: list[dict[str, Any]] = Field(description="Every stored version (oldest first), `active` marked, key metrics.")
    history: list[str] | None = Field(None, description="Rollback stack: previously active name/version, newest last.")
    events: list[dict[str, Any]] | None = Field(None, description="The last activations, rollbacks and failures.")


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminAuth], responses=_ERRORS)


class RegisterPath(BaseModel):
    path: str = Field(description="A bundle directory inside the models directory.", examples=["incoming/cifar-aloe-2"])


def _registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def _too_large(limit: int) -> OodguardError:
    log.warning("admin upload refused: larger than %d bytes", limit)
    return OodguardError("too_large", "upload_too_large", f"bundle upload is larger than {limit} bytes")


def _check_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)


async def _spool_limited(request: Request, limit: int, sink) -> int:
    """Copy the raw request body into `sink`, refusing more than `limit` bytes."""
    _check_declared_length(request, limit)
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _too_large(limit)
        sink.write(chunk)
    return total


async def _multipart_archive(request: Request, limit: int):
    """The `file` part of a multipart body, with the body size bounded while it is parsed."""
    _check_declared_length(request, limit)
    seen = 0
    receive = request.receive

    async def _limited_receive():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _too_large(limit)
        return message

    limited = Request(request.scope, _limited_receive)
    form = await limited.form(max_files=1, max_fields=4)
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        return None
    return upload


@router.post(
    "/models",
    summary="Upload (.tar.gz) or register (path) a bundle; validates it, does not activate it",
    status_code=status.HTTP_201_CREATED,
    response_model=Registration,
    responses={200: {"model": Registration, "description": "This exact bundle was already registered."}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "string", "format": "binary", "description": "bundle .tar.gz"}},
                        "required": ["file"],
                    }
                },
                "application/gzip": {"schema": {"type": "string", "format": "binary"}},
                "application/json": {"schema": RegisterPath.model_json_schema()},
            },
        }
    },
)
async def upload_model(request: Request) -> JSONResponse:
    registry = _registry(request)
    store = registry.require_store()  # before reading any of the body
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        result = await _register(request, registry, store, content_type, request.app.state.settings.max_upload_bytes)
    except ClientDisconnect:
        raise OodguardError("bad_request", "client_disconnected", "upload interrupted") from None
    except OodguardError as exc:
        log.warning("admin upload refused: %s", exc)
        raise
    return JSONResponse(result.to_dict(), status_code=201 if result.created else 200)


async def _register(request: Request, registry: ModelRegistry, store, content_type: str, limit: int):
    """Register the bundle the body holds, in whichever of the three forms it comes."""
    if content_type == "application/json":
        try:
            body = RegisterPath.model_validate_json(await request.body())
        except ValueError as exc:
            raise OodguardError("bad_request", "bad_request", f"expected {{\"path\": ...}}: {exc}") from None
        path = Path(body.path)
        if not path.is_absolute():
            path = store.root / path
        return await asyncio.to_thread(registry.register_path, path)
    if content_type == "multipart/form-data":
        upload = await _multipart_archive(request, limit)
        if upload is None:
            raise OodguardError("bad_request", "bad_request", "multipart body needs a `file` part")
        try:
            return await asyncio.to_thread(registry.register_tar, upload.file)
        finally:
            await upload.close()
    if content_type in _ARCHIVE_TYPES:
        with store.staging_dir() as stage:
            archive = stage / "upload.tar.gz"
            with open(archive, "wb") as sink:
                await _spool_limited(request, limit, sink)
            return await asyncio.to_thread(registry.register_tar, archive)
    raise OodguardError(
        "unsupported_media",
        "unsupported_media_type",
        f"send multipart `file`, application/gzip or JSON {{\"path\"}}, not {content_type or 'nothing'}",
    )


@router.post(
    "/models/{name}/{version}/activate",
    response_model=SwapResult,
    summary="Validate, warm and switch to a registered version",
)
async def activate_model(
    request: Request,
    name: str,
    version: str,
    allow_contract_change: bool = Query(False, description="Accept a change of classes / input / outputs / score."),
) -> JSONResponse:
    result = await asyncio.to_thread(_registry(request).activate, name, version, allow_contract_change)
    return JSONResponse(result.to_dict())


@router.post("/rollback", response_model=SwapResult, summary="Switch back to the previously active version")
async def rollback(request: Request) -> JSONResponse:
    result = await asyncio.to_thread(_registry(request).rollback)
    return JSONResponse(result.to_dict())


@router.get(
    "/models",
    response_model=AdminModelsResponse,
    summary="Every stored version (active marked) with its key metrics, and the history",
)
async def list_models(request: Request) -> JSONResponse:
    registry = _registry(request)
    active = registry.active
    body: dict[str, Any] = {
        "active": active.summary() if active else None,
        "models_dir": str(registry.store.root) if registry.store else None,
        "versions": [v.to_dict() for v in await asyncio.to_thread(registry.versions)],
    }
    if registry.store is not None:
        state = registry.store.read_state()
        body["history"] = state.history
        body["events"] = state.events[-20:]
    return JSONResponse(body)

