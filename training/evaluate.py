"""`oodguard evaluate`: OOD detection of a trained run, clean and under attack on the score itself.

For each score (scores.SCORES), each OOD set and each attack protocol:

- clean: scores of the in-distribution test images (positives) and of the OOD images (negatives);
- attacked, model in eval mode: inliers are pushed to look OOD (minimise the score), OOD images to look
  in-distribution (maximise it). `paper` (ε = 1/255) and `strong` (ε = 8/255, 100 steps) are worst-case
  attacks (`attacks.pgd_worst_case`): per image the worst score over four objectives (the score,
  log-MSP, logit margin, cross-entropy to uniform) and restarts, best iterate kept, on the 8-bit grid.
  `fast` is the single-objective last-iterate PGD for smoke runs. MSP, energy and Mahalanobis are
  attacked end to end; ODIN through BPDA (its pre-processing step is held constant in the backward
  pass, its forward value is exact), reported as such.
- shifted (`--shifts`): the same in-distribution and OOD images uploaded in other forms (PNG, JPEG of
  other qualities, upscaled, non-square; `shifts.FORMS`) through the service's decode path, with the
  realised TPR / FPR at the `tpr95` threshold calibrated on the run's calibration split.
- certified (`--certify EPS`, msp / energy): clean inliers vs a sound upper bound of each OOD image's
  score over its whole ε-ball (interval bound propagation, `certify.py`): rows `certified_<k>_255`.

Writes to `out_dir` (default RUN_DIR/eval): eval.json (every number + the config that made it +
versions), eval.md, ROC / histogram PNGs, scores.npz (every raw score, so calibration can compute
attacked FPRs at its thresholds) and mahalanobis.npz (the fitted class means / precision).
"""

from __future__ import annotations

import json
import logging
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from oodguard.service.upload_form import DEFAULT_GROUPS

from . import data
from .attacks import AttackConfig, pgd_with, pgd_worst_case
from .loop_parts import resolve_device
from .ood_metrics import ood_metrics
from .ood_sets import load_ood_set, subsample, subset_indices
from .report import write_report
from .run_dir import RunData, write_json_atomic
from .scores import (
    SCORES,
    WORST_CASE_OBJECTIVES,
    MahalanobisParams,
    ScoreContext,
    attack_objective,
    check_model_scores,
    check_score_names,
    compute_scores,
    fit_mahalanobis,
    scored_forward,
    worst_case_plan,
)
from .shifts import check_forms, group_of_form, render_form, render_group, render_mixed

log = logging.getLogger(__name__)

EVAL_DIR = "eval"
EVAL_JSON = "eval.json"
SCORES_NPZ = "scores.npz"
MAHALANOBIS_NPZ = "mahalanobis.npz"
EVAL_SCHEMA = "oodguard-eval/1"

ATTACK_PROTOCOLS: dict[str, AttackConfig | None] = {
    "none": None,
    # single objective (the score), last iterate: the reference code's evaluation attack, for smoke runs
    "fast": AttackConfig(eps=1 / 255, steps=10, step_size=1 / 255, random_start=False),
    # the ALOE paper's budget (ε = 1/255, 10 steps of 1/255), worst case over objectives and 2 restarts
    "paper": AttackConfig(eps=1 / 255, steps=10, step_size=1 / 255, random_start=False,
                          objectives=WORST_CASE_OBJECTIVES, restarts=2),
    # the robustness literature's CIFAR budget (ATD: ε = 8/255, PGD-100, both sides), worst case likewise
    # (one start per objective: 400 gradient steps per image are already ~1 s on 2 CPU cores for fast_cnn)
    "strong": AttackConfig(eps=8 / 255, steps=100, step_size=2 / 255, random_start=False,
                           objectives=WORST_CASE_OBJECTIVES, restarts=1),
}
# Forms whose shift the evaluation and calibration measure by default (shifts.FORMS has them all).
DEFAULT_SHIFTS = ("stored", "png", "jpeg_q30", "jpeg_q50", "jpeg_q95", "upscale_x2", "upscale_x3", "upscale_x4",
                  "non_square")
