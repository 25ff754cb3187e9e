"""POST /v1/predict: classify images and say whether to trust each answer.

The body (multipart `file`/`files`, a raw image, or JSON base64; see `service.request_body`) is
parsed by hand rather than by FastAPI parameters because one route takes all three forms. Small
images are decoded on the event loop, larger ones in the decode thread pool (`_decode`); inference
runs in the batcher's thread. One bad image fails the whole request, and the error names its index.

Two ways in, one implementation (`predict_images`):

- `PredictEndpoint`, a plain ASGI app that `install_fast_path` puts first in the app's routes, serves
  every POST /v1/predict. Under load FastAPI's per-request machinery (telemetry context, three exit
  stacks, dependency solving, response wrapping) took a quarter of the event loop's time on this one
  route (py-spy, docs/benchmarks.md); this endpoint validates its two query parameters itself with
  the same bounds and error shape.
- The FastAPI route below declares the same contract for OpenAPI (/docs, clients, schemathesis) and
  serves it whenever the fast path is not installed; tests run the request suite through both.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

import orjson
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..batching import BatcherError
from ..errors import ApiError, error_response, unavailable
from ..postprocess import NonFiniteOutput, score_outputs
from ..preprocess import ALLOWED_FORMATS, ImageError, declared_pixels, decode_images, load_images, open_images
from ..request_body import read_images
from ..schemas import ErrorResponse, PredictJSONRequest, PredictResponse

log = logging.getLogger(__name__)

router = APIRouter(tags=["predict"])

PATH = "/v1/predict"
TOP_K_DEFAULT, TOP_K_MAX = 3, 1000
OPERATING_POINT_MAX_LEN = 64


def _err(description: str, code: str, message: str) -> dict:
    return {
        "model": ErrorResponse,
        "description": description,
        "content": {"application/json": {"example": {"error": {"code": code, "message": message}}}},
    }


PREDICT_ERRORS = {
    413: _err(
        "Body larger than `max_body_bytes` (`body_too_large`), an image whose header declares more than "
        "`max_pixels` pixels (`too_many_pixels`) or a side above `max_image_side` (`image_too_large`), or "
        "images declaring more than `max_request_pixels` in all (`too_many_pixels`): refused before decoding.",
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
        "`max_images_per_request` (`too_many_images`), invalid JSON (`invalid_json`), a JSON body with more values than images allow "
        "(`too_many_values`) or invalid base64 (`invalid_base64`), malformed multipart (`invalid_multipart`), unknown `operating_point` "
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
    PATH,
    response_model=PredictResponse,
    responses=PREDICT_ERRORS,
    openapi_extra=PREDICT_BODY,
    summary="Classify images and decide whether to trust each prediction",
)
async def predict(
    request: Request,
    top_k: Annotated[
        int, Query(ge=1, le=TOP_K_MAX, description="How many most-probable classes to return (at most the number of classes).")
    ] = TOP_K_DEFAULT,
    operating_point: Annotated[
        str | None,
        Query(max_length=OPERATING_POINT_MAX_LEN, description="Calibrated operating point (see GET /v1/models); default: the bundle's."),
    ] = None,
) -> JSONResponse:
    return await predict_images(request, top_k, operating_point)


class PredictEndpoint:
    """POST /v1/predict as a plain ASGI app: the same handler without FastAPI's per-request machinery."""

    route: Route | None = None  # set by install_fast_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self.route  # the middleware labels metrics with the route template
        request = Request(scope, receive)
        try:
            top_k, operating_point = parse_query(request)
            response = await predict_images(request, top_k, operating_point)
        except ApiError as exc:  # the app's exception handlers are not on this path: same shape by hand
            response = error_response(exc.status_code, exc.code, exc.message, headers=exc.headers)
        await response(scope, receive, send)


def install_fast_path(app: FastAPI) -> None:
    """Serve POST /v1/predict with `PredictEndpoint`: first in the routes, so it matches before the APIRoute."""
    endpoint = PredictEndpoint()
    endpoint.route = Route(PATH, endpoint, methods=["POST"], include_in_schema=False)
    app.router.routes.insert(0, endpoint.route)


