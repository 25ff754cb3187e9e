"""Open Inference Protocol v2 (KServe / Triton REST) for ecosystem clients such as `tritonclient[http]`.

Tensors in, tensors out: the client sends the graph input `image` (FP32, [N, 3, H, W], values in
[0, 1]) as JSON `data` or as binary tensor data, and gets every graph output back, or those it
names; it may also name the verdict outputs `ood_score`, `p_value`, `accept` (BOOL) and
`label_index` (INT64), computed by `postprocess.score_outputs` exactly as /v1/predict computes them
(request parameter `operating_point` picks the threshold). The wire format, JSON and binary, is
`service.v2_codec`; inference goes through the same batcher as /v1/predict and every answered
request's p-values feed the metrics and the drift alarm like /v1's. Errors use the OIP shape
`{"error": "<message>", "code": "<code>"}` (chosen in `errors.error_body` by path); a not-ready
server answers 503. Like /v1/predict, an adapter over the inference layer (service/inference.py):
readiness, the model lookup, inference with its deadline and the verdict are `InferenceService`'s.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Header, Request
from fastapi.responses import Response

from ..deps import InferenceDep
from ..errors import OodguardError
from ..inference import InferenceService, resolve_operating_point
from ..request_body import read_json_body
from ..schemas import V2ErrorResponse, V2InferRequest, V2InferResponse, V2ModelMetadata, V2ServerMetadata
from ..v2_codec import VERDICT_OUTPUTS, InputSpec, encode_infer_response, max_json_separators, parse_infer_request
from .health import server_version

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


@router.get("", response_model=V2ServerMetadata, summary="Server metadata")
async def server_metadata() -> dict:
    return {"name": "oodguard", "version": server_version(), "extensions": ["binary_tensor_data"]}


@router.get("/health/live", summary="Server liveness (200 = live)")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="Server readiness (200 = ready, 503 = not ready)", responses={503: _ERRORS[503]})
async def ready(inference: InferenceDep) -> dict:
    inference.ready_model()
    return {"ready": True}


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
async def model_metadata(name: str, inference: InferenceDep) -> dict:
    return _metadata(inference.model_named(name))


@router.get(
    "/models/{name}/versions/{version}", response_model=V2ModelMetadata, responses=_ERRORS, summary="Model version metadata"
)
async def model_version_metadata(name: str, version: str, inference: InferenceDep) -> dict:
    return _metadata(inference.model_named(name, version))


@router.get("/models/{name}/ready", responses=_ERRORS, summary="Model readiness")
async def model_ready(name: str, inference: InferenceDep) -> dict:
    return {"name": inference.model_named(name).name, "ready": True}


@router.post(
    "/models/{name}/infer",
    response_model=V2InferResponse,
    responses={**_INFER_ERRORS, 200: _INFER_200},
    openapi_extra=_INFER_OPENAPI,
    summary="Run the model",
)
async def infer(name: str, request: Request, inference: InferenceDep, header_length: HeaderLength = None) -> Response:
    return await _infer(inference, name, None, request, header_length)


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
    inference: InferenceDep,
    header_length: HeaderLength = None,
) -> Response:
    return await _infer(inference, name, version, request, header_length)


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


async def _infer(inference: InferenceService, name: str, version: str | None, request: Request, header_length: int | None) -> Response:
    model = inference.model_named(name, version)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise OodguardError(
            "unsupported_media", "unsupported_media_type", f"Content-Encoding {encoding!r} is not supported; send the body uncompressed"
        )
    spec = input_spec(model, inference.settings.max_images_per_request)
    body = await read_json_body(request.stream(), max_json_separators(spec), header_length)
    parsed = parse_infer_request(body, header_length, spec)
    op_name = parsed.parameters.get("operating_point")
    if op_name is not None and not isinstance(op_name, str):
        raise OodguardError("invalid_input", "invalid_parameter", f"parameters.operating_point must be a string, got {op_name!r}")
    resolve_operating_point(model.manifest, op_name)  # fail fast, before inference
    result = await inference.infer(parsed.images)

    served = result.model  # the model that ran the batch (a hot-swap may have happened meanwhile)
    wants_verdict = any(n in VERDICT_OUTPUTS and n not in result.outputs for n, _ in parsed.outputs)
    available = {**(inference.verdict(result, op_name, required=wants_verdict) or {}), **result.outputs}
    tensors = []
    for out_name, as_binary in parsed.outputs:
        arr = available.get(out_name)
        if arr is None:  # the model that answered lacks an output the request's model had
            raise OodguardError("unavailable", "model_changed", f"the model changed and has no output {out_name!r}; retry")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise OodguardError("unavailable", "inference_failed", f"output {out_name!r} is not finite")
        tensors.append((out_name, arr, as_binary))
    head = {"model_name": served.name, "model_version": served.version}
    if parsed.id is not None:
        head["id"] = parsed.id
    body, json_length = encode_infer_response(head, tensors)
    if json_length is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream", headers={"Inference-Header-Content-Length": str(json_length)})