# The mix of forms the calibration split is rendered in (thresholds that hold whatever form arrives).
CALIBRATION_FORMS = ("stored", "png", "jpeg_q50", "jpeg_q95", "upscale_x3", "non_square")
CONVENTION = (
    "In-distribution is the positive class; a higher score means more in-distribution; an input is "
    "accepted iff score >= threshold. FPR95 = FPR at the highest threshold with TPR >= 95%; "
    "detection error = min over thresholds of 0.5(1-TPR) + 0.5 FPR; AUPR-in/out = average precision "
    "with in-distribution / OOD as positive."
)
ATTACK_NOTES = {
    "msp": "end to end",
    "energy": "end to end",
    "mahalanobis": "end to end (through the penultimate features)",
    "odin": "BPDA: the pre-processing step is held constant in the backward pass (forward exact); "
    "not a fully end-to-end gradient",
    "detector": "end to end through the detector; worst-case protocols attack the score itself from as many "
    "starts as the other scores get objectives x restarts (restart 0 from the image, the rest random points of "
    "the ball): the surrogates act on the classifier's logits, which do not move this score",
}


@dataclass
class EvalConfig:
    ood: list[str] = field(default_factory=lambda: ["tinyimagenet", "gaussian", "uniform", "blobs"])
    attacks: list[str] = field(default_factory=lambda: ["none", "paper"])
    scores: list[str] = field(default_factory=lambda: ["msp", "energy", "odin", "mahalanobis"])
    max_samples: int | None = None  # per set (in-distribution test and each OOD set)
    # attacked evaluations on fewer images (a seeded subset of the clean ones): protocol -> images per set
    attack_samples: dict[str, int] = field(default_factory=lambda: {"strong": 500})
    attack_sets: list[str] | None = None  # OOD sets attacked (None = all of `ood`); clean numbers cover all
    shifts: list[str] = field(default_factory=list)  # upload forms to evaluate (shifts.FORMS); [] = none
    certify: list[float] = field(default_factory=list)  # L∞ radii (pixel units) of the certified rows; [] = none
    certify_samples: int | None = None  # images per side for the certified rows (seeded subset); None = all
    batch_size: int = 256
    maha_fit_samples: int = 5000  # training images (minus calibration) used to fit Mahalanobis
    temperature: float = 1.0
    odin_temperature: float = 1000.0
    odin_eps: float = 0.0014
    seed: int = 0
    data_dir: str | None = None
    plots: bool = True
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | cuda:N

    def validate(self) -> None:
        self.scores = check_score_names(self.scores)
        unknown = [a for a in self.attacks if a not in ATTACK_PROTOCOLS]
        if unknown:
            raise ValueError(f"unknown attack protocol(s) {unknown}; valid: {', '.join(ATTACK_PROTOCOLS)}")
        if "none" not in self.attacks:
            self.attacks = ["none", *self.attacks]  # attacked numbers are read against the clean ones
        if not self.ood:
            raise ValueError("give at least one OOD set (--ood)")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"--max-samples must be >= 1, got {self.max_samples}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        bad = {k: v for k, v in self.attack_samples.items() if k not in ATTACK_PROTOCOLS or int(v) < 1}
        if bad:
            raise ValueError(f"--attack-samples: unknown protocol or count < 1: {bad}")
        self.shifts = check_forms(self.shifts)
        if any(not 0.0 < e <= 1.0 for e in self.certify):
            raise ValueError(f"--certify radii must be in (0, 1] (pixel units, e.g. 1/255), got {self.certify}")
        from .certify import CERTIFIABLE_SCORES

        if self.certify and not set(CERTIFIABLE_SCORES) & set(self.scores):
            raise ValueError("--certify bounds msp, energy and (a composed run's) detector only; add one to --scores")
        if self.certify_samples is not None and self.certify_samples < 1:
            raise ValueError(f"--certify-samples must be >= 1, got {self.certify_samples}")
        if self.attack_sets is not None:
            unknown = sorted(set(self.attack_sets) - {set_key(o) for o in self.ood})
            if unknown:
                raise ValueError(f"--attack-sets {unknown} are not among the OOD sets ({', '.join(map(set_key, self.ood))})")


