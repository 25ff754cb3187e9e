"""Helpers for training tests: a tiny, fast TrainConfig on the session's synthetic data directory."""

from __future__ import annotations

import pytest
import torch

# Tiny model: ~4k parameters, a few ms per step. One thread: the machine is shared, and OMP threads
# spinning against other processes are far slower than one thread.
TINY_MODEL = {"widths": [8, 16, 16], "stem": 8}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def tiny_config(tiny_data_dir, tmp_path):
    """tiny_config(**overrides) -> TrainConfig writing into tmp_path/run (unless out= is given)."""
    from oodguard.training.config import resolve_config

    def make(**overrides):
        values = dict(data=str(tiny_data_dir), outliers=str(tiny_data_dir), out=str(tmp_path / "run"),
                      calibration_size=40, batch_size=32, outlier_batch_size=64, max_steps=20,
                      model_kwargs=dict(TINY_MODEL), threads=1, progress=False, seed=3)
        values.update(overrides)
        return resolve_config("cpu", **values)

    return make
