"""Open Inference Protocol v2 on the wire: JSON bodies and the binary tensor extension, both ways.

Pure functions, no I/O: `parse_infer_request(body, header_length, spec)` turns the bytes of a
POST .../infer into checked numpy input and the list of outputs to send, `encode_infer_response`
turns named arrays back into bytes. Real clients (`tritonclient[http]`, KServe's) send:

- JSON with no Content-Type at all (so the body is read as JSON whatever the header says);
- the binary tensor extension: the header `Inference-Header-Content-Length: L` says the first L
  bytes are the JSON request and the rest is the raw, little-endian tensor data of the inputs
  whose `parameters.binary_data_size` give their byte counts, in input order;
- `outputs: [{"name", "parameters": {"binary_data": true}}]`, or request-level
  `parameters.binary_data_output: true` (every output binary unless an output says otherwise);
  binary outputs come back after a JSON header of `Inference-Header-Content-Length` bytes, each with
  `parameters.binary_data_size`.

Work per request is bounded before any array is built: the JSON part holds no more values than
the largest valid tensor (its separators are counted before it is parsed: parsed numbers cost ~30x
their bytes), no more requested outputs than the model offers (checked on the parsed JSON, before
validation builds a model per entry), one input, its shape within the service's limits, the element
count equal to the shape's product and to the byte count, every binary byte claimed by exactly one
input, requested outputs unique and known.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import ValidationError

from .errors import OodguardError, invalid_request
from .request_body import check_json_budget
from .schemas import V2InferRequest

# v2 datatype <-> little-endian numpy dtype (the binary extension is little-endian).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "INT8": np.dtype("i1"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_NAMES = {dt.newbyteorder("="): name for name, dt in DATATYPES.items()}

# The verdict, as /v1/predict computes it, offered as output tensors next to the graph's.
VERDICT_OUTPUTS: dict[str, str] = {"ood_score": "FP32", "p_value": "FP64", "accept": "BOOL", "label_index": "INT64"}


def datatype_of(arr: np.ndarray) -> str:
    return _NAMES.get(arr.dtype.newbyteorder("="), "BYTES")


@dataclass(frozen=True)
class InputSpec:
    """What the served model accepts, and which outputs a request may name."""

    input_name: str
    chw: tuple[int, int, int]
    max_images: int
    outputs: tuple[str, ...]  # every name a request may ask for
    default_outputs: tuple[str, ...]  # what a request that names none gets


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    images: np.ndarray  # float32 [N, C, H, W], finite
    outputs: tuple[tuple[str, bool], ...]  # (name, as binary), in the order to send
    parameters: dict[str, Any]  # request-level parameters (e.g. operating_point)


def _invalid(message: str, code: str = "invalid_tensor") -> OodguardError:
    return OodguardError("invalid_input", code, message)


def max_json_separators(spec: InputSpec) -> int:
    """Separators (`,` `:`) the JSON part of a valid request can need: one per tensor value, plus the fields'."""
    return spec.max_images * math.prod(spec.chw) + 1024


def split_body(body: bytes, header_length: int | None) -> tuple[bytes, bytes]:
    """(JSON part, binary part) of a request or response body."""
    if header_length is None:
        return body, b""
    if not 0 <= header_length <= len(body):
        raise OodguardError(
            "bad_request",
            "invalid_inference_header",
            f"Inference-Header-Content-Length is {header_length} but the body has {len(body)} bytes",
        )
    return body[:header_length], body[header_length:]


def parse_infer_request(body: bytes, header_length: int | None, spec: InputSpec) -> InferRequest:
    json_part, binary = split_body(body, header_length)
    check_json_budget(json_part, max_json_separators(spec))
    try:
        raw = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:  # also integers beyond 64 bits and nesting deeper than 1024
        raise OodguardError("bad_request", "invalid_json", f"the inference request is not valid JSON: {exc}") from None
    outputs = raw.get("outputs") if isinstance(raw, dict) else None
    if isinstance(outputs, list) and len(outputs) > len(spec.outputs):  # before a model per entry is built
        raise _invalid(f"{len(outputs)} outputs requested; this model offers {len(spec.outputs)}", "too_many_outputs")
    try:
        request = V2InferRequest.model_validate(raw)
    except ValidationError as exc:
        raise invalid_request(exc.errors(), "body") from None
    images = _input_tensor(request, spec, binary)
    parameters = dict(request.parameters or {})
    return InferRequest(request.id, images, _requested_outputs(request, spec, parameters), parameters)


