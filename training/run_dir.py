"""The run directory: what `oodguard train` writes (config, split, log, checkpoints, lineage) and how every
later command (evaluate, export, calibrate, --resume, --init-from) reads it back.

Layout (`--out runs/NAME`)::

    config.json              {"train": resolved TrainConfig, "model_config", "num_classes", "classes",
                              "lineage": {"in_distribution", "outliers"[, "init_from"]} (source, sha256, n),
                              "code_version", "environment"}
    split.json               held-out calibration indices into the training file (+ seed, size, sha256),
                             the subset and the held-out outlier classes
    log.jsonl                one JSON line per epoch (and a final summary line)
    summary.json             the final summary line
    checkpoints/last.pt      latest state (every epoch, and on Ctrl-C / SIGTERM / budget end)
    checkpoints/epoch_XXX.pt optional per-epoch copies
    eval/, export/, bundle/  written later by `oodguard evaluate`, `export`, `calibrate`

A checkpoint is a dict of tensors and plain Python containers only, so `torch.load(weights_only=True)`
reads it (no pickle of arbitrary objects). It is written atomically: temp file in the same directory,
fsync, `os.replace`, fsync of the directory — a crash leaves either the old or the new file, never a
torn one.

`RunData` is a finished run seen from the commands that use it: its data spec, its calibration split
and the image sets evaluation, export and calibration need, resolved in one place.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodguard.service.atomic import atomic_write, atomic_write_text
from oodguard.service.bundle import sha256_file

from . import data

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SPLIT_FILE = "split.json"
LOG_FILE = "log.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
CHECKPOINT_FORMAT = 1
# Files a run writes; --overwrite removes exactly these (never anything else the user put there).
RUN_FILES = (CONFIG_FILE, SPLIT_FILE, LOG_FILE, SUMMARY_FILE)


class RunDirError(ValueError):
    """A run directory cannot be used as asked: missing or unreadable files, nothing to resume, a run that
    exists without --resume, a checkpoint that fits no model, or data it lacks; the message names the path."""


# -- the run's lifecycle (training) ------------------------------------------------------------------


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse early (before any data loading or writing) when the run directory cannot be used."""
    if resume:
        if not last_checkpoint_path(run_dir).is_file():
            raise RunDirError(f"{run_dir}: nothing to resume (no {CHECKPOINT_DIR}/last.pt)")
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: exists and is not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise RunDirError(f"{run_dir}: already exists and is not empty; pass --resume to continue that run "
                          "or --overwrite to start it again")


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """check_run_dir, then create it (removing a previous run's files with --overwrite)."""
    check_run_dir(run_dir, resume, overwrite)
    if resume:
        return
    if run_dir.is_dir() and any(run_dir.iterdir()):
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
        log.warning("--overwrite: removed the previous run's files in %s", run_dir)
    (run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)


# -- JSON files -----------------------------------------------------------------------------------------


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def write_run_record(run_dir: Path, config: dict[str, Any], split: dict[str, Any]) -> None:
    """config.json and split.json of a new run (the split on one line: it holds thousands of indices)."""
    write_json_atomic(run_dir / CONFIG_FILE, config)
    write_json_atomic(run_dir / SPLIT_FILE, split, indent=None)


