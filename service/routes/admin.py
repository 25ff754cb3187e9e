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

from ..bundle import BundleError
from ..errors import error_body
from ..schemas import ErrorResponse
from ..registry import ModelRegistry, RegistryError
from ..security import AdminAuth
from ..store import StoreError

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 256 * 1024 * 1024
_ARCHIVE_TYPES = {
    "application/gzip",
    "application/x-gzip",
    "application/x-tar",
    "application/x-compressed-tar",
    "application/octet-stream",
}


def _error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    body = error_body(code, message)
    body["error"].update(extra)  # e.g. `check`: which validation step refused the bundle
    return body


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
        _error_body("bundle_invalid", "hash: sha256 mismatch for model.onnx: …", check="hash"),
    ),
}


class RegisterResult(BaseModel):
    """What registering a bundle did. Registration validates but never activates."""

    name: str
    version: str
    sha256: str = Field(description="sha256 of the bundle's manifest.json (pins every file).")
    created: bool = Field(description="False when this exact bundle was already registered.")
    checks: list[str] = Field(description="Checks passed, in order.")
    golden_max_abs_diff: dict[str, float] = Field(description="Per output: max |onnxruntime - golden|.")
    contract_compatible: bool = Field(description="Same classes / input / outputs / score as the active version.")
    contract_changes: dict[str, dict[str, Any]] = Field(description="What differs from the active version: {old, new}.")
    validate_s: float = Field(description="Seconds spent validating.")
    path: str = Field(description="Where the bundle now lives in the models directory.")


class SwapResponse(BaseModel):
    """The outcome of an activation or rollback."""

    action: str = Field(description="activate | rollback | watch")
    result: str = Field(description="success | unchanged")
    previous: dict[str, Any] | None = Field(None, description="Summary of the version served before.")
    current: dict[str, Any] | None = Field(None, description="Summary of the version served now.")
    timings_s: dict[str, float] = Field(default_factory=dict, description="validate and warm seconds.")
    checks: list[str] = Field(default_factory=list, description="Checks passed before switching.")
    message: str = ""


class AdminModelsResponse(BaseModel):
    active: dict[str, Any] | None = Field(description="Summary of the served version.")
    models_dir: str | None = Field(description="The models directory; null in single --bundle mode.")
    versions: list[dict[str, Any]] = Field(description="Every stored version (oldest first), `active` marked, key metrics.")
    history: list[str] | None = Field(None, description="Rollback stack: previously active name/version, newest last.")
    events: list[dict[str, Any]] | None = Field(None, description="The last activations, rollbacks and failures.")


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminAuth], responses=_ERRORS)


class RegisterPath(BaseModel):
    path: str = Field(description="A bundle directory inside the models directory.", examples=["incoming/cifar-aloe-2"])


class _UploadTooLarge(Exception):
    pass


def _registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def _max_upload(request: Request) -> int:
    return int(getattr(request.app.state.settings, "max_upload_bytes", DEFAULT_MAX_UPLOAD_BYTES))


def _failure(exc: Exception) -> JSONResponse:
    """Map registry/store/bundle errors to JSON 4xx responses that say which check failed."""
    if isinstance(exc, BundleError):
        return JSONResponse(_error_body("bundle_invalid", str(exc), check=exc.check), status_code=422)
    if isinstance(exc, (RegistryError, StoreError)):
        return JSONResponse(_error_body(exc.code, exc.message), status_code=exc.status)
    raise exc


async def _spool_limited(request: Request, limit: int, sink) -> int:
    """Copy the raw request body into `sink`, refusing more than `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _UploadTooLarge
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _UploadTooLarge
        sink.write(chunk)
    return total


async def _multipart_archive(request: Request, limit: int):
    """The `file` part of a multipart body, with the body size bounded while it is parsed."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _UploadTooLarge
    seen = 0
    receive = request.receive

    async def _limited_receive():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _UploadTooLarge
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
    response_model=RegisterResult,
    responses={200: {"model": RegisterResult, "description": "This exact bundle was already registered."}},
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
    try:
        store = registry.require_store()  # before reading any of the body
    except RegistryError as exc:
        return _failure(exc)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limit = _max_upload(request)
    try:
        if content_type == "application/json":
            try:
                body = RegisterPath.model_validate_json(await request.body())
            except ValueError as exc:
                return JSONResponse(_error_body("bad_request", f"expected {{\"path\": ...}}: {exc}"), status_code=400)
            path = Path(body.path)
            if not path.is_absolute():
                path = store.root / path
            result = await asyncio.to_thread(registry.register_path, path)
        elif content_type == "multipart/form-data":
            upload = await _multipart_archive(request, limit)
            if upload is None:
                return JSONResponse(_error_body("bad_request", "multipart body needs a `file` part"), status_code=400)
            try:
                result = await asyncio.to_thread(registry.register_tar, upload.file)
            finally:
                await upload.close()
        elif content_type in _ARCHIVE_TYPES:
            with store.staging_dir() as stage:
                archive = stage / "upload.tar.gz"
                with open(archive, "wb") as sink:
                    await _spool_limited(request, limit, sink)
                result = await asyncio.to_thread(registry.register_tar, archive)
        else:
            return JSONResponse(
                _error_body("unsupported_media_type", f"send multipart `file`, application/gzip or JSON {{\"path\"}}, not {content_type or 'nothing'}"),
                status_code=415,
            )
    except _UploadTooLarge:
        log.warning("admin upload refused: larger than %d bytes", limit)
        return JSONResponse(_error_body("upload_too_large", f"bundle upload is larger than {limit} bytes"), status_code=413)
    except ClientDisconnect:
        return JSONResponse(_error_body("client_disconnected", "upload interrupted"), status_code=400)
    except (BundleError, RegistryError, StoreError) as exc:
        log.warning("admin upload refused: %s", exc)
        return _failure(exc)
    return JSONResponse(result, status_code=201 if result["created"] else 200)


@router.post(
    "/models/{name}/{version}/activate",
    response_model=SwapResponse,
    summary="Validate, warm and switch to a registered version",
)
async def activate_model(
    request: Request,
    name: str,
    version: str,
    allow_contract_change: bool = Query(False, description="Accept a change of classes / input / outputs / score."),
) -> JSONResponse:
    registry = _registry(request)
    try:
        result = await asyncio.to_thread(registry.activate, name, version, allow_contract_change)
    except (BundleError, RegistryError, StoreError) as exc:
        return _failure(exc)
    return JSONResponse(result.to_dict())


@router.post("/rollback", response_model=SwapResponse, summary="Switch back to the previously active version")
async def rollback(request: Request) -> JSONResponse:
    registry = _registry(request)
    try:
        result = await asyncio.to_thread(registry.rollback)
    except (BundleError, RegistryError, StoreError) as exc:
        return _failure(exc)
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
        "versions": await asyncio.to_thread(registry.versions),
    }
    if registry.store is not None:
        state = registry.store.read_state()
        body["history"] = state.history
        body["events"] = state.events[-20:]
    return JSONResponse(body)

