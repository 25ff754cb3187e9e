"""`oodguard calibrate`: thresholds and conformal p-values from the SERVED artefact, then the bundle.

Calibration runs the exported ONNX graph with onnxruntime (exactly what the service will run) on the
run's held-out calibration split (split.json: images carved out of the training file before
training; never the test set, never a training image). Each calibration image is first uploaded in one
of several forms (`--calibration-forms`: stored JPEG, PNG, JPEG q50 / q95, upscaled x3, non-square; equal
shares, seeded) and decoded as the service does, so the thresholds hold for the forms users send, not
only for the dataset's own 32x32 JPEGs; the realised TPR per form is recorded in the manifest.

Form-conditional calibration (on by default, `--no-form-calibration` to turn it off): one mix cannot hold
every form at once (the served score accepts a JPEG of quality 50 less often, an upscaled upload more often,
than the stored JPEG), so the split is also uploaded in each upload-form group's forms (service/upload_form.py:
`native`, JPEG quality bands (`--jpeg-bands`), `smaller`, `larger`; shifts.group_rendering) and scored: one sorted calibration per
group (`calibration_<group>.npy`) and one threshold per group and target (`form_thresholds`). This is
group-conditional ("Mondrian") split conformal: the guarantee below holds within each group. The service
reads an upload's group from its header and applies that group's threshold and p-values.

`--score auto` chooses the served score among the graph's score outputs on validation data (the
calibration split vs the outlier classes held out of training), clean and under the `paper` attack:
see `score_selection`.

Threshold rule (accept iff score >= threshold; scores higher = more in-distribution). With the n
calibration scores sorted ascending s_(1) <= ... <= s_(n) and a target TPR tau:

    k = floor((1 - tau) * (n + 1))          (the number of calibration scores allowed below it, + 1)
    threshold = s_(k)                        (the k-th smallest; needs k >= 1, i.e. n >= 1/(1-tau) - 1)

Equivalently: accept iff the conformal p-value p(x) = (1 + #{cal <= s(x)}) / (n + 1) is > 1 - tau.
For a new in-distribution input exchangeable with the calibration images this gives
P(accept) >= tau (split-conformal guarantee; at most tau + 1/(n+1) without ties), and at least
tau of the calibration scores themselves pass.

Validation: realised TPR on the in-distribution test split and FPR on each OOD set, clean (scored by
onnxruntime here), and attacked when the run's evaluation (eval/scores.npz) holds attacked scores for
this score — those are the torch scores of the evaluation's PGD inputs (the ONNX graph matches torch
to 1e-4), at the thresholds calibrated here. Keys of `fpr`: "<set>" (clean), "<set>/<attack>".
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from oodguard.service.bundle import conformal_p_values, make_session, sha256_file
from oodguard.service.manifest import (
    BundleManifest,
    CalibrationInfo,
    FormCalibration,
    InputSpec,
    Lineage,
    OperatingPoint,
    ScoreSpec,
)
from oodguard.service.preprocess import TRAINING_RESIZE
from oodguard.service.upload_form import DEFAULT_JPEG_BANDS, FORM_RULE, FormGroups

from . import data
from .evaluate import ATTACK_PROTOCOLS, CALIBRATION_FORMS, DEFAULT_SHIFTS, EVAL_DIR, git_commit, load_eval, set_key
from .export import EXPORT_DIR, EXPORT_JSON, ONNX_FILE, read_export_info, run_onnx
from .ood_sets import load_ood_set, subsample
from .package import BuiltBundle, build_bundle
from .per_class import add_per_class_points, predictor
from .run_dir import RunData, RunDirError, write_json_atomic
from .shifts import check_forms, group_of_form, group_rendering, render_form, render_group, render_mixed

log = logging.getLogger(__name__)

DEFAULT_TPRS = (0.90, 0.95, 0.99)
SCORE_SELECTION_FILE = "score_selection.json"  # next to the exported model: --score auto's comparison
GOLDEN_COUNT = 8
BUNDLE_DIR = "bundle"


def threshold_for_tpr(calibration_sorted: np.ndarray, target_tpr: float) -> float:
    """The module docstring's rule: the k-th smallest calibration score, k = floor((1 - tau)(n + 1))."""
    cal = np.asarray(calibration_sorted)
    n = cal.size
    if not 0.0 < target_tpr < 1.0:
        raise ValueError(f"target TPR must be in (0, 1), got {target_tpr}")
    # round() guards against (1 - 0.95) * 100 = 4.999999999999996 style float error
    k = math.floor(round((1.0 - target_tpr) * (n + 1), 9))
    if k < 1:
        raise ValueError(f"{n} calibration scores are too few for a TPR of {target_tpr}: "
                         f"need at least {math.ceil(1.0 / (1.0 - target_tpr)) - 1}")
    return float(cal[k - 1])


