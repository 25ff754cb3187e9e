"""Open Inference Protocol v2 (KServe / Triton REST) for ecosystem clients.

Tensors in, tensors out: the client sends the graph input `image` (FP32, [N, 3, H, W], values in
[0, 1], row-major flat `data`) and gets every graph output back (or those it names). No OOD
verdict here: that is /v1/predict's job. Inference goes through the same batcher as /v1/predict.
Errors use the service's `{"error": {"code", "message"}}` shape; a not-ready server answers 503.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..batching import BatcherError
from ..deps import ActiveModelDep, BatcherDep, SettingsDep
from ..errors import ApiError, unavailable
from ..schemas import ErrorResponse, V2InferRequest, V2InferResponse, V2ModelMetadata, V2ServerMetadata
from .health import is_ready

router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"])

_DATATYPES = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
    np.dtype(np.float16): "FP16",
    np.dtype(np.int64): "INT64",
    np.dtype(np.int32): "INT32",
    np.dtype(np.bool_): "BOOL",
}
_ERRORS = {
    404: {"model": ErrorResponse, "description": "Unknown model name or version (`model_not_found`)."},
    422: {
        "model": ErrorResponse,
        "description": "Wrong input name, datatype, shape or data length (`invalid_tensor`), unknown output "
        "(`unknown_output`), or a body that is not a v2 inference request (`validation_error`).",
    },
    503: {"model": ErrorResponse, "description": "Not ready, queue full, or inference failed; has Retry-After."},
}
# FastAPI answers a body that is not JSON at all with 400 before the route runs.
_INFER_ERRORS = {400: {"model": ErrorResponse, "description": "The body is not valid JSON (`bad_request`)."}, **_ERRORS}


def _server_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("oodguard")
    except PackageNotFoundError:
        return "0"


@router.get("", response_model=V2ServerMetadata, summary="Server metadata")
async def server_metadata() -> dict:
    return {"name": "oodguard", "version": _server_version(), "extensions": []}


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
    outputs = [
        {"name": n, "datatype": "FP32", "shape": [-1, k] if n in ("logits", "probs") else [-1]} for n in model.output_names
    ]
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": model.input_name, "datatype": "FP32", "shape": [-1, spec.channels, spec.height, spec.width]}],
        "outputs": outputs,
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


@router.post("/models/{name}/infer", response_model=V2InferResponse, responses=_INFER_ERRORS, summary="Run the model")
async def infer(name: str, body: V2InferRequest, model: ActiveModelDep, batcher: BatcherDep, settings: SettingsDep) -> JSONResponse:
    return await _infer(name, None, body, model, batcher, settings)


@router.post(
    "/models/{name}/versions/{version}/infer", response_model=V2InferResponse, responses=_INFER_ERRORS, summary="Run a model version"
)
async def infer_version(
    name: str, version: str, body: V2InferRequest, model: ActiveModelDep, batcher: BatcherDep, settings: SettingsDep
) -> JSONResponse:
    return await _infer(name, version, body, model, batcher, settings)


async def _infer(name: str, version: str | None, body: V2InferRequest, model, batcher, settings) -> JSONResponse:
    _check_model(model, name, version)
    images = _input_tensor(body, model, settings.max_images_per_request)
    wanted = [o.name for o in body.outputs] if body.outputs else list(model.output_names)
    unknown = [n for n in wanted if n not in model.output_names]
    if unknown:
        raise ApiError(422, "unknown_output", f"unknown output(s) {unknown}; the graph has {model.output_names}")
    try:
        async with asyncio.timeout(settings.request_timeout_s):
            result = await batcher.infer(images)
    except TimeoutError:
        raise unavailable("timeout", f"inference took longer than {settings.request_timeout_s}s", settings.retry_after_s) from None
    except BatcherError as exc:
        raise unavailable(exc.code, exc.message, settings.retry_after_s) from None
    outputs = []
    for out_name in wanted:
        arr = result.outputs[out_name]
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise unavailable("inference_failed", f"output {out_name!r} is not finite", settings.retry_after_s)
        outputs.append(
            {"name": out_name, "shape": list(arr.shape), "datatype": _DATATYPES.get(arr.dtype, "BYTES"), "data": arr.ravel().tolist()}
        )
    response = {"model_name": result.model.name, "model_version": result.model.version, "outputs": outputs}
    if body.id is not None:
        response["id"] = body.id
    return JSONResponse(response)


def _input_tensor(body: V2InferRequest, model, max_images: int) -> np.ndarray:
    spec = model.manifest.input
    if len(body.inputs) != 1 or body.inputs[0].name != model.input_name:
        raise ApiError(
            422, "invalid_tensor", f"expected exactly one input named {model.input_name!r}, got {[i.name for i in body.inputs]}"
        )
    tensor = body.inputs[0]
    if tensor.datatype != "FP32":
        raise ApiError(422, "invalid_tensor", f"input {tensor.name!r} must be FP32, got {tensor.datatype!r}")
    expected = [spec.channels, spec.height, spec.width]
    if len(tensor.shape) != 4 or list(tensor.shape[1:]) != expected or not 1 <= tensor.shape[0] <= max_images:
        raise ApiError(
            422,
            "invalid_tensor",
            f"input shape must be [N, {', '.join(map(str, expected))}] with 1 <= N <= {max_images}, got {tensor.shape}",
        )
    if len(tensor.data) != math.prod(tensor.shape):
        raise ApiError(
            422, "invalid_tensor", f"shape {tensor.shape} needs {math.prod(tensor.shape)} values, data has {len(tensor.data)}"
        )
    with np.errstate(over="ignore"):  # out-of-range values become inf and are refused just below
        images = np.asarray(tensor.data, dtype=np.float32).reshape(tensor.shape)
    if not np.isfinite(images).all():
        raise ApiError(422, "invalid_tensor", "input contains NaN or infinite values")
    return images
