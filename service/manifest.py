"""The bundle contract: what a model bundle contains and promises.

Defined once, here in the service package; training imports it to *write* bundles, the service
uses it to *read* them. Imports only go that way (this module must never import training or torch).

A bundle is a directory::

    model.onnx        input `image` float32 NCHW in [0,1], dynamic batch; outputs `logits`, `probs`
                      and one output per exported score (higher = more in-distribution)
    manifest.json     `BundleManifest` below
    calibration.npy   float32, sorted ascending: the served score on held-out in-distribution images
                      (uploaded in a mix of forms)
    calibration_<group>.npy  the same per upload-form group, when the bundle is form-conditional
                      (`calibration.forms`, service/upload_form.py)
    golden.npz        `image` plus one array per ONNX output: expected outputs on a few inputs
    report/           eval.md, eval.json, plots (optional, hashed like every other file)

JSON and npy/npz only: nothing in a bundle is ever unpickled or executed.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .upload_form import FORM_RULE_V1, FORM_RULES, V1_GROUPS, FormGroups

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
CALIBRATION_FILE = "calibration.npy"
GOLDEN_FILE = "golden.npz"
INPUT_NAME = "image"

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # bundle names and versions (directory names)


class _Strict(BaseModel):
    # Unknown keys are an error: a typo in a manifest must not silently change behaviour.
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """How raw images become the `image` tensor. The service follows this exactly."""

    name: str = INPUT_NAME
    height: int = Field(32, ge=1, le=4096)
    width: int = Field(32, ge=1, le=4096)
    channels: Literal[3] = 3
    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["float32"] = "float32"
    color: Literal["RGB"] = "RGB"
    value_range: tuple[float, float] = (0.0, 1.0)
    # Pillow resampling filter applied to the whole image (no crop) when its size differs; "area" = box along
    # an axis that shrinks, bilinear along one that grows (preprocess.resize_image). The default stays
    # "bilinear", what bundles made before "area" existed were calibrated with; new bundles write "area".
    resize: Literal["area", "bilinear", "bicubic", "box", "nearest", "lanczos"] = "bilinear"
    # Normalisation (mean/std) lives inside the graph; recorded here for documentation only.
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


class ScoreSpec(_Strict):
    """The OOD score the service thresholds. Convention everywhere: higher = more in-distribution."""

    name: str  # e.g. "msp", "energy", "mahalanobis"
    output: str  # the ONNX output that carries it
    direction: Literal["higher_is_in_distribution"] = "higher_is_in_distribution"
    params: dict[str, float] = Field(default_factory=dict)  # e.g. {"temperature": 1.0}


class OperatingPoint(_Strict):
    """Accept iff score >= threshold. Calibrated so that `target_tpr` of in-distribution passes."""

    name: str  # e.g. "tpr95"
    target_tpr: float = Field(gt=0.0, lt=1.0)
    threshold: float
    realised_tpr: float | None = None  # on the in-distribution test split
    fpr: dict[str, float] = Field(default_factory=dict)  # OOD set (and "set/attacked") -> FPR
    # Class-conditional point (`oodguard calibrate --per-class`): accept iff score >= class_thresholds[c]
    # for the predicted class c (argmax of probs); `threshold` is then the global one, for reference.
    class_thresholds: list[float] | None = None
    class_calibration_size: list[int] | None = None  # calibration images predicted as each class
    class_realised_tpr: list[float | None] | None = None  # per predicted class, test split (None: no image)
    # Form-conditional point (bundles with `calibration.forms`): accept iff score >= form_thresholds[g] for
    # the upload's form group g (service/upload_form.py); `threshold` is then the mixed-form one, for reference.
    form_thresholds: dict[str, float] | None = None


class FormCalibration(_Strict):
    """One upload-form group's calibration: the calibration split uploaded in that group's forms, scored."""

    file: str  # sorted float32 .npy, like calibration.npy
    size: int = Field(ge=1)
    rendering: str = ""  # how each calibration image was uploaded for this group

    @field_validator("file")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not re.fullmatch(r"calibration_[a-z0-9_]+\.npy", v):
            raise ValueError(f"form calibration file {v!r} must be named calibration_<group>.npy, at the bundle's top level")
        return v


class CalibrationInfo(_Strict):
    file: str = CALIBRATION_FILE  # the calibration split uploaded in a mix of forms
    size: int = Field(ge=1)
    split: str = "held-out calibration split of the training set"
    seed: int | None = None
    # Form-conditional (Mondrian) calibration: one calibration per upload-form group, under `form_rule`
    # (upload_form.FORM_RULES); then thresholds and p-values are the image's own group's.
    form_rule: str | None = None
    forms: dict[str, FormCalibration] | None = None


class Lineage(_Strict):
    datasets: dict[str, str] = Field(default_factory=dict)  # dataset file name -> sha256
    code_version: str | None = None  # git commit of the code that built the bundle
    run_dir: str | None = None
    checkpoint_sha256: str | None = None
    parent: str | None = None  # "name:version" this bundle was retrained from, if any


class BundleManifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    name: str
    version: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    description: str = ""
    classes: list[str] = Field(min_length=2)
    input: InputSpec = Field(default_factory=InputSpec)
    outputs: list[str]  # ONNX output names, in graph order
    score: ScoreSpec
    operating_points: list[OperatingPoint] = Field(min_length=1)
    default_operating_point: str
    calibration: CalibrationInfo
    metrics: dict[str, Any] = Field(default_factory=dict)  # evaluation results (clean / attacked)
    training: dict[str, Any] = Field(default_factory=dict)  # resolved training config, method, model
    lineage: Lineage = Field(default_factory=Lineage)
    files: dict[str, str] = Field(default_factory=dict)  # relative path -> sha256, every file but manifest.json
    # sha256 of this manifest's own content (canonical JSON of every other field), set by
    # `bundle.write_manifest`: `verify_bundle` refuses a manifest edited after it was written.
    content_sha256: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _finite_numbers(cls, raw: Any) -> Any:
        # A NaN threshold rejects everything (and reads as `null` in JSON answers); NaN or inf in
        # metrics cannot be answered as JSON at all. Refused anywhere in the manifest.
        where = _first_non_finite(raw)
        if where is not None:
            raise ValueError(f"non-finite number (NaN or infinity) at {where or 'top level'}; manifests hold finite numbers only")
        return raw

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"unsupported schema_version {v}; this oodguard reads schema_version {SCHEMA_VERSION}")
        return v

    @field_validator("name", "version")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        # Names become directory names (<models_dir>/<name>/<version>): no separators, no "..".
        if not NAME_RE.match(v) or ".." in v:
            raise ValueError(f"{v!r} must match {NAME_RE.pattern} and must not contain '..'")
        return v

    @field_validator("files")
    @classmethod
    def _safe_paths(cls, v: dict[str, str]) -> dict[str, str]:
        for rel, digest in v.items():
            p = Path(rel)
            if p.is_absolute() or ".." in p.parts or rel.startswith(("/", "\\")):
                raise ValueError(f"file path {rel!r} must be relative and inside the bundle")
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"sha256 for {rel!r} is not 64 hex characters")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "BundleManifest":
        names = [op.name for op in self.operating_points]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate operating point names: {names}")
        if self.default_operating_point not in names:
            raise ValueError(f"default_operating_point {self.default_operating_point!r} is not one of {names}")
        for op in self.operating_points:
            for key in _CLASS_FIELDS:
                values = getattr(op, key)
                if values is not None and len(values) != len(self.classes):
                    raise ValueError(f"operating point {op.name!r}: {key} has {len(values)} entries for {len(self.classes)} classes")
        self._check_forms()
        if self.score.output not in self.outputs:
            raise ValueError(f"score output {self.score.output!r} is not one of the outputs {self.outputs}")
        for required in ("logits", "probs"):
            if required not in self.outputs:
                raise ValueError(f"outputs must include {required!r}")
        return self

    def _check_forms(self) -> None:
        """Form groups are all or nothing: the groups of a known rule (upload_form.py), and a threshold for each
        on every point that is not class-conditional; a bundle calibrated under another rule is refused."""
        forms = self.calibration.forms
        if forms is None:
            if self.calibration.form_rule is not None:
                raise ValueError("calibration.form_rule is set but calibration.forms is not")
            for op in self.operating_points:
                if op.form_thresholds is not None:
                    raise ValueError(f"operating point {op.name!r} has form_thresholds but the calibration has no forms")
            return
        rule = self.calibration.form_rule
        if rule not in FORM_RULES:
            raise ValueError(f"calibration.form_rule {rule!r} is not a rule this oodguard reads ({', '.join(FORM_RULES)}): "
                             "its form groups would not mean the same")
        groups = FormGroups.from_names(forms)
        if rule == FORM_RULE_V1 and groups != V1_GROUPS:
            raise ValueError(f"calibration.forms must have exactly the groups {list(V1_GROUPS.names)} under {rule}, "
                             f"got {sorted(forms)}")
        if rule != FORM_RULE_V1 and not groups.covers_every_quality():
            raise ValueError(f"calibration.forms: under {rule} the JPEG quality bands must cover every quality 1-100, "
                             f"got {sorted(forms)}")
        files = [f.file for f in forms.values()]
        if len(set(files)) != len(files) or CALIBRATION_FILE in files:
            raise ValueError("calibration.forms: every group needs its own file, not calibration.npy")
        for op in self.operating_points:
            if op.class_thresholds is not None:
                if op.form_thresholds is not None:
                    raise ValueError(f"operating point {op.name!r}: class_thresholds and form_thresholds are exclusive")
            elif op.form_thresholds is None or set(op.form_thresholds) != set(forms):
                raise ValueError(f"operating point {op.name!r}: form_thresholds must have exactly the groups {sorted(forms)}")

    # -- helpers ------------------------------------------------------------------------------
    @property
    def form_groups(self) -> FormGroups | None:
        """The upload-form groups of a form-conditional bundle (upload_form.py), else None."""
        forms = self.calibration.forms
        return None if forms is None else FormGroups.from_names(forms)

    def operating_point(self, name: str | None = None) -> OperatingPoint:
        name = name or self.default_operating_point
        for op in self.operating_points:
            if op.name == name:
                return op
        raise KeyError(name)

    @property
    def contract(self) -> dict[str, Any]:
        """What a client depends on; a hot-swap that changes it needs explicit consent."""
        return {
            "classes": list(self.classes),
            "input": self.input.model_dump(mode="json"),
            "outputs": sorted(self.outputs),
            "score": {"name": self.score.name, "output": self.score.output},
        }

    def compute_content_sha256(self) -> str:
        """sha256 of the canonical JSON (sorted keys, no whitespace) of every field but `content_sha256`."""
        payload = _without_unset_class_fields(self.model_dump(mode="json", exclude={"content_sha256"}))
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()

    def to_json(self) -> str:
        return json.dumps(_without_unset_class_fields(self.model_dump(mode="json")), indent=2, sort_keys=False) + "\n"


_CLASS_FIELDS = ("class_thresholds", "class_calibration_size", "class_realised_tpr")


def _without_unset_class_fields(payload: dict[str, Any]) -> dict[str, Any]:
    """Drop the optional per-class and per-form fields where unset, so bundles written before they existed
    keep their hash."""
    for op in payload.get("operating_points", []):
        for key in (*_CLASS_FIELDS, "form_thresholds"):
            if op.get(key) is None:
                op.pop(key, None)
    calibration = payload.get("calibration") or {}
    for key in ("form_rule", "forms"):
        if calibration.get(key) is None:
            calibration.pop(key, None)
    return payload


def _first_non_finite(value: Any, path: str = "") -> str | None:
    """The dotted path of the first NaN / infinite float in a JSON-like value, or None. Iterative: any depth."""
    stack = [(path, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return where
        if isinstance(item, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in item.items())
        elif isinstance(item, (list, tuple)):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(item))
        elif isinstance(item, BaseModel):
            stack.extend((f"{where}.{k}" if where else k, v) for k, v in item.__dict__.items())
    return None


def load_manifest(bundle_dir: str | Path) -> BundleManifest:
    """Parse `manifest.json` of a bundle. Raises ValueError with a readable message on any problem."""
    path = Path(bundle_dir) / MANIFEST_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: missing manifest.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: manifest is not readable JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: manifest must be a JSON object")
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: unsupported schema_version {raw.get('schema_version')!r} "
            f"(this oodguard reads schema_version {SCHEMA_VERSION})"
        )
    try:
        return BundleManifest.model_validate(raw)
    except Exception as exc:  # pydantic.ValidationError: keep the message, drop the traceback
        raise ValueError(f"{path}: invalid manifest: {exc}") from None
