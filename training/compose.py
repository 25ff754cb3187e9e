"""`oodguard guard`: a classifier run and a detector run (`--method disc`) composed into one run directory.

The composed run's model is a `GuardedNet` (architectures.py): the classifier as trained, plus the detector's
`detector` score. Evaluation, export, calibration and serving then treat it like any other run, so the
detector becomes one more score output of the same graph, calibrated and hot-swapped like the others.

Both runs must have held out the same calibration images and the same outlier classes: otherwise one of the
two models would have trained on images the composed run calibrates or validates on. Nothing is written
unless every check passes (the run directory appears whole or not at all).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from oodguard.service.bundle import sha256_file

from .architectures import create_model
from .config import DISC_CLASSES
from .run_dir import (
    CHECKPOINT_FORMAT,
    RunDirError,
    last_checkpoint_path,
    load_checkpoint,
    load_split,
    read_run_config,
    resolve_model_config,
    save_last_checkpoint,
    write_json_atomic,
    write_run_record,
)


def _run_model(run_dir: Path, checkpoint: Path | None = None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], Path]:
    """(config.json, model_config, state_dict, checkpoint path) of a finished or stopped run."""
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: run directory not found")
    path = Path(checkpoint) if checkpoint is not None else last_checkpoint_path(run_dir)
    if not path.is_file():
        raise RunDirError(f"{run_dir}: no checkpoint ({path}); train it first")
    state = load_checkpoint(path, map_location="cpu")
    return read_run_config(run_dir), resolve_model_config(dict(state["model_config"]), state["model"]), state["model"], path


def _same_holdout(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if sorted(a.get("cal_indices", [])) != sorted(b.get("cal_indices", [])) or a.get("dataset_sha256") != b.get("dataset_sha256"):
        return False
    ha, hb = a.get("outlier_holdout") or {}, b.get("outlier_holdout") or {}
    return (ha.get("classes"), ha.get("indices"), ha.get("sha256")) == (hb.get("classes"), hb.get("indices"), hb.get("sha256"))


def compose_guarded(classifier_run: str | Path, detector_run: str | Path, out: str | Path,
                    detector_checkpoint: str | Path | None = None) -> Path:
    """Write run directory `out` holding GuardedNet(classifier, detector); RunDirError / ValueError name the problem.

    `detector_checkpoint`: one of the detector run's checkpoints (e.g. `epoch_012.pt`, the epoch its validation
    chose) instead of its last."""
    classifier_run, detector_run, out = Path(classifier_run), Path(detector_run), Path(out)
    if out.exists():
        raise RunDirError(f"{out} exists; choose a new directory for the composed run")
    clf_config, clf_model, clf_state, clf_path = _run_model(classifier_run)
    det_config, det_model, det_state, det_path = _run_model(detector_run, detector_checkpoint)
    if (det_config.get("train") or {}).get("method") != "disc" or list(det_config.get("classes") or []) != list(DISC_CLASSES):
        raise ValueError(f"--detector {detector_run}: not an in-vs-out detector (train one with --method disc)")
    if (clf_config.get("train") or {}).get("method") == "disc":
        raise ValueError(f"--classifier {classifier_run}: a detector, not a classifier")
    split = load_split(classifier_run)
    if not _same_holdout(split, load_split(detector_run)):
        raise RunDirError(f"{classifier_run} and {detector_run} held out different calibration images or outlier "
                          "classes, so one trained on the other's calibration or validation data; train both with "
                          "the same data, --calibration-size, --split-seed and --outlier-holdout")

    num_classes = int(clf_model["num_classes"])
    model_config = {"name": "guarded", "num_classes": num_classes, "classifier": clf_model, "detector": det_model}
    model = create_model(**model_config)
    model.classifier.load_state_dict(clf_state)
    model.detector.load_state_dict(det_state)

    parts = {"classifier": {"run_dir": str(classifier_run.resolve()), "checkpoint_sha256": sha256_file(clf_path),
                            "method": clf_config["train"].get("method"), "model_config": clf_model},
             "detector": {"run_dir": str(detector_run.resolve()), "checkpoint_sha256": sha256_file(det_path),
                          "checkpoint": det_path.name, "method": "disc", "model_config": det_model,
                          "attack": {k: det_config["train"].get(k) for k in ("eps", "attack_steps", "step_size",
                                                                             "random_start")}}}
    # the classifier's training record stays the run's (data spec, classes, lineage); the composition is added
    config = {**clf_config, "model_config": model_config, "composed": parts,
              "lineage": {**(clf_config.get("lineage") or {}), "detector": det_config.get("lineage")}}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        write_run_record(tmp, config, split)
        save_last_checkpoint(tmp, {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "model_config": model_config,
                                   "config": clf_config.get("train", {}), "step": 0, "epoch": 0.0, "composed": parts})
        write_json_atomic(tmp / "summary.json", {"event": "composed", **parts})
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