def _input_tensor(request: V2InferRequest, spec: InputSpec, binary: bytes) -> np.ndarray:
    if len(request.inputs) != 1 or request.inputs[0].name != spec.input_name:
        raise _invalid(f"expected exactly one input named {spec.input_name!r}, got {[i.name for i in request.inputs]}")
    tensor = request.inputs[0]
    if tensor.datatype != "FP32":
        raise _invalid(f"input {tensor.name!r} must be FP32, got {tensor.datatype!r}")
    expected = list(spec.chw)
    shape = tensor.shape
    if len(shape) != 4 or list(shape[1:]) != expected or not 1 <= shape[0] <= spec.max_images:
        raise _invalid(f"input shape must be [N, {', '.join(map(str, expected))}] with 1 <= N <= {spec.max_images}, got {shape}")
    count = math.prod(shape)  # bounded: max_images * C * H * W
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is None:
        if binary:
            raise _invalid(f"{len(binary)} bytes of binary data follow the JSON header but no input declares binary_data_size")
        if tensor.data is None:
            raise _invalid(f"input {tensor.name!r} has neither data nor parameters.binary_data_size")
        if len(tensor.data) != count:
            raise _invalid(f"shape {shape} needs {count} values, data has {len(tensor.data)}")
        with np.errstate(over="ignore"):  # out-of-range values become inf and are refused just below
            images = np.asarray(tensor.data, dtype=np.float32).reshape(shape)
    else:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise _invalid(f"parameters.binary_data_size of {tensor.name!r} must be a non-negative integer, got {size!r}")
        if tensor.data is not None:
            raise _invalid(f"input {tensor.name!r} has both data and parameters.binary_data_size")
        itemsize = DATATYPES["FP32"].itemsize
        if size != count * itemsize:
            raise _invalid(f"shape {shape} of FP32 needs {count * itemsize} bytes, binary_data_size is {size}")
        if size != len(binary):
            raise _invalid(f"binary_data_size is {size} but {len(binary)} bytes of binary data follow the JSON header")
        images = np.frombuffer(binary, dtype=DATATYPES["FP32"]).astype(np.float32).reshape(shape)
    if not np.isfinite(images).all():
        raise _invalid("input contains NaN or infinite values")
    return images


def _flag(parameters: dict | None, key: str, where: str, default: bool) -> bool:
    value = (parameters or {}).get(key, default)
    if not isinstance(value, bool):
        raise _invalid(f"{where}.{key} must be true or false, got {value!r}", "invalid_parameter")
    return value


def _requested_outputs(request: V2InferRequest, spec: InputSpec, parameters: dict) -> tuple[tuple[str, bool], ...]:
    binary_default = _flag(parameters, "binary_data_output", "parameters", False)
    if not request.outputs:
        return tuple((name, binary_default) for name in spec.default_outputs)
    names = [o.name for o in request.outputs]
    duplicates = sorted(n for n, k in Counter(names).items() if k > 1)  # linear: a body may name many
    if duplicates:
        raise _invalid(f"output(s) {duplicates} requested more than once", "duplicate_output")
    unknown = [n for n in names if n not in spec.outputs]
    if unknown:
        raise _invalid(f"unknown output(s) {unknown}; this model offers {list(spec.outputs)}", "unknown_output")
    wanted = []
    for out in request.outputs:
        if "classification" in (out.parameters or {}):
            raise _invalid(f"output {out.name!r}: the classification extension is not supported", "unsupported_parameter")
        wanted.append((out.name, _flag(out.parameters, "binary_data", f"outputs[{out.name}].parameters", binary_default)))
    return tuple(wanted)


def encode_infer_response(head: dict[str, Any], tensors: list[tuple[str, np.ndarray, bool]]) -> tuple[bytes, int | None]:
    """(body, JSON header length or None). `head`: model_name, model_version, id; tensors: (name, array, binary)."""
    outputs, blobs = [], []
    for name, arr, as_binary in tensors:
        datatype = datatype_of(arr)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if as_binary and datatype in DATATYPES:
            blob = np.ascontiguousarray(arr, dtype=DATATYPES[datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = arr.ravel().tolist()
        outputs.append(entry)
    header = orjson.dumps({**head, "outputs": outputs})
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
