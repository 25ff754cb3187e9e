"""What a run directory says about its data: the in-distribution spec, the calibration split, and the
image sets evaluation, export and calibration need — resolved in one place.

The held-out calibration indices (split.json) index the run's in-distribution TRAIN file. From them:

- `fit_set()`          train images minus the calibration images (Mahalanobis is fitted here),
- `calibration_set()`  the calibration images (thresholds and p-values; never trained on),
- `test_set()`         the in-distribution TEST split (evaluation / validation only),
- `outlier_validation_set()`  the outlier classes held out of training (validation OOD data for choosing
                       the served score; never trained on, never a test set).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from oodguard.service.bundle import sha256_file

from . import data
from .checkpoint import CheckpointError, last_checkpoint_path, load_model_from_run, load_split, read_run_config

log = logging.getLogger(__name__)


class RunError(ValueError):
    """A run directory lacks something the command needs; the message says what and where."""


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
            raise RunError(f"{run_dir}: run directory not found")
        try:
            config = read_run_config(run_dir)
            split = load_split(run_dir)
        except CheckpointError as exc:
            raise RunError(str(exc)) from None
        spec = _lookup(config, "data", "data_spec", "in_distribution", "dataset")
        if isinstance(spec, dict):  # a lineage record {"source": ..., ...}
            spec = spec.get("spec") or spec.get("source")
        if not spec:
            raise RunError(f"{run_dir / 'config.json'}: no in-distribution data spec ('data') recorded")
        data_dir = data_dir or _lookup(config, "data_dir")
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
        try:
            return load_model_from_run(self.run_dir)
        except CheckpointError as exc:
            raise RunError(str(exc)) from None

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
            raise RunError(f"{self.run_dir / 'split.json'}: no calibration indices ('cal_indices')")
        return np.asarray(idx, dtype=np.int64)

    def calibration_set(self) -> data.ImageSet:
        train = self.train_file()
        idx = self.calibration_indices()
        if idx.size == 0:
            raise RunError(f"{self.run_dir}: the calibration split is empty (trained with --calibration-size 0?)")
        if idx.max(initial=-1) >= len(train):
            raise RunError(f"{self.run_dir / 'split.json'}: calibration index {int(idx.max())} is outside "
                           f"the training file ({len(train)} images) — was the run trained on other data?")
        expected = self.split.get("dataset_sha256")
        if expected and train.sha256 and expected != train.sha256:
            raise RunError(f"{train.source}: sha256 differs from the one recorded in split.json; "
                           "the calibration indices would point at other images")
        return train.subset(idx)

    def outlier_validation_set(self) -> data.ImageSet:
        record = self.split.get("outlier_holdout")
        if not record or not (record.get("classes") or record.get("indices")):
            raise RunError(f"{self.run_dir / 'split.json'}: no held-out outlier classes (the run was trained without "
                           "outliers or with --outlier-holdout 0); validation OOD data is needed to choose a score")
        spec = record["source"] if Path(str(record["source"])).exists() else _lookup(self.config, "outliers")
        outliers = data.load_outliers(spec or record["source"], data_dir=self.data_dir)
        if record.get("sha256") and outliers.sha256 and record["sha256"] != outliers.sha256:
            raise RunError(f"{outliers.source}: sha256 differs from the one recorded in split.json; the held-out "
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