def operating_point_name(target_tpr: float) -> str:
    return f"tpr{100 * target_tpr:.10g}"


@dataclass
class CalibrateConfig:
    onnx: str | None = None  # default RUN_DIR/export/model.onnx
    score: str = "msp"  # an ONNX score output, or "auto" (chosen on validation data, see score_selection)
    calibration_forms: list[str] = field(default_factory=lambda: list(CALIBRATION_FORMS))
    validation_forms: list[str] = field(default_factory=lambda: list(DEFAULT_SHIFTS))  # realised TPR / FPR per form
    auto_samples: int = 500  # images per side attacked when choosing the score (--score auto)
    auto_attack: str = "paper"  # the worst-case protocol the choice is made under: paper (1/255) or strong (8/255)
    tprs: list[float] = field(default_factory=lambda: list(DEFAULT_TPRS))
    default_tpr: float = 0.95
    per_class: bool = False  # also a class-conditional point per TPR (`tprXX_per_class`, per_class.py)
    # one calibration per upload-form group (service/upload_form.py): thresholds and p-values by the upload's form
    form_calibration: bool = True
    # the JPEG quality bands of the form groups: (lowest, highest), covering 1-100 (upload_form.DEFAULT_JPEG_BANDS)
    jpeg_bands: tuple[tuple[int, int], ...] = DEFAULT_JPEG_BANDS
    name: str | None = None
    version: str | None = None  # default: UTC timestamp
    out: str | None = None  # default RUN_DIR/bundle
    ood: list[str] | None = None  # default: the sets of the run's evaluation, else tinyimagenet + gaussian
    max_samples: int | None = None  # for the validation sets (the calibration split is always used whole)
    batch_size: int = 256
    data_dir: str | None = None
    seed: int = 0
    tarball: bool = True

    def validate(self) -> None:
        tprs = sorted(set(float(t) for t in self.tprs))
        if not tprs or any(not 0.0 < t < 1.0 for t in tprs):
            raise ValueError(f"--tpr values must be in (0, 1), got {self.tprs}")
        if not any(math.isclose(self.default_tpr, t) for t in tprs):
            raise ValueError(f"--default {self.default_tpr} is not one of the --tpr values {tprs}")
        self.tprs = tprs
        self.calibration_forms = check_forms(self.calibration_forms)
        self.validation_forms = check_forms(self.validation_forms)
        if not self.calibration_forms:
            raise ValueError("--calibration-forms: give at least one form (e.g. stored)")
        from .score_selection import SELECTION_ATTACKS

        if self.auto_attack not in SELECTION_ATTACKS:
            raise ValueError(f"--auto-attack must be 'paper' or 'strong', got {self.auto_attack!r}")
        if self.auto_samples < 1:
            raise ValueError("--auto-samples must be >= 1")
        if self.version is None:
            self.version = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def _default_name(run: RunData, model_name: str | None, method: str | None) -> str:
    name = "-".join(p for p in (model_name, method) if p) or run.run_dir.name
    return re.sub(r"[^A-Za-z0-9._-]", "-", name).strip("-.")[:64] or "oodguard"


def _accept_rate(scores: np.ndarray, threshold: float) -> float:
    """Fraction of scores accepted (>= threshold): TPR on in-distribution, FPR on OOD."""
    return float(np.mean(np.asarray(scores) >= threshold))


