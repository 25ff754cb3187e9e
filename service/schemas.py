"""Request and response bodies of the HTTP API — plain data, no logic, with OpenAPI examples.

The Open Inference Protocol v2 types mirror the KServe/Triton REST spec (`/v2/...`), errors
included: `/v2` answers `V2ErrorResponse` (`{"error": "<message>", "code": "<code>"}`), every
other path this service's `ErrorResponse`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_SHA = "3f7a9c0d51e2b4a8f6c1d0e9b8a7f6e5d4c3b2a1908f7e6d5c4b3a29180f7e6d"


def _example(**example: Any) -> ConfigDict:
    return ConfigDict(json_schema_extra={"examples": [example]})


# -- errors -----------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable error code, e.g. `invalid_image`, `queue_full`.")
    message: str = Field(description="What was wrong, for humans; names the offending image index if any.")
    index: int | None = Field(None, description="Which image of the request (0-based), when the error is about one.")
    check: str | None = Field(None, description="Admin API: which validation check refused the bundle.")


class ErrorResponse(BaseModel):
    model_config = _example(error={"code": "invalid_image", "message": "image 1: cannot decode PNG: truncated"})
    error: ErrorDetail


class V2ErrorResponse(BaseModel):
    """The Open Inference Protocol's error body (a string `error`), with this service's code next to it."""

    model_config = _example(error="input shape must be [N, 3, 32, 32] with 1 <= N <= 64, got [1, 3, 8, 8]", code="invalid_tensor")
    error: str = Field(description="What was wrong, for humans (the OIP / KServe `error` string).")
    code: str = Field(description="Stable machine-readable error code, e.g. `invalid_tensor`, `queue_full`.")


# -- /v1/predict ------------------------------------------------------------------------------------


class TopKEntry(BaseModel):
    label: str = Field(description="Class name.")
    probability: float = Field(ge=0.0, le=1.0, description="Softmax probability of this class.")


class Prediction(BaseModel):
    model_config = _example(
        label="cat",
        class_index=3,
        confidence=0.91,
        top_k=[{"label": "cat", "probability": 0.91}, {"label": "dog", "probability": 0.06}],
        ood_score=0.91,
        score_name="msp",
        p_value=0.42,
        threshold=0.52,
        operating_point="tpr95",
        decision="accept",
    )

    label: str = Field(description="Predicted class (arg-max of the probabilities).")
    class_index: int = Field(ge=0, description="Index of `label` in the model's class list.")
    confidence: float = Field(ge=0.0, le=1.0, description="Probability of the predicted class.")
    top_k: list[TopKEntry] = Field(description="The `top_k` most probable classes, most probable first.")
    ood_score: float = Field(description="The bundle's OOD score; higher = more in-distribution.")
    score_name: str = Field(description="Which score `ood_score` is (e.g. `msp`, `energy`).")
    p_value: float = Field(
        gt=0.0,
        le=1.0,
        description="Conformal p-value against held-out in-distribution calibration scores: "
        "(1 + #{calibration <= score}) / (n + 1). Small = unlike the training distribution.",
    )
    threshold: float = Field(description="Score threshold of the operating point; accept iff score >= threshold.")
    operating_point: str = Field(description="Operating point used (name of a calibrated target TPR).")
    decision: Literal["accept", "reject"] = Field(description="`reject`: treat the prediction as untrustworthy.")
    upload_form: str | None = Field(
        None,
        description="Form-conditional bundles only: the upload-form group read from the image's header (`native`, "
        "`jpeg_q<lo>_<hi>`, `smaller`, `larger`), whose calibration gave `threshold` and `p_value`.",
    )


class ModelRef(BaseModel):
    name: str
    version: str
    sha256: str = Field(description="sha256 of the bundle's manifest.json, which pins every file of the bundle.")


class PredictResponse(BaseModel):
    model_config = _example(
        model={"name": "cifar10-aloe", "version": "3", "sha256": _SHA},
        request_id="5b0c6f3e2a8d4c1e9f7a6b5d4c3e2f1a",
        predictions=[Prediction.model_config["json_schema_extra"]["examples"][0]],
    )

    model: ModelRef = Field(description="The bundle that answered (all images of a request use the same one).")
    request_id: str = Field(description="Also returned as the X-Request-ID header.")
    predictions: list[Prediction] = Field(description="One per input image, in input order.")


class PredictQuery(BaseModel):
    """The query parameters of POST /v1/predict (both ways in validate them with this model)."""

    top_k: int = Field(3, ge=1, le=1000, description="How many most-probable classes to return (at most the number of classes).")
    operating_point: str | None = Field(
        None, max_length=64, description="Calibrated operating point (see GET /v1/models); default: the bundle's."
    )


class PredictJSONRequest(BaseModel):
    model_config = _example(images=["iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"])
    images: list[str] = Field(min_length=1, description="Base64-encoded image files (PNG, JPEG, ...).")


# -- /v1/models, health -----------------------------------------------------------------------------


class BundleSummary(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    version: str
    sha256: str | None = None
    created_at: str
    classes: list[str]
    input: dict[str, Any] = Field(description="How images are turned into the model input (size, resize filter, ...).")
    score: dict[str, Any] = Field(description="The OOD score: name, ONNX output, direction.")
    operating_points: list[dict[str, Any]] = Field(description="Calibrated thresholds with realised TPR / FPR.")
    default_operating_point: str
    calibration_size: int
    metrics: dict[str, Any] = Field(description="Evaluation results (clean and attacked).")
    method: str | None = None
    model: str | None = None


class ModelsResponse(BaseModel):
    active: BundleSummary | None = Field(description="The bundle answering requests now.")
    versions: list[dict[str, Any]] = Field(description="Versions in the registry, available for rollback.")


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    status: Literal["ready"] = "ready"
    model: ModelRef


# -- Open Inference Protocol v2 -----------------------------------------------------------------------


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str] = Field(default_factory=list)


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str = Field(description="v2 datatype, e.g. FP32.")
    shape: list[int] = Field(description="-1 marks a dynamic dimension.")


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata] = Field(description="The graph's outputs: what an infer request naming no outputs gets.")
    parameters: dict[str, Any] | None = Field(
        None,
        description="`verdict_outputs`: the OOD verdict as tensors a request may name in `outputs` "
        "(`ood_score`, `p_value`, `accept`, `label_index`), computed as /v1/predict does; "
        "`operating_points`: the values request parameter `operating_point` may take.",
    )


class V2RequestInput(BaseModel):
    name: str = Field(description="Must be the graph's input name (`image`).")
    shape: list[int] = Field(description="[N, 3, H, W] with H, W from the bundle's input spec.")
    datatype: str = Field(description="Only FP32 is accepted.")
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data_size`: the tensor's bytes follow the JSON (binary tensor extension) instead of `data`."
    )
    data: list[float] | None = Field(None, description="Row-major flattened tensor values, N*3*H*W of them.")


class V2RequestOutput(BaseModel):
    name: str = Field(description="A graph output, or a verdict output (`ood_score`, `p_value`, `accept`, `label_index`).")
    parameters: dict[str, Any] | None = Field(None, description="`binary_data`: return this output as binary data.")


class V2InferRequest(BaseModel):
    model_config = _example(
        id="42",
        inputs=[{"name": "image", "shape": [1, 3, 2, 2], "datatype": "FP32", "data": [0.5] * 12}],
        outputs=[{"name": "probs"}, {"name": "msp"}],
    )

    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None,
        description="`binary_data_output`: every output as binary data; `operating_point`: which calibrated "
        "operating point decides `accept` (default: the bundle's).",
    )
    inputs: list[V2RequestInput] = Field(min_length=1)
    outputs: list[V2RequestOutput] | None = Field(None, description="Outputs to return (default: every graph output).")


class V2ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = Field(None, description="`binary_data_size` when the data follows as binary.")
    data: list[bool | int | float] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2ResponseOutput]
