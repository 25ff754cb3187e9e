"""POST /v1/predict: classify images and say whether to trust each answer.

Three body forms, chosen by Content-Type:
  multipart/form-data     one `file` field or repeated `files` fields (both may be mixed)
  image/* or application/octet-stream   the raw bytes of one image
  application/json        {"images": ["<base64>", ...]} (a `data:image/...;base64,` prefix is allowed)

The body is parsed here rather than by FastAPI parameters because one route takes all three forms.
Decoding runs in the decode thread pool, inference in the batcher's thread: the event loop only
routes bytes. One bad image fails the whole request, and the error names its index.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from python_multipart.exceptions import FormParserError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from ..batching import BatcherError
from ..errors import ApiError, unavailable
from ..postprocess import NonFiniteOutput, score_outputs
from ..preprocess import ALLOWED_FORMATS, ImageError, decode_images
from ..schemas import ErrorResponse, PredictJSONRequest, PredictResponse

log = logging.getLogger(__name__)

router = APIRouter(tags=["predict"])

_FILE_FIELDS = ("file", "files")
_MAX_TEXT_PART = 64 * 1024  # non-file multipart fields are never large


def _err(description: str, code: str, message: str) -> dict:
    return {
        "model": ErrorResponse,
        "description": description,
        "content": {"application/json": {"example": {"error": {"code": code, "message": message}}}},
    }


PREDICT_ERRORS = {
    413: _err(
        "Body larger than `max_body_bytes` (`body_too_large`), or an image whose header declares more than "
        "`max_pixels` pixels (`too_many_pixels`) or a side above `max_image_side` (`image_too_large`): "
        "refused before decoding.",
        "too_many_pixels",
        "image 0: PNG is 50000x50000 = 2500000000 pixels; at most 16777216 allowed",
    ),
    415: _err(
        "Content-Type is not multipart/form-data, application/json, image/* or application/octet-stream "
        "(`unsupported_media_type`), or the bytes are not a supported image format "
        f"({', '.join(ALLOWED_FORMATS)}; `unsupported_image_format`).",
        "unsupported_image_format",
        "image 0: not a supported image format (supported: JPEG, PNG, GIF, WEBP, BMP, TIFF)",
    ),
    422: _err(
        "Undecodable or invalid image (`invalid_image`), no images (`no_images`), more than "
        "`max_images_per_request` (`too_many_images`), invalid JSON (`invalid_json`) or base64 "
        "(`invalid_base64`), malformed multipart (`invalid_multipart`), unknown `operating_point` "
        "(`unknown_operating_point`), `top_k` out of range (`invalid_top_k` / `validation_error`).",
        "invalid_image",
        "image 1: cannot decode PNG: image file is truncated",
    ),
    503: _err(
        "Not ready (`not_ready`), shutting down (`shutting_down`), inference queue full (`queue_full`), "
        "inference failed (`inference_failed`) or timed out (`timeout`). Has a Retry-After header.",
        "queue_full",
        "inference queue is full (1024 images waiting); retry shortly",
    ),
}

_BINARY = {"type": "string", "format": "binary"}
PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "description": "One or more images: multipart (`file` / repeated `files`), a raw image body, or JSON base64.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {**_BINARY, "description": "One image file."},
                        "files": {"type": "array", "items": _BINARY, "description": "Several image files."},
                    },
                }
            },
            "application/json": {"schema": PredictJSONRequest.model_json_schema()},
            "image/*": {"schema": {**_BINARY, "description": "The raw bytes of one image (PNG, JPEG, ...)."}},
            "application/octet-stream": {"schema": {**_BINARY, "description": "The raw bytes of one image."}},
        },
    }
}


@router.post(
    "/v1/predict",
    response_model=PredictResponse,
    responses=PREDICT_ERRORS,
    openapi_extra=PREDICT_BODY,
    summary="Classify images and decide whether to trust each prediction",
)
async def predict(
    request: Request,
    top_k: Annotated[
        int, Query(ge=1, le=1000, description="How many most-probable classes to return (at most the number of classes).")
    ] = 3,
    operating_point: Annotated[
        str | None,
        Query(max_length=64, description="Calibrated operating point (see GET /v1/models); default: the bundle's."),
    ] = None,
) -> JSONResponse:
    # The hot path reads app.state directly: FastAPI dependencies cost tens of microseconds each.
    state = request.app.state
    settings, metrics = state.settings, state.metrics
    model, batcher = state.registry.active, state.batcher
    if model is None or batcher is None or not state.ready:
        raise unavailable("not_ready", "the service is not ready (starting, or shutting down)", settings.retry_after_s)
    manifest = model.manifest
    if top_k > len(manifest.classes):
        raise ApiError(422, "invalid_top_k", f"top_k must be between 1 and {len(manifest.classes)} (the number of classes)")
    _operating_point(manifest, operating_point)  # fail fast, before reading the body

    with batcher.incoming() as ticket:  # lets the batcher wait for this request instead of running without it
        blobs = await _read_images(request, settings.max_images_per_request)
        loop = asyncio.get_running_loop()
        try:
            images = await loop.run_in_executor(state.decode_pool, decode_images, blobs, manifest.input, state.limits)
        except ImageError as exc:
            metrics.image_rejects.labels(exc.code).inc()
            raise ApiError(exc.status, exc.code, exc.message) from None
        del blobs
        result = await _infer(batcher, images, ticket, settings, metrics)

    served = result.model  # the model that ran the batch (a hot-swap may have happened meanwhile)
    try:
        scored = score_outputs(served, result.outputs, top_k, _operating_point(served.manifest, operating_point, swapped=True))
    except NonFiniteOutput as exc:
        metrics.inference_errors.inc()
        raise unavailable("inference_failed", str(exc), settings.retry_after_s) from None
    metrics.observe_predictions(scored.scores, scored.p_values, scored.accepted)
    return JSONResponse(
        {
            "model": {"name": served.name, "version": served.version, "sha256": served.sha256},
            "request_id": request.state.request_id,
            "predictions": scored.predictions,
        }
    )


async def _infer(batcher, images, ticket, settings, metrics):
    """Queue the decoded images; timeouts and batcher failures become 503 with Retry-After."""
    try:
        async with asyncio.timeout(settings.request_timeout_s):
            return await batcher.infer(images, ticket)
    except TimeoutError:
        metrics.inference_errors.inc()
        raise unavailable("timeout", f"inference took longer than {settings.request_timeout_s}s", settings.retry_after_s) from None
    except BatcherError as exc:
        raise unavailable(exc.code, exc.message, settings.retry_after_s) from None


def _operating_point(manifest, name: str | None, swapped: bool = False):
    try:
        return manifest.operating_point(name)
    except KeyError:
        known = ", ".join(op.name for op in manifest.operating_points)
        if swapped:  # valid when the request arrived; the model that answered lacks it
            raise unavailable("model_changed", f"the model changed and has no operating point {name!r}; retry") from None
        raise ApiError(422, "unknown_operating_point", f"unknown operating_point {name!r}; this model has: {known}") from None


async def _read_images(request: Request, max_images: int) -> list[bytes]:
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        blobs = await _read_multipart(request, max_images)
    elif media_type == "application/json" or media_type.endswith("+json"):
        blobs = _decode_json(await request.body(), max_images)
    elif media_type.startswith("image/") or media_type == "application/octet-stream":
        blobs = [await request.body()]
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"unsupported Content-Type {content_type or '(none)'!r}; send multipart/form-data (file/files), "
            "application/json ({\"images\": [base64...]}) or an image/* body",
        )
    if not blobs:
        raise ApiError(422, "no_images", "the request contains no images")
    if len(blobs) > max_images:
        raise ApiError(422, "too_many_images", f"{len(blobs)} images in one request; at most {max_images} allowed")
    return blobs


async def _read_multipart(request: Request, max_images: int) -> list[bytes]:
    parser = MultiPartParser(
        request.headers, request.stream(), max_files=max_images + 1, max_fields=max_images + 16, max_part_size=_MAX_TEXT_PART
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if exc.message.startswith("Too many files"):
            raise ApiError(422, "too_many_images", f"more than {max_images} files in one request") from None
        raise ApiError(422, "invalid_multipart", f"malformed multipart body: {exc.message}") from None
    except (FormParserError, ValueError, UnicodeDecodeError) as exc:
        raise ApiError(422, "invalid_multipart", f"malformed multipart body: {exc}") from None
    try:
        blobs = []
        for key, value in form.multi_items():
            if key not in _FILE_FIELDS:
                continue
            if not isinstance(value, UploadFile):
                raise ApiError(422, "invalid_multipart", f"multipart field {key!r} must be a file upload, not text")
            blobs.append(await value.read())
        if not blobs:
            raise ApiError(422, "no_images", "multipart body has no `file` or `files` field")
        return blobs
    finally:
        await form.close()


def _decode_json(body: bytes, max_images: int) -> list[bytes]:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: absurd nesting
        raise ApiError(422, "invalid_json", f"body is not valid JSON: {type(exc).__name__}: {exc}"[:300]) from None
    images = payload.get("images") if isinstance(payload, dict) else None
    if not isinstance(images, list):
        raise ApiError(422, "invalid_json", 'JSON body must be an object {"images": ["<base64>", ...]}')
    if len(images) > max_images:
        raise ApiError(422, "too_many_images", f"{len(images)} images in one request; at most {max_images} allowed")
    blobs = []
    for i, item in enumerate(images):
        if not isinstance(item, str):
            raise ApiError(422, "invalid_base64", f"image {i}: expected a base64 string, got {type(item).__name__}")
        if item.startswith("data:"):
            _, sep, item = item.partition(",")
            if not sep:
                raise ApiError(422, "invalid_base64", f"image {i}: malformed data: URL")
        try:
            blobs.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise ApiError(422, "invalid_base64", f"image {i}: invalid base64 ({exc})") from None
    return blobs