def calibrate_run(run_dir: str | Path, cfg: CalibrateConfig) -> BuiltBundle:
    """Calibrate the run's exported model and assemble the bundle (module docstring)."""
    cfg.validate()
    run = RunData.open(run_dir, data_dir=cfg.data_dir)
    onnx_path = Path(cfg.onnx) if cfg.onnx else run.run_dir / EXPORT_DIR / ONNX_FILE
    if not onnx_path.is_file():
        raise RunDirError(f"{onnx_path}: no exported model; run `oodguard export {run.run_dir}` first (or pass --onnx)")
    ckpt_sha = run.checkpoint_sha256()
    export_info = read_export_info(onnx_path) or {}
    if export_info.get("checkpoint_sha256") not in (None, ckpt_sha):
        raise RunDirError(f"{onnx_path} was exported from another checkpoint than the run's last.pt; "
                       f"run `oodguard export {run.run_dir}` again")
    session = make_session(onnx_path, intra_op_threads=0, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    if cfg.score != "auto" and cfg.score not in outputs:
        raise ValueError(f"score {cfg.score!r} is not an output of {onnx_path} (outputs: {', '.join(outputs)}, or auto)")
    eval_report, eval_raw = load_eval(run) or ({}, {})

    # -- the calibration split, uploaded in a mix of forms and decoded as the service does -------------
    cal_set = run.calibration_set()
    cal_images, _ = render_mixed(cal_set.images, cfg.calibration_forms, seed=cfg.seed)

    score_selection = None
    if cfg.score == "auto":
        cfg.score, score_selection = _select_score(run, session, export_info, cal_images, cfg)
        log.info("--score auto chose %s", cfg.score)

    def served_scores(images_u8: np.ndarray) -> np.ndarray:
        return run_onnx(session, data.to_tensor(images_u8).numpy(), cfg.batch_size, [cfg.score])[cfg.score]

    # -- calibration scores, with the served artefact ---------------------------------------------------
    cal_sorted = np.sort(served_scores(cal_images).astype(np.float32))
    thresholds = {t: threshold_for_tpr(cal_sorted, t) for t in cfg.tprs}
    log.info("calibrated %s on %d held-out images: %s", cfg.score, cal_sorted.size,
             {operating_point_name(t): thr for t, thr in thresholds.items()})
    # form-conditional (Mondrian) calibration: the whole split uploaded in each group's forms, scored
    groups = FormGroups(tuple(cfg.jpeg_bands))
    stored_group = group_of_form("stored", groups=groups)  # the group the test and OOD files are in, as stored
    form_cal = None if not cfg.form_calibration else {
        group: np.sort(served_scores(render_group(cal_set.images, group, cfg.seed, groups=groups)).astype(np.float32))
        for group in groups.names}
    form_thresholds = None if form_cal is None else {
        t: {group: threshold_for_tpr(scores, t) for group, scores in form_cal.items()} for t in cfg.tprs}

    # -- validation: in-distribution test split and OOD sets --------------------------------------------
    test_set = subsample(run.test_set(), cfg.max_samples, cfg.seed)
    test_scores = served_scores(test_set.images)
    lineage = {**run.lineage(), Path(test_set.source).name: test_set.sha256}
    evaluated_sets = [v.get("spec", k) for k, v in eval_report.get("ood_sets", {}).items()]
    ood_scores: dict[str, np.ndarray] = {}
    real_ood: dict[str, data.ImageSet] = {}
    for spec in cfg.ood or evaluated_sets or ["tinyimagenet", "gaussian"]:
        image_set = load_ood_set(spec, cfg.max_samples, cfg.seed, data_dir=run.data_dir)
        ood_scores[set_key(spec)] = served_scores(image_set.images)
        if image_set.sha256 and not image_set.source.startswith("synthetic:"):
            lineage[Path(image_set.source).name] = image_set.sha256
            real_ood[set_key(spec)] = image_set
    # "<score>__<set>__<attack>" -> attacked scores of the evaluation (torch, on its PGD inputs)
    attacked = {tuple(k.split("__", 1)[1].rsplit("__", 1)): v for k, v in eval_raw.items()
                if k.startswith(f"{cfg.score}__") and k.rsplit("__", 1)[1] in ATTACK_PROTOCOLS
                and not k.endswith("__none")}
    points, validation = _operating_points(thresholds, cal_sorted, test_scores, ood_scores, attacked, form_thresholds,
                                           stored_group)
    if cfg.per_class:  # thresholds per predicted class, next to each global point (per_class.py)
        ood_images = {set_key(spec): load_ood_set(spec, cfg.max_samples, cfg.seed, data_dir=run.data_dir).images
                      for spec in cfg.ood or evaluated_sets or ["tinyimagenet", "gaussian"]}
        points = add_per_class_points(points, predictor(session, cfg.score, cfg.batch_size), cal_images,
                                      test_set.images, ood_images, len(run.classes), threshold_for_tpr)
    metrics: dict[str, Any] = {"validation": {
        "score": cfg.score,
        "test_images": int(test_scores.size),
        "test_source": test_set.source,
        # images behind each FPR (attacked ones: the evaluation's seeded subset) and behind the attacked TPRs
        "ood_images": {**{k: int(v.size) for k, v in ood_scores.items()},
                       **{f"{s}/{a}": int(v.size) for (s, a), v in attacked.items() if s != "in"}},
        "test_images_attacked": {a: int(v.size) for (s, a), v in attacked.items() if s == "in"},
        "operating_points": validation,
        # ~0.5 when the test split's conformal p-values are uniform, as they should be in-distribution
        "test_p_value_mean": float(np.mean(conformal_p_values(
            cal_sorted if form_cal is None else form_cal[stored_group], test_scores))),
        "attacked_source": "eval/scores.npz: torch scores of the evaluation's PGD inputs" if attacked else None,
        "calibration_forms": list(cfg.calibration_forms),
        "form_conditional": form_thresholds is not None,
        # realised TPR (test split) and FPR (real OOD sets) per upload form, at every operating point, each
        # form at the threshold the service applies to it (its group's, in a form-conditional bundle)
        "forms": _per_form(served_scores, test_set.images, real_ood, thresholds, form_thresholds, cfg.validation_forms,
                           groups),
    }}
    if score_selection is not None:
        metrics["score_selection"] = score_selection
    if eval_report:
        keep = ("convention", "accuracy", "attacks", "attack_notes", "certified", "results")
        metrics["evaluation"] = {k: eval_report.get(k) for k in keep}

    # -- manifest and bundle ----------------------------------------------------------------------------
    model, config = run.load_model()
    model_config = dict(getattr(model, "model_config", {}))
    method = eval_report.get("method") or _config_value(config, "method")
    score_params = (export_info.get("score_params") or {}).get(cfg.score, {})
    default_op = operating_point_name(next(t for t in cfg.tprs if math.isclose(t, cfg.default_tpr)))
    manifest = BundleManifest(
        name=cfg.name or _default_name(run, model_config.get("name"), method),
        version=cfg.version,
        description=f"{model_config.get('name', 'model')} trained with {method or 'unknown method'}; "
                    f"score {cfg.score}, calibrated on {cal_sorted.size} held-out images",
        classes=run.classes,
        input=InputSpec(height=int(model.input_size), width=int(model.input_size), resize=TRAINING_RESIZE,
                        mean=tuple(model.mean), std=tuple(model.std)),
        outputs=outputs,
        score=ScoreSpec(name=cfg.score, output=cfg.score, params={k: float(v) for k, v in score_params.items()}),
        operating_points=points,
        default_operating_point=default_op,
        calibration=CalibrationInfo(
            size=int(cal_sorted.size), seed=run.split.get("seed"),
            split=f"held-out calibration split of {Path(cal_set.source).name} (split.json)",
            form_rule=FORM_RULE if form_cal is not None else None,
            forms=None if form_cal is None else {
                group: FormCalibration(file=f"calibration_{group}.npy", size=int(scores.size),
                                       rendering=group_rendering(group, groups)) for group, scores in form_cal.items()}),
        metrics=metrics,
        training={"method": method, "model": model_config.get("name"), "model_config": model_config, "config": config},
        lineage=Lineage(datasets={k: v for k, v in lineage.items() if v}, code_version=git_commit(),
                        run_dir=str(run.run_dir), checkpoint_sha256=ckpt_sha),
    )
    golden = subsample(test_set, GOLDEN_COUNT, cfg.seed + 1)
    out = Path(cfg.out) if cfg.out else run.run_dir / BUNDLE_DIR
    return build_bundle(out, onnx_path=onnx_path, manifest=manifest, calibration_scores=cal_sorted,
                        form_calibration_scores=form_cal,
                        golden_images=data.to_tensor(golden.images).numpy(),
                        report_files=_report_files(run.run_dir / EVAL_DIR, onnx_path.parent), tarball=cfg.tarball)


def _select_score(run: RunData, session, export_info: dict[str, Any], cal_images: np.ndarray,
                  cfg: CalibrateConfig) -> tuple[str, dict[str, Any]]:
    """`--score auto`: the graph's score outputs compared on validation data (see score_selection)."""
    from .export import load_or_fit_mahalanobis
    from .score_selection import select_score
    from .scores import SCORES, ScoreContext

    candidates = [n for n in export_info.get("scores", []) if n in SCORES]
    if not candidates:
        candidates = [o.name for o in session.get_outputs() if o.name in SCORES]
    # the comparison is costly (attacks): reuse it while the model, the data and the settings are the same
    onnx_path = Path(cfg.onnx) if cfg.onnx else run.run_dir / EXPORT_DIR / ONNX_FILE
    key = {"onnx_sha256": sha256_file(onnx_path), "candidates": candidates, "auto_samples": cfg.auto_samples,
           "auto_attack": cfg.auto_attack,
           "seed": cfg.seed, "calibration_forms": list(cfg.calibration_forms), "resize": TRAINING_RESIZE,
           "outlier_holdout": run.split.get("outlier_holdout", {}).get("classes")}
    cache = onnx_path.parent / SCORE_SELECTION_FILE
    if cache.is_file():
        cached = json.loads(cache.read_text(encoding="utf-8"))
        if cached.get("key") == key:
            log.info("--score auto: reusing the comparison in %s", cache)
            return cached["record"]["chosen"], cached["record"]
    model, _ = run.load_model()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    maha = load_or_fit_mahalanobis(model, run, 5000, cfg.seed)[0] if "mahalanobis" in candidates else None
    ctx = ScoreContext(mahalanobis=maha)

    def onnx_scores(images: np.ndarray, name: str) -> np.ndarray:
        return run_onnx(session, images.astype(np.float32), cfg.batch_size, [name])[name]

    chosen, record = select_score(run, candidates, onnx_scores, model, ctx, cal_images, cfg.auto_samples,
                                  cfg.batch_size, cfg.seed, cfg.auto_attack)
    write_json_atomic(cache, {"key": key, "record": record})
    return chosen, record


def _per_form(served_scores, test_images: np.ndarray, real_ood: dict[str, data.ImageSet],
              thresholds: dict[float, float], form_thresholds: dict[float, dict[str, float]] | None,
              forms: list[str], groups: FormGroups) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for form in forms:
        group = group_of_form(form, groups=groups)
        s_in = served_scores(render_form(test_images, form))
        s_out = {k: served_scores(render_form(v.images, form)) for k, v in real_ood.items()}
        applied = thresholds if form_thresholds is None else {t: g[group] for t, g in form_thresholds.items()}
        out[form] = {operating_point_name(t): {"threshold": thr, "realised_tpr": _accept_rate(s_in, thr),
                                               "fpr": {k: _accept_rate(v, thr) for k, v in s_out.items()}}
                     for t, thr in applied.items()}
        out[form]["n_in"] = int(s_in.size)
        out[form]["group"] = group
    return out


def _operating_points(thresholds: dict[float, float], cal_sorted: np.ndarray, test_scores: np.ndarray,
                      ood_scores: dict[str, np.ndarray], attacked: dict[tuple[str, str], np.ndarray],
                      form_thresholds: dict[float, dict[str, float]] | None = None, stored_group: str | None = None):
    """OperatingPoints (realised TPR on the test split, FPR per OOD set clean and attacked) + a detailed record.

    `thresholds`: the mixed-form calibration's. The rates are at what the service applies to the stored form
    the test, OOD and attacked images are in: that group's threshold in a form-conditional bundle."""
    points, validation = [], {}
    for tpr, thr in thresholds.items():
        name = operating_point_name(tpr)
        applied = thr if form_thresholds is None else form_thresholds[tpr][stored_group]
        fpr = {k: _accept_rate(v, applied) for k, v in ood_scores.items()}
        fpr.update({f"{s}/{a}": _accept_rate(v, applied) for (s, a), v in attacked.items() if s != "in"})
        realised = _accept_rate(test_scores, applied)
        groups = None if form_thresholds is None else dict(form_thresholds[tpr])
        points.append(OperatingPoint(name=name, target_tpr=tpr, threshold=thr, realised_tpr=realised, fpr=fpr,
                                     form_thresholds=groups))
        validation[name] = {
            "threshold": thr, "target_tpr": tpr, "calibration_tpr": _accept_rate(cal_sorted, thr),
            "applied_threshold_stored_form": applied, "form_thresholds": groups,
            "realised_tpr": realised, "fpr": fpr,
            "realised_tpr_attacked": {a: _accept_rate(v, applied) for (s, a), v in attacked.items() if s == "in"},
        }
    return points, validation


def _report_files(eval_dir: Path, export_dir: Path) -> dict[str, Path]:
    """report/: the evaluation's eval.md, eval.json and plots, plus export.json (not the raw scores)."""
    files = {}
    if eval_dir.is_dir():
        files = {p.name: p for p in sorted(eval_dir.iterdir()) if p.is_file() and p.suffix in (".md", ".json", ".png")}
    if (export_dir / EXPORT_JSON).is_file():
        files[EXPORT_JSON] = export_dir / EXPORT_JSON
    return files


def _config_value(config: dict[str, Any], key: str) -> Any:
    for section in (config, config.get("train") or {}):
        if isinstance(section, dict) and section.get(key) is not None:
            return section[key]
    return None
