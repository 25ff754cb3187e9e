"""The run directory: atomic checkpoints, and the on-disk format existing runs depend on."""

from __future__ import annotations

import json

import pytest
import torch

from oodguard.training import run_dir

from ..conftest import CLASSES, synthetic_class_images, write_image_npz


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


def test_a_run_trained_on_another_machine_finds_its_data_here(tiny_config, tiny_data_dir, tmp_path, monkeypatch):
    """A run trained on a GPU host records that host's --data-dir (/tmp/ds, say). Here that directory does not
    exist: the default data directory is used instead, and split.json's sha256 still checks the images."""
    from oodguard.training.trainer import train

    train(tiny_config(method="msp", data="cifar10", data_dir=str(tiny_data_dir), max_steps=2, eval_test=False))
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["data_dir"] == str(tiny_data_dir)
    config["train"]["data_dir"] = str(tmp_path / "gpu-host" / "ds")  # as if trained elsewhere
    (run / "config.json").write_text(json.dumps(config))
    n_cal = len(json.loads((run / "split.json").read_text())["cal_indices"])

    monkeypatch.setenv("OODGUARD_DATA_DIR", str(tiny_data_dir))  # this machine's default data directory
    opened = run_dir.RunData.open(run)
    assert opened.data_dir is None  # not the other machine's directory: the default one
    assert len(opened.calibration_set()) == n_cal
    # a directory given explicitly, or a recorded one that exists, is used as before
    assert run_dir.RunData.open(run, data_dir=str(tiny_data_dir)).data_dir == str(tiny_data_dir)
    config["train"]["data_dir"] = str(tiny_data_dir)
    (run / "config.json").write_text(json.dumps(config))
    assert run_dir.RunData.open(run).data_dir == str(tiny_data_dir)
    # and other images under the same name are refused, whatever directory they come from
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    x, y = synthetic_class_images(400, seed=7)
    write_image_npz(elsewhere / "cifar10_train.npz", x, y, CLASSES)
    config["train"]["data_dir"] = str(tmp_path / "gpu-host" / "ds")
    (run / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("OODGUARD_DATA_DIR", str(elsewhere))
    with pytest.raises(run_dir.RunDirError, match="sha256 differs"):
        run_dir.RunData.open(run).calibration_set()
