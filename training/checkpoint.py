"""Checkpoints and run directories.

A checkpoint is a dict of tensors and plain Python containers only, so `torch.load(weights_only=True)`
reads it (no pickle of arbitrary objects). It is written atomically: temp file in the same directory,
fsync, `os.replace`, fsync of the directory — a crash leaves either the old or the new file, never a
torn one.

Run directory layout (`--out runs/NAME`)::

    config.json              {"train": resolved TrainConfig, "model_config", "num_classes", "classes",
                              "lineage": {"in_distribution", "outliers"} (source, sha256, n), "code_version", "environment"}
    split.json               held-out calibration indices into the training file (+ seed, size, sha256)
    log.jsonl                one JSON line per epoch (and a final summary line)
    checkpoints/last.pt      latest state (every epoch, and on Ctrl-C / SIGTERM / budget end)
    checkpoints/epoch_XXX.pt optional per-epoch copies
"""

from __future__ import annotations


import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodguard.service.atomic import atomic_write, atomic_write_text
from oodguard.service.bundle import sha256_file

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SPLIT_FILE = "split.json"
LOG_FILE = "log.jsonl"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"


class CheckpointError(ValueError):
    """A checkpoint or run directory is missing or unreadable; the message names the path."""


def last_checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """torch.save to a temp file next to `path`, fsync, then atomically replace `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        torch.save(state, f)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError / UnpicklingError / EOFError / zipfile errors
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def _read_run_json(path: Path, missing: str, what: str) -> dict[str, Any]:
    """A run directory's JSON file; a missing or unreadable one is a CheckpointError naming the path."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {missing}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable {what} ({exc})") from None


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    return _read_run_json(Path(run_dir) / CONFIG_FILE, f"not a run directory (no {CONFIG_FILE})", "run config")


# Model configs whose architecture default changed after checkpoints existed: kwargs that rebuild the
# old architecture, tried in order when a checkpoint's weights do not fit the current default.
_LEGACY_MODEL_KWARGS = {"small_cnn": ({"pool": "maxavg"},)}


def resolve_model_config(model_config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The model_config that builds a model `state_dict` loads into (the recorded one, or a legacy variant)."""
    from .architectures import create_model

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
    raise CheckpointError(f"checkpoint weights do not fit model {model_config}: {first_error}")


def load_model_from_run(run_dir: str | Path, map_location: str | torch.device = "cpu", checkpoint: str | Path | None = None):
    """(model in eval mode, run config dict) from `run_dir/checkpoints/last.pt` (or `checkpoint`).

    The config dict is `config.json` (training config, model_config, data lineage, code version).
    """
    from .architectures import create_model  # local: keep this module importable without building models

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: run directory not found")
    ckpt_path = Path(checkpoint) if checkpoint is not None else last_checkpoint_path(run_dir)
    state = load_checkpoint(ckpt_path, map_location=map_location)
    try:
        config = read_run_config(run_dir)
    except CheckpointError:
        config = {"train": state.get("config", {}), "model_config": state.get("model_config", {})}
    model_config = resolve_model_config(dict(state["model_config"]), state["model"])
    model = create_model(**model_config)
    model.load_state_dict(state["model"])
    model.to(map_location)
    model.eval()
    return model, config


def load_split(run_dir: str | Path) -> dict[str, Any]:
    """split.json: {"cal_indices", "train_size", "calibration_size", "seed", "dataset_sha256", ...}."""
    return _read_run_json(Path(run_dir) / SPLIT_FILE, "run has no calibration split file", "split file")


# -- RNG state as tensors / plain containers (weights_only-loadable) ----------------------------------


def capture_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def load_initial_weights(model, source: str | Path, split: dict[str, Any]) -> dict[str, Any]:
    """Copy the weights of `source` (a run directory or a .pt checkpoint) into `model` for fine-tuning.

    Refuses a run whose calibration split differs from this run's: the starting weights would have
    trained on images this run holds out for calibration. Returns a lineage record for config.json.
    """
    source = Path(source)
    if source.is_dir():
        theirs = load_split(source)
        if sorted(theirs.get("cal_indices", [])) != sorted(split.get("cal_indices", [])) or \
                theirs.get("dataset_sha256") != split.get("dataset_sha256"):
            raise CheckpointError(f"--init-from {source}: its calibration split differs from this run's, so its "
                                  "weights were trained on this run's calibration images; use the same data, "
                                  "--calibration-size and --split-seed")
        mine_held, theirs_held = split.get("outlier_holdout"), theirs.get("outlier_holdout")
        if mine_held and theirs_held and (mine_held.get("classes"), mine_held.get("indices")) != \
                (theirs_held.get("classes"), theirs_held.get("indices")):
            raise CheckpointError(f"--init-from {source}: it held out other outlier classes than this run, so its "
                                  "weights were trained on this run's validation outliers; use the same "
                                  "--outlier-holdout and --split-seed")
        path = last_checkpoint_path(source)
    else:
        path = source  # a bare checkpoint: the caller vouches for its training data
    state = load_checkpoint(path, map_location="cpu")
    theirs_config = resolve_model_config(dict(state["model_config"]), state["model"])
    if theirs_config != model.model_config:
        raise CheckpointError(f"--init-from {source}: its model {theirs_config} is not this run's {model.model_config} "
                              "(pass the same --model / --model-kwargs)")
    model.load_state_dict(state["model"])
    return {"checkpoint": str(path.resolve()), "sha256": sha256_file(path), "step": int(state.get("step", 0)),
            "method": (state.get("config") or {}).get("method")}
