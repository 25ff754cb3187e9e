"""Helpers for the evaluation / export / calibration tests: a tiny run directory made without training.

`make_run(root, data_dir)` writes what `oodguard train` leaves behind (config.json, split.json,
checkpoints/last.pt) for a tiny `small_cnn` with random weights, on the tiny datasets of
`tests/conftest.py::tiny_data_dir`. Random weights are enough: these tests check plumbing, parity
and bookkeeping, not accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from oodguard.training.run_dir import save_checkpoint
from oodguard.training.data import calibration_split, load_in_distribution, to_tensor
from oodguard.training.architectures import create_model

TINY_MODEL = {"name": "small_cnn", "num_classes": 10, "widths": (8, 16, 16), "stem": 8}


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model(**TINY_MODEL)
    # non-trivial BN statistics so eval-mode BN is not the identity
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _calibrate_batch_norm(model: torch.nn.Module, images: np.ndarray) -> None:
    """Set BN running statistics from data (as training would), so features vary like a trained net's
    rather than sitting almost constant on a random net's unnormalised activations."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        model(to_tensor(images))
    model.eval()


def make_run(root: Path, data_dir: Path, calibration_size: int = 100, seed: int = 0, method: str = "aloe") -> Path:
    run = Path(root)
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    model = tiny_model(seed)
    train = load_in_distribution(str(data_dir), "train")
    _calibrate_batch_norm(model, train.images[:256])
    save_checkpoint(run / "checkpoints" / "last.pt", {"model": model.state_dict(), "model_config": dict(model.model_config)})
    _, cal_idx = calibration_split(len(train), calibration_size, seed=0)
    (run / "split.json").write_text(json.dumps({
        "cal_indices": cal_idx.tolist(), "train_size": len(train), "calibration_size": calibration_size,
        "seed": 0, "dataset_sha256": train.sha256,
    }))
    (run / "config.json").write_text(json.dumps({
        "train": {"method": method, "model": "small_cnn", "data": str(data_dir), "outliers": str(data_dir),
                  "calibration_size": calibration_size},
        "model_config": dict(model.model_config),
        "lineage": {"in_distribution": train.describe()},
    }, default=list))
    return run


def float_images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32)).astype(np.float32) / 255.0)
