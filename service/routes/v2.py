"""Open Inference Protocol v2 (KServe / Triton REST) for ecosystem clients such as `tritonclient[http]`.

Tensors in, tensors out: the client sends the graph input `image` (FP32, [N, 3, H, W], values in
[0, 1]) as JSON `data` or as binary tensor data, and gets every graph output back, or those it
names; it may also name the verdict outputs `ood_score`, `p_value`, `accept` (BOOL) and
`label_index` (INT64), computed by `postprocess.score_outputs` exactly as /v1/predict computes them
(request parameter `operating_point` picks the threshold). The wire format, JSON and binary, is
`service.v2_codec`; inference goes through the same batcher as /v1/predict and every answered
request's p-values feed the metrics and the drift alarm like /v1's. Errors use the OIP shape
`{"error": "<message>", "code": "<code>"}` (chosen in `errors.error_body` by path); a not-ready
server answers 503.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response

from ..batching import BatcherError
from ..deps import ActiveModelDep, BatcherDep, SettingsDep
from ..errors import ApiError, unavailable
from ..postprocess import NonFiniteOutput, score_outputs
from ..schemas import V2ErrorResponse, V2InferRequest, V2InferResponse, V2ModelMetadata, V2ServerMetadata
from ..v2_codec import VERDICT_OUTPUTS, InputSpec, encode_infer_response, parse_infer_request
from .health import is_ready
from .predict import resolve_operating_point

router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"])

_ERRORS = {
    404: {"model": V2ErrorResponse, "description": "Unknown model name or version (`model_not_found`)."},
    422: {
        "model": V2ErrorResponse,
        "description": "Wrong input name, datatype, shape, data length or binary data size (`invalid_tensor`), "
        "unknown or repeated output (`unknown_output`, `duplicate_output`, `too_many_outputs`), a JSON part with more values than the largest valid tensor (`too_many_values`), a bad parameter (`invalid_parameter`, "
        "`unsupported_parameter`, `unknown_operating_point`), or a body that is not a v2 inference request "
        "(`validation_error`).",
    },
    503: {"model": V2ErrorResponse, "description": "Not ready, queue full, or inference failed; has Retry-After."},
}
_INFER_ERRORS = {
    400: {
        "model": V2ErrorResponse,
        "description": "The JSON part is not valid JSON (`invalid_json`), or Inference-Header-Content-Length is "
        "larger than the body (`invalid_inference_header`).",
    },
    413: {"model": V2ErrorResponse, "description": "Body larger than `max_body_bytes` (`body_too_large`)."},
    415: {"model": V2ErrorResponse, "description": "A compressed body (Content-Encoding); send it uncompressed."},
    **_ERRORS,
}
_INFER_OPENAPI = {
    "requestBody": {
        "required": True,
        "description": "A v2 inference request as JSON (any or no Content-Type), or, with the binary tensor "
        "extension, that JSON followed by the raw tensor bytes (Inference-Header-Content-Length = JSON length).",
        "content": {
            "application/json": {"schema": V2InferRequest.model_json_schema()},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
}
_INFER_200 = {
    "description": "JSON; or, when an output is binary, a JSON header of Inference-Header-Content-Length bytes "
    "followed by the outputs' bytes (application/octet-stream).",
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}
HeaderLength = Annotated[
    int | None,
    Header(
        alias="Inference-Header-Content-Length",
        ge=0,
        description="Binary tensor extension: the length of the JSON part; the rest of the body is tensor data.",
    ),
]


def _server_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("oodguard")
    except PackageNotFoundError:
        return "0"


@router.get("", response_model=V2ServerMetadata, summary="Server metadata")
async def server_metadata() -> dict:
    return {"name": "oodguard", "version": _server_version(), "extensions": ["binary_tensor_data"]}


@router.get("/health/live", summary="Server liveness (200 = live)")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="Server readiness (200 = ready, 503 = not ready)", responses={503: _ERRORS[503]})
async def ready(request: Request) -> JSONResponse:
    if not is_ready(request):
        raise unavailable("not_ready", "no warmed model is serving yet", request.app.state.settings.retry_after_s)
    return JSONResponse({"ready": True})


def _check_model(model, name: str, version: str | None) -> None:
    if name != model.name:
        raise ApiError(404, "model_not_found", f"unknown model {name!r}; this server serves {model.name!r}")
    if version is not None and version != model.version:
        raise ApiError(
            404, "model_not_found", f"model {name!r} version {version!r} is not being served (active: {model.version!r})"
        )


def _metadata(model) -> dict:
    spec = model.manifest.input
    k = len(model.manifest.classes)

    # The bundle contract: logits/probs are [N, classes]; every other output is one score per image.
    def shape(n: str) -> list[int]:
        return [-1, k] if n in ("logits", "probs") else [-1]

    return {
        "name": model.name,
        "versions": [model.version],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": model.input_name, "datatype": "FP32", "shape": [-1, spec.channels, spec.height, spec.width]}],
        "outputs": [{"name": n, "datatype": "FP32", "shape": shape(n)} for n in model.output_names],
        "parameters": {
            "verdict_outputs": [
                {"name": n, "datatype": dt, "shape": [-1]} for n, dt in VERDICT_OUTPUTS.items() if n not in model.output_names
            ],
            "operating_points": [op.name for op in model.manifest.operating_points],
            "default_operating_point": model.manifest.operating_point().name,
        },
    }


@router.get("/models/{name}", response_model=V2ModelMetadata, responses=_ERRORS, summary="Model metadata")
async def model_metadata(name: str, model: ActiveModelDep) -> dict:
    _check_model(model, name, None)
    return _metadata(model)


@router.get(
    "/models/{name}/versions/{version}", response_model=V2ModelMetadata, responses=_ERRORS, summary="Model version metadata"
)
async def model_version_metadata(name: str, version: str, model: ActiveModelDep) -> dict:
    _check_model(model, name, version)
    return _metadata(model)


@router.get("/models/{name}/ready", responses=_ERRORS, summary="Model readiness")
async def model_ready(name: str, model: ActiveModelDep) -> dict:
    _check_model(model, name, None)
    return {"name": model.name, "ready": True}


@router.post(
    "/models/{name}/infer",
    response_model=V2InferResponse,
    responses={**_INFER_ERRORS, 200: _INFER_200},
    openapi_extra=_INFER_OPENAPI,
    summary="Run the model",
)
async def infer(
    name: str, request: Request, model: ActiveModelDep, batcher: BatcherDep, settings: SettingsDep, header_length: HeaderLength = None
) -> Response:
    return await _infer(name, None, request, header_length, model, batcher, settings)


@router.post(
    "/models/{name}/versions/{version}/infer",
    response_model=V2InferResponse,
    responses={**_INFER_ERRORS, 200: _INFER_200},
    openapi_extra=_INFER_OPENAPI,
    summary="Run a model version",
)
async def infer_version(
    name: str,
    version: str,
    request: Request,
    model: ActiveModelDep,
    batcher: BatcherDep,
    settings: SettingsDep,
    header_length: HeaderLength = None,
) -> Response:
    return await _infer(name, version, request, header_length, model, batcher, settings)


def input_spec(model, max_images: int) -> InputSpec:
    spec = model.manifest.input
    graph = tuple(model.output_names)
    return InputSpec(
        input_name=model.input_name,
        chw=(spec.channels, spec.height, spec.width),
        max_images=max_images,
        outputs=graph + tuple(n for n in VERDICT_OUTPUTS if n not in graph),
        default_outputs=graph,
    )


async def _infer(name: str, version: str | None, request: Request, header_length: int | None, model, batcher, settings) -> Response:
    _check_model(model, name, version)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(415, "unsupported_media_type", f"Content-Encoding {encoding!r} is not supported; send the body uncompressed")
    parsed = parse_infer_request(await request.body(), header_length, input_spec(model, settings.max_images_per_request))
    op_name = parsed.parameters.get("operating_point")
    if op_name is not None and not isinstance(op_name, str):
        raise ApiError(422, "invalid_parameter", f"parameters.operating_point must be a string, got {op_name!r}")
    resolve_operating_point(model.manifest, op_name)  # fail fast, before inference
    try:
        async with asyncio.timeout(settings.request_timeout_s):
            result = await batcher.infer(parsed.images)
    except TimeoutError:
        raise unavailable("timeout", f"inference took longer than {settings.request_timeout_s}s", settings.retry_after_s) from None
    except BatcherError as exc:
        raise unavailable(exc.code, exc.message, settings.retry_after_s) from None

    served = result.model  # the model that ran the batch (a hot-swap may have happened meanwhile)
    metrics = request.app.state.metrics
    wants_verdict = any(n in VERDICT_OUTPUTS and n not in result.outputs for n, _ in parsed.outputs)
    available = {**(_verdict(served, result.outputs, op_name, metrics, wants_verdict, settings.retry_after_s) or {}), **result.outputs}
    tensors = []
    for out_name, as_binary in parsed.outputs:
        arr = available.get(out_name)
        if arr is None:  # the model that answered lacks an output the request's model had
            raise unavailable("model_changed", f"the model changed and has no output {out_name!r}; retry", settings.retry_after_s)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise unavailable("inference_failed", f"output {out_name!r} is not finite", settings.retry_after_s)
        tensors.append((out_name, arr, as_binary))
    head = {"model_name": served.name, "model_version": served.version}
    if parsed.id is not None:
        head["id"] = parsed.id
    body, json_length = encode_infer_response(head, tensors)
    if json_length is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream", headers={"Inference-Header-Content-Length": str(json_length)})


def _verdict(served, outputs: dict, op_name: str | None, metrics, required: bool, retry_after_s: int) -> dict[str, np.ndarray] | None:
    """The verdict tensors, scored as /v1/predict scores; recorded in the metrics and the drift alarm.

    When no verdict can be given (outputs not finite; after a swap, a model without the operating
    point) a request that asked for it gets a 503, and one that asked only for graph outputs gets
    them without a verdict (nothing recorded).
    """
    try:
        op = resolve_operating_point(served.manifest, op_name, swapped=True)
        scored = score_outputs(served, outputs, 1, op)
    except NonFiniteOutput as exc:
        if required:
            metrics.inference_errors.inc()
            raise unavailable("inference_failed", str(exc), retry_after_s) from None
        return None
    except ApiError:
        if required:
            raise
        return None
    metrics.observe_predictions(scored.scores, scored.p_values, scored.accepted, served.sha256)
    return {
        "ood_score": np.asarray(scored.scores, dtype=np.float32),
        "p_value": np.asarray(scored.p_values, dtype=np.float64),
        "accept": np.asarray(scored.accepted, dtype=np.bool_),
        "label_index": np.asarray([p["class_index"] for p in scored.predictions], dtype=np.int64),
    }