def parse_query(request: Request) -> tuple[int, str | None]:
    """`top_k` and `operating_point` with the FastAPI route's bounds; errors read like FastAPI's."""
    params = request.query_params
    raw_top_k = params.get("top_k")
    top_k = TOP_K_DEFAULT
    if raw_top_k is not None:
        try:
            top_k = int(raw_top_k)
        except ValueError:
            raise ApiError(422, "validation_error", "query.top_k: Input should be a valid integer, unable to parse string as an integer") from None
        if not 1 <= top_k <= TOP_K_MAX:
            bound = "greater than or equal to 1" if top_k < 1 else f"less than or equal to {TOP_K_MAX}"
            raise ApiError(422, "validation_error", f"query.top_k: Input should be {bound}")
    operating_point = params.get("operating_point")
    if operating_point is not None and len(operating_point) > OPERATING_POINT_MAX_LEN:
        raise ApiError(422, "validation_error", f"query.operating_point: String should have at most {OPERATING_POINT_MAX_LEN} characters")
    return top_k, operating_point


async def predict_images(request: Request, top_k: int, operating_point: str | None) -> JSONResponse:
    # The hot path reads app.state directly: FastAPI dependencies cost tens of microseconds each.
    state = request.app.state
    settings, metrics = state.settings, state.metrics
    model, batcher = state.registry.active, state.batcher
    if model is None or batcher is None or not state.ready:
        raise unavailable("not_ready", "the service is not ready (starting, or shutting down)", settings.retry_after_s)
    manifest = model.manifest
    if top_k > len(manifest.classes):
        raise ApiError(422, "invalid_top_k", f"top_k must be between 1 and {len(manifest.classes)} (the number of classes)")
    resolve_operating_point(manifest, operating_point)  # fail fast, before reading the body

    with batcher.incoming() as ticket:  # lets the batcher wait for this request instead of running without it
        blobs = await read_images(
            request.headers.get("content-type", ""), request.stream, request.body, settings.max_images_per_request
        )
        try:
            images = await _decode(blobs, manifest.input, state, settings)
        except ImageError as exc:
            metrics.image_rejects.labels(exc.code).inc()
            raise ApiError(exc.status, exc.code, exc.message) from None
        del blobs
        result = await _infer(batcher, images, ticket, settings, metrics)

    served = result.model  # the model that ran the batch (a hot-swap may have happened meanwhile)
    try:
        scored = score_outputs(served, result.outputs, top_k, resolve_operating_point(served.manifest, operating_point, swapped=True))
    except NonFiniteOutput as exc:
        metrics.inference_errors.inc()
        raise unavailable("inference_failed", str(exc), settings.retry_after_s) from None
    metrics.observe_predictions(scored.scores, scored.p_values, scored.accepted, served.sha256)
    return PredictJSONResponse(
        {
            "model": {"name": served.name, "version": served.version, "sha256": served.sha256},
            "request_id": request.state.request_id,
            "predictions": scored.predictions,
        }
    )


class PredictJSONResponse(JSONResponse):
    """orjson instead of the json module: the response is plain floats, ints and strings, serialised in C."""

    def render(self, content) -> bytes:
        return orjson.dumps(content)


async def _decode(blobs: list[bytes], spec, state, settings):
    """Small images on the event loop, the rest in the decode pool.

    Handing a CIFAR-size JPEG to a thread costs more than decoding it (a future, two wake-ups and a GIL
    hand-off each way; +10-15% throughput inline, bench/serve.py), so requests whose images are small
    in bytes (bounded header parsing) *and* in declared pixels (bounded decoding: 65,536 pixels take
    about a millisecond) are decoded inline. Anything larger cannot stall the loop: it goes to the pool.
    """
    loop = asyncio.get_running_loop()
    if sum(map(len, blobs)) > settings.inline_decode_max_bytes:
        return await loop.run_in_executor(state.decode_pool, decode_images, blobs, spec, state.limits)
    opened = open_images(blobs, state.limits)
    if declared_pixels(opened) <= settings.inline_decode_max_pixels:
        return load_images(opened, spec)
    return await loop.run_in_executor(state.decode_pool, load_images, opened, spec)


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


def resolve_operating_point(manifest, name: str | None, swapped: bool = False):
    """The manifest's operating point `name` (None: its default); 422 if unknown, 503 model_changed after a swap."""
    try:
        return manifest.operating_point(name)
    except KeyError:
        known = ", ".join(op.name for op in manifest.operating_points)
        if swapped:  # valid when the request arrived; the model that answered lacks it
            raise unavailable("model_changed", f"the model changed and has no operating point {name!r}; retry") from None
        raise ApiError(422, "unknown_operating_point", f"unknown operating_point {name!r}; this model has: {known}") from None