def set_key(spec: str) -> str:
    """A short file-name-safe name for an OOD set spec ('tinyimagenet', '/data/svhn.npz' -> 'svhn')."""
    name = Path(spec).stem if ("/" in spec or "." in spec) else spec
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "ood"


def score_context(cfg: EvalConfig, maha: MahalanobisParams | None) -> ScoreContext:
    return ScoreContext(
        temperature=cfg.temperature, odin_temperature=cfg.odin_temperature, odin_eps=cfg.odin_eps, mahalanobis=maha
    )


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def extract_features(model: nn.Module, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    device = _model_device(model)
    chunks = []
    with torch.no_grad():
        for _, x in data.iterate_batches(images, batch_size):
            chunks.append(model.features(x.to(device)).cpu())
    return torch.cat(chunks)


def fit_mahalanobis_for_run(
    model: nn.Module, run: RunData, max_samples: int = 5000, seed: int = 0, batch_size: int = 256
) -> MahalanobisParams:
    """Fit on the run's training split minus its calibration images (a seeded subset for speed)."""
    fit = run.fit_set(max_samples=max_samples, seed=seed)
    log.info("fitting Mahalanobis on %d training images (calibration images excluded)", len(fit))
    feats = extract_features(model, fit.images, batch_size)
    num_classes = int(model.head.out_features)
    return fit_mahalanobis(feats, torch.as_tensor(fit.labels), num_classes)  # on the CPU, float64


def _score_batches(model: nn.Module, images: np.ndarray, names: list[str], ctx: ScoreContext, attack: AttackConfig | None,
                   is_in: bool, batch_size: int, seed: int, desc: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Scores (and predictions) for every requested score; attacked per score when `attack` is given.

    Returns ({score: scores}, {score: predicted class}); clean predictions are shared by all scores.
    """
    scores: dict[str, list[np.ndarray]] = {n: [] for n in names}
    preds: dict[str, list[np.ndarray]] = {n: [] for n in names}
    device = _model_device(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    sign = -1.0 if is_in else 1.0  # inliers: minimise the score; outliers: maximise it
    total = (len(images) + batch_size - 1) // batch_size * (1 if attack is None else len(names))
    with tqdm(total=total, desc=desc, leave=False, unit="batch") as bar:
        for start, x in data.iterate_batches(images, batch_size):
            x = x.to(device)
            if attack is None:
                logits, out = compute_scores(model, x, names, ctx)
                for n in names:
                    scores[n].append(out[n].cpu().numpy())
                    preds[n].append(logits.argmax(1).cpu().numpy())
                bar.update(1)
                continue
            for n in names:
                if attack.worst_case:
                    objectives, restarts = worst_case_plan(n, attack.objectives, attack.restarts)
                    x_adv, _ = pgd_worst_case(scored_forward(model, n, ctx), x, direction=sign,
                                              objectives=objectives, eps=attack.eps, steps=attack.steps,
                                              step_size=attack.step_size, restarts=restarts,
                                              random_start=attack.random_start, seed=seed * 7919 + start)
                else:
                    x_adv = pgd_with(attack, lambda xa, n=n: sign * attack_objective(model, xa, n, ctx), x, generator)
                logits, out = compute_scores(model, x_adv, [n], ctx)
                scores[n].append(out[n].cpu().numpy())
                preds[n].append(logits.argmax(1).cpu().numpy())
                bar.update(1)
    return ({n: np.concatenate(v).astype(np.float32) for n, v in scores.items()},
            {n: np.concatenate(v) for n, v in preds.items()})


def _clean_scores(model: nn.Module, images: np.ndarray, names: list[str], ctx: ScoreContext, batch_size: int,
                  desc: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    scores, preds = _score_batches(model, images, names, ctx, None, True, batch_size, 0, desc)
    return scores, preds[names[0]]


def _evaluate_shifts(model: nn.Module, run: RunData, test: data.ImageSet, ood_sets: dict, cfg: EvalConfig,
                     ctx: ScoreContext, raw: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per upload form: accuracy, realised TPR and per-set FPR at the tpr95 threshold, AUROC / FPR95.

    The thresholds are calibrated as `oodguard calibrate` does, on the run's calibration split with torch
    scores: one from the mix of forms (`thresholds`, a bundle built with --no-form-calibration), and one per
    upload-form group (`form_thresholds`, the default form-conditional bundle: each form is judged at its
    group's threshold, `form_conditional` in each row). Real OOD sets only (synthetic noise has no "form")."""
    from .calibrate import threshold_for_tpr  # calibrate imports this module

    cal = run.calibration_set()
    cal_mixed, _ = render_mixed(cal.images, list(CALIBRATION_FORMS), seed=cfg.seed)
    cal_scores, _ = _clean_scores(model, cal_mixed, cfg.scores, ctx, cfg.batch_size, "calibration [mixed forms]")
    thresholds = {n: threshold_for_tpr(np.sort(cal_scores[n]), 0.95) for n in cfg.scores}
    form_thresholds: dict[str, dict[str, float]] = {n: {} for n in cfg.scores}
    # the default groups (a bundle calibrated by default), only those the evaluated forms fall in
    for group in dict.fromkeys(group_of_form(form) for form in cfg.shifts):
        group_scores, _ = _clean_scores(model, render_group(cal.images, group, cfg.seed, groups=DEFAULT_GROUPS),
                                        cfg.scores, ctx, cfg.batch_size, f"calibration [{group}]")
        for n in cfg.scores:
            form_thresholds[n][group] = threshold_for_tpr(np.sort(group_scores[n]), 0.95)
    real_sets = {k: v for k, v in ood_sets.items() if not v[1].source.startswith("synthetic:")}
    out: dict[str, Any] = {"operating_point": "tpr95", "calibration_forms": list(CALIBRATION_FORMS),
                           "calibration_images": int(len(cal)), "thresholds": thresholds,
                           "form_thresholds": form_thresholds, "forms": {}}
    for form in cfg.shifts:
        group = group_of_form(form)
        images_in = render_form(test.images, form)
        s_in, pred = _clean_scores(model, images_in, cfg.scores, ctx, cfg.batch_size, f"in-distribution [{form}]")
        row: dict[str, Any] = {"accuracy": float(np.mean(pred == test.labels)), "n_in": int(len(test)),
                               "group": group, "scores": {}}
        for n in cfg.scores:
            thr = form_thresholds[n][group]
            row["scores"][n] = {"realised_tpr": float(np.mean(s_in[n] >= thresholds[n])), "sets": {},
                                "form_conditional": {"threshold": thr, "realised_tpr": float(np.mean(s_in[n] >= thr)),
                                                     "fpr": {}}}
            raw[f"{n}__in__shift_{form}"] = s_in[n]
        for key, (_, image_set) in real_sets.items():
            s_out, _ = _clean_scores(model, render_form(image_set.images, form), cfg.scores, ctx, cfg.batch_size,
                                     f"{key} [{form}]")
            for n in cfg.scores:
                raw[f"{n}__{key}__shift_{form}"] = s_out[n]
                row["scores"][n]["sets"][key] = {"fpr": float(np.mean(s_out[n] >= thresholds[n])),
                                                 **ood_metrics(s_in[n], s_out[n])}
                row["scores"][n]["form_conditional"]["fpr"][key] = float(np.mean(s_out[n] >= form_thresholds[n][group]))
        out["forms"][form] = row
    return out


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for pkg in ("oodguard", "onnx", "onnxruntime"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    """The git commit of the code (None outside a checkout); '-dirty' when tracked files differ."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def evaluate_run(run_dir: str | Path, cfg: EvalConfig, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a run; writes everything to `out_dir` and returns the eval.json content."""
    cfg.validate()
    started = time.perf_counter()
    run = RunData.open(run_dir, data_dir=cfg.data_dir)
    device = resolve_device(cfg.device)
    model, _ = run.load_model()
    check_model_scores(model, cfg.scores)
    model.to(device).eval()
    for p in model.parameters():  # attacks differentiate w.r.t. the input only
        p.requires_grad_(False)
    out_dir = Path(out_dir) if out_dir is not None else run.run_dir / EVAL_DIR
    out_dir.mkdir(parents=True, exist_ok=True)

    maha = None
    if "mahalanobis" in cfg.scores:
        maha = fit_mahalanobis_for_run(model, run, cfg.maha_fit_samples, cfg.seed, cfg.batch_size)
        maha.save_npz(out_dir / MAHALANOBIS_NPZ)
    ctx = score_context(cfg, maha.to(device) if maha is not None else None)

    test = subsample(run.test_set(), cfg.max_samples, cfg.seed)
    labels = test.labels
    ood_sets = {}
    for spec in cfg.ood:
        key = set_key(spec)
        if key in ood_sets or key == "in":
            raise ValueError(f"two OOD sets share the name {key!r}; rename one of the files")
        ood_sets[key] = (spec, load_ood_set(spec, cfg.max_samples, cfg.seed, data_dir=run.data_dir))

    raw: dict[str, np.ndarray] = {}
    accuracy: dict[str, Any] = {}
    results: dict[str, dict[str, dict[str, Any]]] = {n: {k: {} for k in ood_sets} for n in cfg.scores}
    timings: dict[str, float] = {}
    for attack_name in cfg.attacks:
        attack = ATTACK_PROTOCOLS[attack_name]
        t0 = time.perf_counter()
        # attacked protocols may run on a seeded subset of the clean images (recorded as n_in / n_out)
        limit = cfg.attack_samples.get(attack_name) if attack is not None else None
        in_idx = subset_indices(len(test), limit, cfg.seed)
        s_in, pred_in = _score_batches(model, test.images[in_idx], cfg.scores, ctx, attack, True, cfg.batch_size,
                                       cfg.seed, f"in-distribution [{attack_name}]")
        if attack is None:
            accuracy["clean"] = float(np.mean(pred_in[cfg.scores[0]] == labels))
        else:
            accuracy[attack_name] = {n: float(np.mean(pred_in[n] == labels[in_idx])) for n in cfg.scores}
        for n in cfg.scores:
            raw[f"{n}__in__{attack_name}"] = s_in[n]
        for key, (_, image_set) in ood_sets.items():
            if attack is not None and cfg.attack_sets is not None and key not in cfg.attack_sets:
                continue
            out_idx = subset_indices(len(image_set), limit, cfg.seed + 1)
            s_out, _ = _score_batches(model, image_set.images[out_idx], cfg.scores, ctx, attack, False,
                                      cfg.batch_size, cfg.seed + 1, f"{key} [{attack_name}]")
            for n in cfg.scores:
                raw[f"{n}__{key}__{attack_name}"] = s_out[n]
                results[n][key][attack_name] = ood_metrics(s_in[n], s_out[n])
                if attack is not None:  # the ALOE / ATOM protocol: clean inliers, attacked OOD images
                    clean_in = raw[f"{n}__in__none"][in_idx]
                    results[n][key][f"{attack_name}_ood_only"] = ood_metrics(clean_in, s_out[n])
        timings[attack_name] = round(time.perf_counter() - t0, 2)
        log.info("%s: done in %.1f s", attack_name, timings[attack_name])

    certified: dict[str, Any] = {}
    if cfg.certify:  # certify.py: clean inliers vs the IBP bound of each OOD image's score over its ε-ball
        from .certify import evaluate_certified

        t0 = time.perf_counter()
        rows, bounds, certified = evaluate_certified(
            model, test.images, {n: raw[f"{n}__in__none"] for n in cfg.scores},
            {k: s.images for k, (_, s) in ood_sets.items()}, cfg.certify, samples=cfg.certify_samples,
            seed=cfg.seed, temperature=cfg.temperature, batch_size=min(cfg.batch_size, 128))
        for n, per_set in rows.items():
            for key, per_row in per_set.items():
                results[n][key].update(per_row)
        raw.update(bounds)
        timings["certify"] = round(time.perf_counter() - t0, 2)

    shifts: dict[str, Any] = {}
    if cfg.shifts:
        t0 = time.perf_counter()
        shifts = _evaluate_shifts(model, run, test, ood_sets, cfg, ctx, raw)
        timings["shifts"] = round(time.perf_counter() - t0, 2)

    np.savez(out_dir / SCORES_NPZ, **raw)
    report = {
        "schema": EVAL_SCHEMA,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "run_dir": str(run.run_dir),
        "convention": CONVENTION,
        "config": asdict(cfg),
        "attacks": {k: (asdict(ATTACK_PROTOCOLS[k]) if ATTACK_PROTOCOLS[k] else None) for k in cfg.attacks},
        "attack_notes": {n: ATTACK_NOTES[n] for n in cfg.scores},
        "score_params": {n: SCORES[n].params(ctx) for n in cfg.scores},
        "model": dict(getattr(model, "model_config", {})),
        "method": _method(run.config),
        "checkpoint_sha256": run.checkpoint_sha256(),
        "in_distribution": {**test.describe(), "spec": run.data_spec, "split": "test"},
        "ood_sets": {k: {**s.describe(), "spec": spec} for k, (spec, s) in ood_sets.items()},
        "mahalanobis": {"fit_samples": maha.num_fit_samples, "split": "train minus calibration"} if maha else None,
        "accuracy": accuracy,
        "results": results,
        "shifts": shifts,
        "certified": certified,
        "timings_s": {**timings, "total": round(time.perf_counter() - started, 2)},
        "device": str(device),
        "versions": _versions(),
        "code_version": git_commit(),
    }
    for v in report["in_distribution"], *report["ood_sets"].values():
        v.pop("classes", None)
    write_json_atomic(out_dir / EVAL_JSON, report)
    write_report(out_dir, report, raw if cfg.plots else None)
    return report


def _method(config: dict[str, Any]) -> str | None:
    for section in (config, config.get("train") or {}):
        if isinstance(section, dict) and section.get("method"):
            return str(section["method"])
    return None


def load_eval(run: RunData) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """(eval.json, raw scores) of the run's evaluation (RUN_DIR/eval), or None when it has not been
    evaluated, or was evaluated on another checkpoint (retrained since: its numbers are stale)."""
    eval_dir = run.run_dir / EVAL_DIR
    if not (eval_dir / EVAL_JSON).is_file():
        return None
    report = json.loads((eval_dir / EVAL_JSON).read_text(encoding="utf-8"))
    if report.get("checkpoint_sha256") != run.checkpoint_sha256():
        log.warning("%s was made from another checkpoint; ignoring it (run `oodguard evaluate` again)", eval_dir)
        return None
    raw: dict[str, np.ndarray] = {}
    if (eval_dir / SCORES_NPZ).is_file():
        with np.load(eval_dir / SCORES_NPZ, allow_pickle=False) as z:
            raw = {k: z[k] for k in z.files}
    return report, raw

