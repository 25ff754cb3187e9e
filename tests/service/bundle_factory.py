"""Tiny, valid model bundles for service tests — built with `onnx.helper`, no torch.

`tests/` and `tests/service/` are packages (so test file names may repeat across halves); import
from any test under `tests/service/` with::

    from .bundle_factory import make_tiny_bundle, encode_image

The model is a colour classifier small enough to reason about by hand:

    image [N,3,H,W] -> GlobalAveragePool -> Flatten -> MatMul(W) + b -> logits [N,K]
    probs  = Softmax(logits)
    msp    = ReduceMax(probs)            [N]   (higher = more in-distribution)
    energy = ReduceLogSumExp(logits)     [N]   (T = 1)

With the default three classes ("red", "green", "blue") W = `logit_scale` * identity, so a saturated
red image is confidently "red" (high msp -> accept) and a grey image gives uniform probabilities
(msp = 1/3 -> reject). Thresholds are quantiles of the calibration scores, as calibration does.

`poison=True` adds a branch that makes onnxruntime *raise* for any batch containing an all-white
image (every pixel 1.0) while leaving every output unchanged otherwise: a real runtime failure for
fault-injection tests (a failing batch must fail only its own requests).

`make_endless_bundle` adds `0 x Loop(M = 2^62)` to `logits`: a valid bundle whose graph never ends
(always, or only for a batch holding an all-white image) - for the validation time limit and the
inference run watchdog.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from oodguard.service.bundle import make_session, write_manifest
from oodguard.service.upload_form import FORM_RULE, FORM_RULE_V1, V1_GROUPS, FormGroups
from oodguard.service.manifest import (
    CALIBRATION_FILE,
    GOLDEN_FILE,
    MODEL_FILE,
    BundleManifest,
    CalibrationInfo,
    FormCalibration,
    InputSpec,
    OperatingPoint,
    ScoreSpec,
)

DEFAULT_CLASSES = ("red", "green", "blue")
DEFAULT_TPRS = {"tpr90": 0.90, "tpr95": 0.95, "tpr99": 0.99}
OPSET = 17


def build_tiny_onnx(
    num_classes: int = 3,
    height: int = 8,
    width: int = 8,
    logit_scale: float = 10.0,
    seed: int = 0,
    poison: bool = False,
) -> onnx.ModelProto:
    """The ONNX graph described in the module docstring. Outputs: logits, probs, msp, energy."""
    if num_classes == 3:
        weight = np.eye(3, dtype=np.float32) * logit_scale
    else:
        weight = np.random.default_rng(seed).normal(0.0, logit_scale, size=(3, num_classes)).astype(np.float32)
    bias = np.zeros(num_classes, dtype=np.float32)
    inits = [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")]
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["mm"]),
    ]
    logits_src = "mm_b"
    nodes.append(helper.make_node("Add", ["mm", "b"], [logits_src]))
    if poison:
        # flag = 1 iff some image has mean >= 0.9995 (all white); Reshape of a 1-element tensor to
        # shape [1 + flag] then fails at run time. Its (zero) contribution keeps the branch alive.
        inits += [
            numpy_helper.from_array(np.array([0.0005], np.float32), "eps"),
            numpy_helper.from_array(np.array([1], np.int64), "one_i"),
            numpy_helper.from_array(np.array([1.0], np.float32), "one_f"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero_f"),
        ]
        nodes += [
            helper.make_node("ReduceMean", ["flat"], ["img_mean"], axes=[1], keepdims=0),
            helper.make_node("ReduceMax", ["img_mean"], ["batch_max"], axes=[0], keepdims=1),
            helper.make_node("Add", ["batch_max", "eps"], ["shifted"]),
            helper.make_node("Floor", ["shifted"], ["flag_f"]),
            helper.make_node("Cast", ["flag_f"], ["flag_i"], to=TensorProto.INT64),
            helper.make_node("Add", ["flag_i", "one_i"], ["bad_shape"]),
            helper.make_node("Reshape", ["one_f", "bad_shape"], ["reshaped"]),
            helper.make_node("ReduceSum", ["reshaped"], ["poison_sum"], keepdims=0),
            helper.make_node("Mul", ["poison_sum", "zero_f"], ["poison_zero"]),
            helper.make_node("Add", [logits_src, "poison_zero"], ["logits_p"]),
        ]
        logits_src = "logits_p"
    nodes += [
        helper.make_node("Identity", [logits_src], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        helper.make_node("ReduceMax", ["probs"], ["msp"], axes=[1], keepdims=0),
        helper.make_node("ReduceLogSumExp", ["logits"], ["energy"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "oodguard_tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, height, width])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", num_classes]),
            helper.make_tensor_value_info("msp", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("energy", TensorProto.FLOAT, ["N"]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="oodguard-tests")
    model.ir_version = 8  # readable by every onnxruntime >= 1.14
    onnx.checker.check_model(model)
    return model


def _in_distribution_images(rng: np.random.Generator, n: int, num_classes: int, h: int, w: int) -> np.ndarray:
    """Images with one dominant channel: what the colour classifier calls in-distribution."""
    imgs = rng.uniform(0.0, 0.3, size=(n, 3, h, w)).astype(np.float32)
    dominant = rng.integers(0, 3, size=n)
    imgs[np.arange(n), dominant] = rng.uniform(0.6, 1.0, size=(n, h, w)).astype(np.float32)
    return imgs


def make_tiny_bundle(
    bundle_dir: str | Path,
    name: str = "tiny",
    version: str = "1",
    *,
    classes: Sequence[str] = DEFAULT_CLASSES,
    height: int = 8,
    width: int = 8,
    score: str = "msp",
    resize: str = "bilinear",
    logit_scale: float = 10.0,
    tprs: dict[str, float] | None = None,
    default_operating_point: str = "tpr95",
    calibration_size: int = 200,
    golden_size: int = 4,
    poison: bool = False,
    seed: int = 0,
    description: str = "tiny colour classifier for tests",
    metrics: dict | None = None,
    form_calibration: dict[str, np.ndarray] | None = None,
    form_rule: str | None = None,
) -> Path:
    """Write a complete bundle (model.onnx, calibration.npy, golden.npz, manifest.json) and return its dir.

    It passes `oodguard.service.bundle.verify_bundle`. Different `version`s (or `logit_scale`s) give
    different manifest sha256s; `logit_scale` also changes the model's outputs. `form_calibration`
    ({group: scores} for every group of a rule: upload_form.DEFAULT_GROUPS, or V1_GROUPS) makes it
    form-conditional: each point then has one threshold per group, the same quantile of that group's scores.
    `form_rule`: default, the v1 rule for v1's groups and the current rule for any other.
    """
    if score not in ("msp", "energy"):
        raise ValueError(f"score must be 'msp' or 'energy', got {score!r}")
    root = Path(bundle_dir)
    root.mkdir(parents=True, exist_ok=True)
    model = build_tiny_onnx(len(classes), height, width, logit_scale, seed, poison)
    onnx.save(model, str(root / MODEL_FILE))

    rng = np.random.default_rng(seed)
    session = make_session(root / MODEL_FILE, intra_op_threads=1, providers=["CPUExecutionProvider"])
    output_names = [o.name for o in session.get_outputs()]

    cal_images = _in_distribution_images(rng, calibration_size, len(classes), height, width)
    cal_scores = session.run([score], {"image": cal_images})[0]
    calibration = np.sort(cal_scores.astype(np.float32))
    np.save(root / CALIBRATION_FILE, calibration, allow_pickle=False)

    golden_images = rng.uniform(0.0, 0.99, size=(golden_size, 3, height, width)).astype(np.float32)
    golden_outputs = session.run(None, {"image": golden_images})
    np.savez(root / GOLDEN_FILE, image=golden_images, **dict(zip(output_names, golden_outputs)))

    tprs = dict(DEFAULT_TPRS if tprs is None else tprs)
    # Accept iff score >= threshold: the (1 - tpr) quantile keeps >= tpr of calibration scores.
    points = [
        OperatingPoint(
            name=op_name,
            target_tpr=tpr,
            threshold=float(np.quantile(calibration, 1.0 - tpr, method="lower")),
            realised_tpr=float(np.mean(calibration >= np.quantile(calibration, 1.0 - tpr, method="lower"))),
        )
        for op_name, tpr in tprs.items()
    ]
    forms = None
    if form_calibration is not None:
        forms = {}
        for group, scores in form_calibration.items():
            forms[group] = FormCalibration(file=f"calibration_{group}.npy", size=len(scores), rendering="test")
            np.save(root / forms[group].file, np.sort(np.asarray(scores, dtype=np.float32)), allow_pickle=False)
        points = [op.model_copy(update={"form_thresholds": {
            g: float(np.quantile(np.sort(np.asarray(v, dtype=np.float32)), 1.0 - op.target_tpr, method="lower"))
            for g, v in form_calibration.items()}}) for op in points]
    manifest = BundleManifest(
        name=name,
        version=version,
        description=description,
        classes=list(classes),
        input=InputSpec(height=height, width=width, resize=resize),
        outputs=output_names,
        score=ScoreSpec(name=score, output=score, params={"temperature": 1.0} if score == "energy" else {}),
        operating_points=points,
        default_operating_point=default_operating_point,
        calibration=CalibrationInfo(size=calibration_size, seed=seed, forms=forms,
                                    form_rule=None if forms is None else form_rule or (
                                        FORM_RULE_V1 if FormGroups.from_names(forms) == V1_GROUPS else FORM_RULE)),
        metrics=metrics if metrics is not None else {"clean": {"auroc": 0.99}, "attacked": {"auroc": 0.9}},
        training={"method": "synthetic", "model": "tiny-colour"},
    )
    write_manifest(root, manifest)
    return root


def encode_image(
    color: tuple[int, ...] = (255, 0, 0),
    size: tuple[int, int] = (8, 8),
    fmt: str = "PNG",
    mode: str = "RGB",
    **save_kwargs,
) -> bytes:
    """A solid-colour image encoded in `fmt` (PNG, JPEG, GIF, WEBP, ...), for request bodies."""
    from PIL import Image

    img = Image.new(mode, size, color)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


def make_endless_bundle(root: Path, version: str = "9", on_white_only: bool = False) -> Path:
    """A valid tiny bundle whose `logits` also add 0 x Loop(M = 2^62): correct values, never computed.

    The golden outputs are the tiny model's (0 x anything finite is 0): only the time is wrong.
    `on_white_only`: M = 2^62 only when some image of the batch is all white, else 0 - it verifies
    and warms up in no time, and loops on the input that triggers it.
    """
    from oodguard.service.manifest import load_manifest

    bundle = make_tiny_bundle(root, "tiny", version)
    model = build_tiny_onnx()
    graph = model.graph
    out = next(n for n in graph.node if n.op_type == "Identity" and list(n.output) == ["logits"])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["v_in", "step"], ["v_out"])],
        "spin",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [])],
        initializer=[numpy_helper.from_array(np.array(1.0, np.float32), "step")],
    )
    graph.initializer.extend([
        numpy_helper.from_array(np.array(2**62, np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "keep_going"),
        numpy_helper.from_array(np.array(0.0, np.float32), "v0"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ])
    trips = "trips"
    if on_white_only:  # trips = 2^62 * floor(max over images of the image mean + 0.0005)
        graph.initializer.append(numpy_helper.from_array(np.array([0.0005], np.float32), "eps_w"))
        graph.node.extend([
            helper.make_node("ReduceMean", ["image"], ["img_mean_w"], axes=[1, 2, 3], keepdims=0),
            helper.make_node("ReduceMax", ["img_mean_w"], ["max_w"], keepdims=0),
            helper.make_node("Add", ["max_w", "eps_w"], ["shift_w"]),
            helper.make_node("Floor", ["shift_w"], ["flag_w"]),
            helper.make_node("Cast", ["flag_w"], ["flag_wi"], to=TensorProto.INT64),
            helper.make_node("Mul", ["flag_wi", "trips"], ["trips_w"]),
            helper.make_node("ReduceMax", ["trips_w"], ["trips_s"], keepdims=0),
        ])
        trips = "trips_s"
    graph.node.extend([
        helper.make_node("Loop", [trips, "keep_going", "v0"], ["spun"], body=body),
        helper.make_node("Mul", ["spun", "zero"], ["nothing"]),
        helper.make_node("Add", [out.input[0], "nothing"], ["logits_spun"]),
    ])
    out.input[0] = "logits_spun"
    (bundle / MODEL_FILE).write_bytes(model.SerializeToString())
    write_manifest(bundle, load_manifest(bundle))
    return bundle
