"""Reading, hashing, verifying and scoring with a bundle — numpy + onnxruntime only, no torch.

`verify_bundle` is the one gate every bundle passes before it is served: the CLI's
`oodguard bundle verify`, the registry's hot-swap validation and training's export all call it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write_text
from .errors import OodguardError
from .manifest import (
    GOLDEN_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    BundleManifest,
    load_manifest,
)
from .onnx_scan import OnnxScanError, scan_onnx

GOLDEN_ATOL = 1e-4
# Only the standard ONNX operator domains: a bundle can never make us load a custom-op library.
_ALLOWED_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}


class BundleError(OodguardError, ValueError):
    """A bundle failed a check: `check` names which one (schema, hash, onnx, golden, ...), `reason` says why.

    An `OodguardError` of kind `invalid_input`, code `bundle_invalid`, whose message is
    "<check>: <reason>" and whose JSON error carries `check`.
    """

    def __init__(self, check: str, reason: str):
        super().__init__("invalid_input", "bundle_invalid", f"{check}: {reason}", check=check)
        self.check = check
        self.reason = reason


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def bundle_files(bundle_dir: str | Path) -> dict[str, str]:
    """sha256 of every regular file in the bundle except the manifest, keyed by posix relative path."""
    root = Path(bundle_dir)
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            raise BundleError("files", f"{p.relative_to(root)} is a symbolic link; bundles hold regular files only")
        if p.is_file() and not (p.parent == root and p.name == MANIFEST_FILE):
            out[p.relative_to(root).as_posix()] = sha256_file(p)
    return out


def write_manifest(bundle_dir: str | Path, manifest: BundleManifest) -> BundleManifest:
    """Hash every file, then write manifest.json atomically (temp file + rename). Returns the final manifest."""
    root = Path(bundle_dir)
    final = manifest.model_copy(update={"files": bundle_files(root)})
    final = BundleManifest.model_validate(final.model_dump())  # re-run validators on the final object
    final = final.model_copy(update={"content_sha256": final.compute_content_sha256()})
    atomic_write_text(root / MANIFEST_FILE, final.to_json())
    return final


def manifest_sha256(bundle_dir: str | Path) -> str:
    """The bundle's identity: sha256 of its manifest, which itself pins every other file's sha256."""
    return sha256_file(Path(bundle_dir) / MANIFEST_FILE)


# -- scoring helpers the service and calibration share ----------------------------------------------


def conformal_p_values(calibration_sorted: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """p(x) = (1 + #{cal <= s(x)}) / (n + 1), scores higher = more in-distribution.

    In-distribution p-values are ~uniform on (0, 1]; OOD inputs (low scores) get small p-values.
    """
    cal = np.asarray(calibration_sorted, dtype=np.float64)
    counts = np.searchsorted(cal, np.asarray(scores, dtype=np.float64), side="right")
    return (1.0 + counts) / (cal.size + 1.0)


def load_calibration(bundle_dir: str | Path, manifest: BundleManifest) -> np.ndarray:
    return _load_scores(Path(bundle_dir) / manifest.calibration.file, manifest.calibration.size)


def load_form_calibration(bundle_dir: str | Path, manifest: BundleManifest) -> dict[str, np.ndarray] | None:
    """Each upload-form group's sorted calibration scores (form-conditional bundles), else None."""
    forms = manifest.calibration.forms
    if forms is None:
        return None
    return {group: _load_scores(Path(bundle_dir) / f.file, f.size) for group, f in forms.items()}


def _load_scores(path: Path, size: int) -> np.ndarray:
    try:
        cal = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise BundleError("calibration", f"{path.name} is not a readable .npy array ({exc})") from None
    if cal.ndim != 1 or cal.size != size or not np.all(np.isfinite(cal)):
        raise BundleError("calibration", f"{path.name} must be a finite 1-D array of {size} scores, got shape {cal.shape}")
    if np.any(np.diff(cal) < 0):
        raise BundleError("calibration", f"{path.name} is not sorted ascending")
    return cal.astype(np.float32, copy=False)


# -- onnxruntime ----------------------------------------------------------------------------------


def make_session(model_path: str | Path, intra_op_threads: int = 1, providers: list[str] | None = None):
    """An onnxruntime session with explicit thread counts (threads x processes <= cores)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(0, int(intra_op_threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if providers is None:
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)


def _check_onnx_domains(model_path: Path) -> None:
    """Refuse graphs that need operators from outside onnxruntime (custom-op domains) or external data.

    Read with `onnx_scan` (a protobuf walk, no `onnx` package): the check is the same in the
    serve-only install, and it reaches nested subgraphs and model-local functions. A domain the
    model defines itself (a local function: a composite of other ops) is not a custom op.
    """
    try:
        scan = scan_onnx(model_path.read_bytes())
    except OnnxScanError as exc:
        raise BundleError("onnx", f"{MODEL_FILE} is not a valid ONNX file ({exc})") from None
    allowed = _ALLOWED_DOMAINS | scan.function_domains
    bad = sorted(d for d in scan.opset_domains | scan.node_domains if d not in allowed)
    if bad:
        raise BundleError("onnx", f"{MODEL_FILE} uses non-standard operator domains {bad}; custom ops are not allowed")
    if scan.external_tensors:
        raise BundleError(
            "onnx",
            f"{MODEL_FILE} references external data files (tensors {scan.external_tensors[:5]}); "
            "bundles must be self-contained",
        )


@dataclass
class VerifyReport:
    bundle: Path
    manifest: BundleManifest
    sha256: str
    checks: list[str] = field(default_factory=list)
    golden_max_abs_diff: dict[str, float] = field(default_factory=dict)
    # The onnxruntime session the checks ran on and the calibration scores they read, so a caller
    # serves exactly what was verified without loading it again.
    session: Any = field(default=None, repr=False)
    calibration: np.ndarray | None = field(default=None, repr=False)
    form_calibration: dict[str, np.ndarray] | None = field(default=None, repr=False)


def verify_bundle(bundle_dir: str | Path, intra_op_threads: int = 1, session=None) -> VerifyReport:
    """Every check a bundle must pass before it is served. Raises BundleError naming the failed check.

    Order: schema -> files/hashes -> calibration -> ONNX loads with the declared contract -> golden outputs.
    Pass an existing `session` to reuse it (the registry warms the session it validated).
    """
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError("path", f"{root} is not a directory")
    try:
        manifest = load_manifest(root)
    except ValueError as exc:
        raise BundleError("schema", str(exc)) from None
    report = VerifyReport(bundle=root, manifest=manifest, sha256=manifest_sha256(root))
    report.checks.append("schema")

    form_files = [f.file for f in (manifest.calibration.forms or {}).values()]
    for required in (MODEL_FILE, manifest.calibration.file, GOLDEN_FILE, *form_files):
        if required not in manifest.files:
            raise BundleError("files", f"manifest does not list required file {required}")
    actual = bundle_files(root)
    missing = sorted(set(manifest.files) - set(actual))
    if missing:
        raise BundleError("files", f"missing file(s) listed in the manifest: {', '.join(missing)}")
    extra = sorted(set(actual) - set(manifest.files))
    if extra:
        raise BundleError("files", f"file(s) not listed in the manifest: {', '.join(extra)}")
    for rel, digest in manifest.files.items():
        if actual[rel] != digest:
            raise BundleError("hash", f"sha256 mismatch for {rel}: manifest {digest[:12]}…, file {actual[rel][:12]}…")
    # after the per-file hashes, so a tampered pin is reported as the file it no longer matches
    if manifest.content_sha256 is None:
        raise BundleError("hash", f"{MANIFEST_FILE} has no content_sha256 (it was not written by write_manifest)")
    if manifest.compute_content_sha256() != manifest.content_sha256:
        raise BundleError("hash", f"{MANIFEST_FILE} was edited after it was written: its content no longer "
                                  "matches its content_sha256")
    report.checks.append("hashes")

    report.calibration = load_calibration(root, manifest)
    report.form_calibration = load_form_calibration(root, manifest)
    report.checks.append("calibration")

    _check_onnx_domains(root / MODEL_FILE)
    if session is None:
        try:
            session = make_session(root / MODEL_FILE, intra_op_threads=intra_op_threads)
        except Exception as exc:
            raise BundleError("onnx", f"onnxruntime cannot load {MODEL_FILE}: {exc}") from None
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != manifest.input.name:
        raise BundleError("contract", f"graph inputs {[i.name for i in inputs]} != [{manifest.input.name!r}]")
    shape = inputs[0].shape
    expected = [manifest.input.channels, manifest.input.height, manifest.input.width]
    if len(shape) != 4 or [int(s) if isinstance(s, int) else s for s in shape[1:]] != expected:
        raise BundleError("contract", f"graph input shape {shape} does not match N x {expected}")
    graph_outputs = [o.name for o in session.get_outputs()]
    if sorted(graph_outputs) != sorted(manifest.outputs):
        raise BundleError("contract", f"graph outputs {graph_outputs} != manifest outputs {manifest.outputs}")
    report.checks.append("onnx")
    report.session = session

    try:
        with np.load(root / GOLDEN_FILE, allow_pickle=False) as golden:
            golden_arrays = {k: golden[k] for k in golden.files}
    except Exception as exc:
        raise BundleError("golden", f"{GOLDEN_FILE} is not a readable .npz ({exc})") from None
    if manifest.input.name not in golden_arrays:
        raise BundleError("golden", f"{GOLDEN_FILE} has no {manifest.input.name!r} input array")
    try:
        got = session.run(None, {manifest.input.name: golden_arrays[manifest.input.name].astype(np.float32)})
    except Exception as exc:
        raise BundleError("golden", f"onnxruntime failed on the golden inputs: {exc}") from None
    for name, value in zip(graph_outputs, got):
        if name not in golden_arrays:
            raise BundleError("golden", f"{GOLDEN_FILE} has no expected values for output {name!r}")
        exp = golden_arrays[name]
        if exp.shape != value.shape:
            raise BundleError("golden", f"output {name!r} shape {value.shape} != golden {exp.shape}")
        diff = float(np.max(np.abs(value.astype(np.float64) - exp.astype(np.float64)))) if exp.size else 0.0
        report.golden_max_abs_diff[name] = diff
        if not diff <= GOLDEN_ATOL:  # also catches NaN
            raise BundleError("golden", f"output {name!r} differs from golden by {diff:.3g} (> {GOLDEN_ATOL})")
    report.checks.append("golden")
    return report


def bundle_summary(manifest: BundleManifest, sha256: str | None = None) -> dict:
    """A short JSON-able description (CLI `bundle info`, `/v1/models`)."""
    return {
        "name": manifest.name,
        "version": manifest.version,
        "sha256": sha256,
        "created_at": manifest.created_at.isoformat(),
        "classes": manifest.classes,
        "input": manifest.input.model_dump(mode="json"),
        "score": manifest.score.model_dump(mode="json"),
        "operating_points": [op.model_dump(mode="json") for op in manifest.operating_points],
        "default_operating_point": manifest.default_operating_point,
        "calibration_size": manifest.calibration.size,
        "metrics": manifest.metrics,
        "method": manifest.training.get("method"),
        "model": manifest.training.get("model"),
    }


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, default=str)
