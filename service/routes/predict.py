"""POST /v1/predict: classify images and say whether to trust each answer - an adapter over the inference layer.

The body (multipart `file`/`files`, a raw image, or JSON base64; see `service.request_body`) is
parsed by hand rather than by FastAPI parameters because one route takes all three forms. Reading,
decoding, batching, inference and scoring are `InferenceService.predict` (service/inference.py);
this module only turns its answer into JSON. One bad image fails the whole request, and the error
names its index.

Two ways in, one implementation (`_predict`):

- `PredictEndpoint`, a plain ASGI app that `install_fast_path` puts first in the app's routes, serves
  every POST /v1/predict. Under load FastAPI's per-request machinery (telemetry context, three exit
  stacks, dependency solving, response wrapping) took a quarter of the event loop's time on this one
  route (py-spy, docs/benchmarks.md); this endpoint validates its query with the same pydantic model
  (`schemas.PredictQuery`) and answers errors through the same `errors.render`.
- The FastAPI route below declares the same contract for OpenAPI (/docs, clients, schemathesis) and
  serves it whenever the fast path is not installed; tests run the request suite through both.
"""

from __future__ import annotations

import logging
from typing import Annotated

import orjson
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..errors import OodguardError, error_response, invalid_request
from ..preprocess import ALLOWED_FORMATS
from ..schemas import ErrorResponse, PredictJSONRequest, PredictQuery, PredictResponse

log = logging.getLogger(__name__)

router = APIRouter(tags=["predict"])

PATH = "/v1/predict"
_DEFAULT_QUERY = PredictQuery()


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
        "Undecodable or invalid image (`invalid_image`; `decoder_crashed` when decoding a large image ended its worker "
        "process), no images (`no_images`), more than "
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
async def predict(request: Request, query: Annotated[PredictQuery, Query()]) -> JSONResponse:
    return await _predict(request, query)


class PredictEndpoint:
    """POST /v1/predict as a plain ASGI app: the same handler without FastAPI's per-request machinery."""

    route: Route | None = None  # set by install_fast_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self.route  # the middleware labels metrics with the route template
        request = Request(scope, receive)
        try:
            response = await _predict(request, parse_query(request))
        except OodguardError as exc:  # the app's exception handlers are not on this path: the same rendering
            response = error_response(exc, PATH, request.app.state.settings.retry_after_s)
        await response(scope, receive, send)


def install_fast_path(app: FastAPI) -> None:
    """Serve POST /v1/predict with `PredictEndpoint`: first in the routes, so it matches before the APIRoute."""
    endpoint = PredictEndpoint()
    endpoint.route = Route(PATH, endpoint, methods=["POST"], include_in_schema=False)
    app.router.routes.insert(0, endpoint.route)


def parse_query(request: Request) -> PredictQuery:
    """The query, validated by the model the FastAPI route declares (so errors read the same)."""
    if not request.scope["query_string"]:
        return _DEFAULT_QUERY
    try:
        return PredictQuery.model_validate(dict(request.query_params))
    except ValidationError as exc:
        raise invalid_request(exc.errors(), "query") from None


async def _predict(request: Request, query: PredictQuery) -> JSONResponse:
    # The hot path reads app.state directly: FastAPI dependencies cost tens of microseconds each.
    served, scored = await request.app.state.inference.predict(
        request.headers.get("content-type", ""), request.stream, request.body, query.top_k, query.operating_point
    )
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
