"""The run directory: atomic checkpoints, and the on-disk format existing runs depend on."""

from __future__ import annotations

import json

import pytest
import torch

from oodguard.training import run_dir


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    run_dir.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(run_dir.torch, "save", torn_save)
    with pytest.raises(OSError):
        run_dir.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    assert run_dir.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp files left behind


def test_the_on_disk_format_is_the_one_existing_runs_have(tiny_config, tmp_path):
    """Runs trained before (e.g. the default model's) must still resume, export, evaluate and calibrate: the
    files, their keys and the checkpoint's keys are pinned here."""
    from oodguard.training.trainer import train

    train(tiny_config(method="aloe", max_steps=12, eval_test=False))
    run = tmp_path / "run"
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == [
        "checkpoints", "checkpoints/last.pt", "config.json", "log.jsonl", "split.json", "summary.json"]
    config = json.loads((run / "config.json").read_text())
    assert list(config) == ["train", "model_config", "num_classes", "classes", "lineage", "code_version", "environment"]
    assert list(config["lineage"]) == ["in_distribution", "outliers"]
    split = json.loads((run / "split.json").read_text())
    assert list(split) == ["dataset", "dataset_sha256", "n_total", "calibration_size", "seed", "cal_indices",
                           "train_size", "outlier_holdout"]
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert list(lines[0]) == ["epoch", "step", "loss", "ce", "oe", "train_acc", "images_per_s", "lr", "time",
                              "epoch_seconds"]
    assert lines[-1] == json.loads((run / "summary.json").read_text()) and lines[-1]["event"] == "end"
    state = run_dir.load_checkpoint(run_dir.last_checkpoint_path(run))
    assert list(state) == ["format", "model", "optimizer", "scheduler", "step", "epoch", "per_rank", "model_config",
                           "config", "train_seconds", "world_size", "data_sha256"]
    assert state["format"] == run_dir.CHECKPOINT_FORMAT == 1
    assert list(state["per_rank"][0]) == ["in_stream", "rng", "attack_generator", "out_stream"]
    assert {"torch", "numpy", "python"} <= set(state["per_rank"][0]["rng"])
    assert list(state["data_sha256"]) == ["train", "outliers"]
    # and a run directory reads back through RunData as evaluate / export / calibrate open it
    opened = run_dir.RunData.open(run)
    assert opened.calibration_indices().tolist() == split["cal_indices"]
    assert opened.classes == config["classes"] and len(opened.checkpoint_sha256()) == 64
    model, _ = opened.load_model()
    assert not model.training and model.model_config == config["model_config"]


def test_a_missing_run_is_one_error_naming_the_path(tmp_path):
    with pytest.raises(run_dir.RunDirError, match="run directory not found"):
        run_dir.RunData.open(tmp_path / "nowhere")
    with pytest.raises(run_dir.RunDirError, match="checkpoint not found"):
        run_dir.load_checkpoint(tmp_path / "nowhere.pt")
    (tmp_path / "run").mkdir()
    with pytest.raises(run_dir.RunDirError, match="not a run directory"):
        run_dir.RunData.open(tmp_path / "run")