def append_log(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / LOG_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """The run's last log line, also as summary.json."""
    append_log(run_dir, summary)
    write_json_atomic(run_dir / SUMMARY_FILE, summary)


def _read_run_json(path: Path, missing: str, what: str) -> dict[str, Any]:
    """A run directory's JSON file; a missing or unreadable one is a RunDirError naming the path."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{path}: {missing}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path}: unreadable {what} ({exc})") from None


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    return _read_run_json(Path(run_dir) / CONFIG_FILE, f"not a run directory (no {CONFIG_FILE})", "run config")


def load_split(run_dir: str | Path) -> dict[str, Any]:
    """split.json: {"cal_indices", "train_size", "calibration_size", "seed", "dataset_sha256", ...}."""
    return _read_run_json(Path(run_dir) / SPLIT_FILE, "run has no calibration split file", "split file")


# -- checkpoints ------------------------------------------------------------------------------------------


def last_checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """torch.save to a temp file next to `path`, fsync, then atomically replace `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        torch.save(state, f)


def save_last_checkpoint(run_dir: Path, state: dict[str, Any], epoch_tag: int | None = None) -> None:
    """checkpoints/last.pt, and with `epoch_tag` also checkpoints/epoch_XXX.pt (a hard link, no copy)."""
    path = last_checkpoint_path(run_dir)
    save_checkpoint(path, state)
    if epoch_tag is not None:
        tagged = path.with_name(f"epoch_{epoch_tag:03d}.pt")
        tagged.unlink(missing_ok=True)
        os.link(path, tagged)  # last.pt is later replaced by a new inode, so this copy stays intact


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RunDirError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError / UnpicklingError / EOFError / zipfile errors
        raise RunDirError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None


# Model configs whose architecture default changed after checkpoints existed: kwargs that rebuild the
# old architecture, tried in order when a checkpoint's weights do not fit the current default.
_LEGACY_MODEL_KWARGS = {"small_cnn": ({"pool": "maxavg"},)}


def resolve_model_config(model_config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The model_config that builds a model `state_dict` loads into (the recorded one, or a legacy variant)."""
    from .architectures import create_model  # local: keep this module importable without building models

    candidates = [dict(model_config)]
    for extra in _LEGACY_MODEL_KWARGS.get(model_config.get("name", ""), ()):
        if not set(extra) & set(model_config):
            candidates.append({**model_config, **extra})
    first_error = None
    for candidate in candidates:
        try:
            create_model(**candidate).load_state_dict(state_dict)
        except RuntimeError as exc:  # missing/unexpected keys or size mismatch
            first_error = first_error or exc
            continue
        if candidate != model_config:
            log.warning("checkpoint weights fit %s, not the current default %s (a checkpoint from an earlier version)",
                        candidate, model_config)
        return candidate
    raise RunDirError(f"checkpoint weights do not fit model {model_config}: {first_error}")


def load_model_from_run(run_dir: str | Path, map_location: str | torch.device = "cpu", checkpoint: str | Path | None = None):
    """(model in eval mode, run config dict) from `run_dir/checkpoints/last.pt` (or `checkpoint`).

    The config dict is `config.json` (training config, model_config, data lineage, code version).
    """
    from .architectures import create_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: run directory not found")
    ckpt_path = Path(checkpoint) if checkpoint is not None else last_checkpoint_path(run_dir)
    state = load_checkpoint(ckpt_path, map_location=map_location)
    try:
        config = read_run_config(run_dir)
    except RunDirError:
        config = {"train": state.get("config", {}), "model_config": state.get("model_config", {})}
    model_config = resolve_model_config(dict(state["model_config"]), state["model"])
    model = create_model(**model_config)
    model.load_state_dict(state["model"])
    model.to(map_location)
    model.eval()
    return model, config


def _weights_config(model_config: dict[str, Any]) -> dict[str, Any]:
    """The part of a model config that shapes its weights: flip_average changes how the model predicts, not
    what it stores, so a plain run may start a flip-averaged one and the other way round."""
    return {k: v for k, v in model_config.items() if k != "flip_average"}


def load_initial_weights(model, source: str | Path, split: dict[str, Any]) -> dict[str, Any]:
    """Copy the weights of `source` (a run directory or a .pt checkpoint) into `model` for fine-tuning.

    The architecture must match; only the number of outputs may differ, and then every weight but the
    output layer (`head`) is copied and the head keeps its fresh initialisation (recorded as "head").

    Refuses a run whose calibration split differs from this run's: the starting weights would have
    trained on images this run holds out for calibration. Returns a lineage record for config.json.
    """
    source = Path(source)
    if source.is_dir():
        theirs = load_split(source)
        if sorted(theirs.get("cal_indices", [])) != sorted(split.get("cal_indices", [])) or \
                theirs.get("dataset_sha256") != split.get("dataset_sha256"):
            raise RunDirError(f"--init-from {source}: its calibration split differs from this run's, so its "
                              "weights were trained on this run's calibration images; use the same data, "
                              "--calibration-size and --split-seed")
        mine_held, theirs_held = split.get("outlier_holdout"), theirs.get("outlier_holdout")
        if mine_held and theirs_held and (mine_held.get("classes"), mine_held.get("indices")) != \
                (theirs_held.get("classes"), theirs_held.get("indices")):
            raise RunDirError(f"--init-from {source}: it held out other outlier classes than this run, so its "
                              "weights were trained on this run's validation outliers; use the same "
                              "--outlier-holdout and --split-seed")
        path = last_checkpoint_path(source)
    else:
        path = source  # a bare checkpoint: the caller vouches for its training data
    state = load_checkpoint(path, map_location="cpu")
    theirs_config = resolve_model_config(dict(state["model_config"]), state["model"])
    theirs_body, mine_body = _weights_config(theirs_config), _weights_config(model.model_config)
    record = {"checkpoint": str(path.resolve()), "sha256": sha256_file(path), "step": int(state.get("step", 0)),
              "method": (state.get("config") or {}).get("method")}
    if {k: v for k, v in theirs_body.items() if k != "num_classes"} != \
            {k: v for k, v in mine_body.items() if k != "num_classes"}:
        raise RunDirError(f"--init-from {source}: its model {theirs_config} is not this run's {model.model_config} "
                          "(pass the same --model / --model-kwargs)")
    if theirs_body.get("num_classes") == mine_body.get("num_classes"):
        model.load_state_dict(state["model"])
        return record
    # Another number of outputs (a 10-class classifier starting a 2-output detector): the body transfers,
    # the output layer starts fresh. Only the head may differ; anything else missing is an error.
    body = {k: v for k, v in state["model"].items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(body, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise RunDirError(f"--init-from {source}: its weights do not fit this model beyond the output layer "
                          f"(missing {missing}, unexpected {unexpected})")
    record["head"] = (f"re-initialised: the source has {theirs_body.get('num_classes')} outputs, this model "
                      f"{mine_body.get('num_classes')}")
    return record


# -- provenance: the code and machine that made the run ----------------------------------------------------


def code_version() -> str | None:
    """`git describe --always --dirty` of the source tree, or None outside a git checkout."""
    src = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=src,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment_info(device: torch.device, threads: int, dist_info: Any, amp: bool) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "threads": threads, "device": str(device), "amp": amp,
        "world_size": dist_info.world_size, "backend": dist_info.backend,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    if device.type == "cuda":
        env["cuda_device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


# -- a finished run's data --------------------------------------------------------------------------------


def _lookup(config: dict[str, Any], *keys: str) -> Any:
    """First present key, looked up in the training config section first (config.json's "train"), then at
    the top level (where e.g. "data" may be a lineage record rather than the spec)."""
    sections = [config[k] for k in ("train", "config", "training") if isinstance(config.get(k), dict)] + [config]
    for key in keys:
        for section in sections:
            if section.get(key) not in (None, ""):
                return section[key]
    return None


@dataclass
class RunData:
    """The held-out calibration indices (split.json) index the run's in-distribution TRAIN file. From them:

    - `fit_set()`          train images minus the calibration images (Mahalanobis is fitted here),
    - `calibration_set()`  the calibration images (thresholds and p-values; never trained on),
    - `test_set()`         the in-distribution TEST split (evaluation / validation only),
    - `outlier_validation_set()`  the outlier classes held out of training (validation OOD data for
                           choosing the served score; never trained on, never a test set).
    """

    run_dir: Path
    config: dict[str, Any]
    split: dict[str, Any]
    data_spec: str
    data_dir: str | None = None
    _train: data.ImageSet | None = field(default=None, repr=False)

    @classmethod
    def open(cls, run_dir: str | Path, data_dir: str | None = None) -> RunData:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise RunDirError(f"{run_dir}: run directory not found")
        config = read_run_config(run_dir)
        split = load_split(run_dir)
        spec = _lookup(config, "data", "data_spec", "in_distribution", "dataset")
        if isinstance(spec, dict):  # a lineage record {"source": ..., ...}
            spec = spec.get("spec") or spec.get("source")
        if not spec:
            raise RunDirError(f"{run_dir / CONFIG_FILE}: no in-distribution data spec ('data') recorded")
        recorded_dir = _lookup(config, "data_dir")
        if data_dir is None and recorded_dir and Path(str(recorded_dir)).expanduser().is_dir():
            data_dir = str(recorded_dir)
        # else a directory of the machine that trained it (a GPU host's /tmp, say): the default data directory
        # is searched instead, and the data's sha256 recorded in split.json still decides whether it is the same
        if data_dir is None and Path(str(spec)).expanduser().is_dir():
            # trained with --data DIR: named sets ("tinyimagenet") resolve in the same directory
            data_dir = str(Path(str(spec)).expanduser())
        return cls(run_dir=run_dir, config=config, split=split, data_spec=str(spec), data_dir=data_dir)

    def checkpoint_sha256(self) -> str | None:
        """sha256 of checkpoints/last.pt: ties evaluations, exports and bundles to the weights they describe."""
        path = last_checkpoint_path(self.run_dir)
        return sha256_file(path) if path.is_file() else None

    def load_model(self):
        """(model in eval mode, config) from the run's last checkpoint."""
        return load_model_from_run(self.run_dir)

    # -- image sets ---------------------------------------------------------------------------------

    def test_set(self) -> data.ImageSet:
        return data.load_in_distribution(self.data_spec, "test", data_dir=self.data_dir)

    def train_file(self) -> data.ImageSet:
        if self._train is None:
            self._train = data.load_in_distribution(self.data_spec, "train", data_dir=self.data_dir)
        return self._train

    def calibration_indices(self) -> np.ndarray:
        idx = self.split.get("cal_indices", self.split.get("calibration_indices"))
        if idx is None:
            raise RunDirError(f"{self.run_dir / SPLIT_FILE}: no calibration indices ('cal_indices')")
        return np.asarray(idx, dtype=np.int64)

    def calibration_set(self) -> data.ImageSet:
        train = self.train_file()
        idx = self.calibration_indices()
        if idx.size == 0:
            raise RunDirError(f"{self.run_dir}: the calibration split is empty (trained with --calibration-size 0?)")
        if idx.max(initial=-1) >= len(train):
            raise RunDirError(f"{self.run_dir / SPLIT_FILE}: calibration index {int(idx.max())} is outside "
                              f"the training file ({len(train)} images) — was the run trained on other data?")
        expected = self.split.get("dataset_sha256")
        if expected and train.sha256 and expected != train.sha256:
            raise RunDirError(f"{train.source}: sha256 differs from the one recorded in split.json; "
                              "the calibration indices would point at other images")
        return train.subset(idx)

    def outlier_validation_set(self) -> data.ImageSet:
        record = self.split.get("outlier_holdout")
        if not record or not (record.get("classes") or record.get("indices")):
            raise RunDirError(f"{self.run_dir / SPLIT_FILE}: no held-out outlier classes (the run was trained "
                              "without outliers or with --outlier-holdout 0); validation OOD data is needed to "
                              "choose a score")
        spec = record["source"] if Path(str(record["source"])).exists() else _lookup(self.config, "outliers")
        outliers = data.load_outliers(spec or record["source"], data_dir=self.data_dir)
        if record.get("sha256") and outliers.sha256 and record["sha256"] != outliers.sha256:
            raise RunDirError(f"{outliers.source}: sha256 differs from the one recorded in split.json; the held-out "
                              "outlier classes would point at other images")
        return data.held_out_outliers(outliers, record)

    def fit_set(self, max_samples: int | None = None, seed: int = 0) -> data.ImageSet:
        """Train images minus the calibration images (optionally a seeded random subset)."""
        train = self.train_file()
        keep = np.setdiff1d(np.arange(len(train)), self.calibration_indices(), assume_unique=False)
        if max_samples is not None and max_samples < keep.size:
            keep = np.sort(np.random.default_rng(seed).choice(keep, size=max_samples, replace=False))
        return train.subset(keep)

    @property
    def classes(self) -> list[str]:
        classes = _lookup(self.config, "classes")
        if classes:
            return list(classes)
        return list(self.train_file().classes)

    def lineage(self) -> dict[str, str]:
        """Dataset file -> sha256, from what the run recorded (data, outliers) plus its split file."""
        out: dict[str, str] = {}

        def visit(obj: Any) -> None:
            if isinstance(obj, dict):
                if isinstance(obj.get("sha256"), str) and obj.get("source"):
                    out[Path(str(obj["source"])).name] = obj["sha256"]
                for v in obj.values():
                    visit(v)
            elif isinstance(obj, list):
                for v in obj:
                    visit(v)

        visit(self.config.get("lineage", self.config.get("data_lineage", {})))
        return out
