"""The trainer: every method learns, the run directory describes itself, stops are clean."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from oodguard.training.config import METHODS
from oodguard.training.data import calibration_split
from oodguard.training.run_dir import RunDirError, load_checkpoint, load_model_from_run, load_split
from oodguard.training.trainer import train


@pytest.mark.parametrize("method", METHODS)
def test_each_method_runs_and_its_loss_falls(method, tiny_config):
    result = train(tiny_config(method=method, max_steps=24, lr=0.05))
    losses = result.step_losses
    assert result.stopped == "completed" and result.step == 24 and len(losses) == 24
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-4:]) < 0.85 * np.mean(losses[:4]), losses
    assert result.images_per_s > 0 and (result.test_accuracy is None) == (method == "disc")  # a detector has no classes


def test_oe_methods_flatten_outlier_predictions(tiny_config, tiny_data_dir, tmp_path):
    """After OE training the outliers' OE loss is near its minimum log K; after msp it is not."""
    from oodguard.training.data import load_outliers, to_tensor
    from oodguard.training.losses import oe_loss

    x_out = to_tensor(load_outliers(tiny_data_dir).images[:64])
    oe = {}
    for method in ("msp", "oe"):
        # without the upload augmentation: re-encoded as JPEG, the tiny set's uniform-noise outliers look
        # nothing like the raw noise scored here, and 30 steps are too few to learn both
        r = train(tiny_config(method=method, max_steps=30, out=str(tmp_path / f"oe-{method}"), upload_augment=False))
        with torch.no_grad():
            oe[method] = oe_loss(r.model.eval()(x_out)).item() - math.log(10)
    assert oe["oe"] < 0.5 * oe["msp"]


def test_run_directory_contents(tiny_config, tmp_path, tiny_data_dir):
    result = train(tiny_config(method="aloe", max_steps=20))
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["method"] == "aloe" and config["train"]["eps"] == pytest.approx(1 / 255)
    assert config["model_config"] == {"name": "small_cnn", "num_classes": 10, "widths": [8, 16, 16], "stem": 8}
    assert config["lineage"]["in_distribution"]["sha256"] and config["lineage"]["outliers"]["sha256"]
    assert config["lineage"]["in_distribution"]["n"] == 400 and config["classes"] == [f"c{i}" for i in range(10)]
    assert config["environment"]["torch"] == torch.__version__ and config["environment"]["threads"] == 1
    assert "code_version" in config
    split = load_split(run)
    _, cal = calibration_split(400, 40, 0)
    assert split["cal_indices"] == cal.tolist() and split["train_size"] == 360
    assert split["dataset_sha256"] == config["lineage"]["in_distribution"]["sha256"]
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if "event" not in r]
    assert [r["step"] for r in epochs] == [11, 20]  # 360 images / 32 = 11 steps per epoch; the run ends at 20
    assert {"epoch", "loss", "train_acc", "images_per_s", "lr", "time"} <= set(epochs[0])
    assert lines[-1]["event"] == "end" and lines[-1]["stopped"] == "completed"
    # the checkpoint loads with weights_only=True and rebuilds the same model
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == 20 and state["model_config"]["name"] == "small_cnn"
    model, cfg = load_model_from_run(run)
    assert not model.training and cfg["train"]["method"] == "aloe"
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), result.model.eval()(x))


def test_existing_run_dir_needs_resume_or_overwrite(tiny_config, tmp_path):
    train(tiny_config(method="msp", max_steps=3, eval_test=False))
    with pytest.raises(RunDirError, match="already exists"):
        train(tiny_config(method="msp", max_steps=3))
    (tmp_path / "run" / "notes.txt").write_text("mine")
    train(tiny_config(method="msp", max_steps=4, overwrite=True, eval_test=False))
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"  # --overwrite only removes the run's own files
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 4


class _StepClock:
    """A stand-in for the `time` module of the trainer and its loop parts: `perf_counter` reads a clock that
    moves only when a batch is fetched, by `step_seconds` each time. The time budget then sees the same step
    times on a loaded CI machine as on a quiet one (the wall-clock version of this test failed under load)."""

    def __init__(self, step_seconds: float):
        import time

        self._time, self.step_seconds, self.now = time, step_seconds, 1000.0

    def perf_counter(self) -> float:
        return self.now

    def __getattr__(self, name):  # everything else is the real module
        return getattr(self._time, name)


def test_time_budget_stops_cleanly_and_fits_the_schedule(tiny_config, tmp_path, monkeypatch):
    from oodguard.training import loop_parts, trainer

    clock = _StepClock(step_seconds=0.05)  # 1.5 s of budget = 30 steps
    next_batch = trainer._next_batch

    def timed_next_batch(*args, **kwargs):
        clock.now += clock.step_seconds
        return next_batch(*args, **kwargs)

    monkeypatch.setattr(trainer, "time", clock)
    monkeypatch.setattr(loop_parts, "time", clock)
    monkeypatch.setattr(trainer, "_next_batch", timed_next_batch)
    result = train(tiny_config(method="msp", max_steps=100_000, time_budget=1.5, eval_test=False))
    assert result.stopped in ("time_budget", "completed")
    assert result.train_seconds <= 1.5  # it stops before a step that would overrun the budget
    assert 20 <= result.step <= 30  # ... and not long before: the fitted schedule fills it
    assert result.total_steps < 100_000  # the schedule was shrunk to what fits
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == result.step
    last = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()][-2]
    assert last["step"] == result.step  # the partial epoch the budget ended in is logged too
    assert last["lr"] < 0.02  # re-fitted to the budget, the cosine got (nearly) to its end


def test_keep_epoch_checkpoints(tiny_config, tmp_path):
    train(tiny_config(method="msp", max_steps=22, keep_epoch_checkpoints=True, eval_test=False))
    ck = tmp_path / "run" / "checkpoints"
    assert load_checkpoint(ck / "epoch_001.pt")["step"] == 11
    assert load_checkpoint(ck / "epoch_002.pt")["step"] == 22 and load_checkpoint(ck / "last.pt")["step"] == 22


def test_checkpoints_of_the_first_small_cnn_still_load(tiny_config, tmp_path):
    """small_cnn first concatenated max- and mean-pooled features; runs made then still load."""
    from oodguard.training import run_dir
    from oodguard.training.architectures import create_model

    train(tiny_config(method="msp", max_steps=2, eval_test=False))
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    state = run_dir.load_checkpoint(path)
    legacy = create_model("small_cnn", widths=(8, 16, 16), stem=8, pool="maxavg").eval()
    state["model"] = legacy.state_dict()
    state["model_config"] = {"name": "small_cnn", "num_classes": 10, "widths": [8, 16, 16], "stem": 8}  # no "pool"
    run_dir.save_checkpoint(path, state)
    model, _ = load_model_from_run(tmp_path / "run")
    assert model.pool == "maxavg"
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), legacy(x))
    resumed = train(tiny_config(method="msp", max_steps=2, resume=True, stop_at_step=3))  # resume rebuilds it too
    assert resumed.model.pool == "maxavg"
    with pytest.raises(run_dir.RunDirError, match="do not fit"):
        run_dir.resolve_model_config({"name": "small_cnn", "num_classes": 10}, legacy.state_dict())


def test_airbench_recipe_whitens_from_data_and_scales_norm_bias_lr(tiny_config, tmp_path):
    """`--recipe airbench`'s pieces: the stem is set from training images before step 1 (and saved), the
    BatchNorm shifts train at lr x norm_bias_lr_scale with weight decay / scale, frozen weights stay put."""
    from oodguard.training.architectures import create_model
    from oodguard.training.trainer import _param_groups, _set_lr

    cfg = tiny_config(model="airbench", model_kwargs={"widths": [8, 8, 8]}, max_steps=6, lr=0.02,
                      norm_bias_lr_scale=64.0, weight_decay=1e-3, momentum=0.85, warmup_frac=0.5)
    result = train(cfg)
    assert result.stopped == "completed" and all(math.isfinite(v) for v in result.step_losses)
    torch.manual_seed(cfg.seed)
    untrained = create_model("airbench", num_classes=10, widths=[8, 8, 8])
    trained = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    assert not torch.equal(trained["whiten.weight"], untrained.whiten.weight)  # data_init ran ...
    torch.testing.assert_close(trained["whiten.weight"][12:], -trained["whiten.weight"][:12])  # ... and it is its output
    bn_weights = [k for k in trained if k.startswith("trunk.") and k.endswith(".weight") and trained[k].ndim == 1]
    assert bn_weights and all(torch.equal(trained[k], torch.ones_like(trained[k])) for k in bn_weights)

    groups = _param_groups(cfg, untrained)
    assert [g["lr_scale"] for g in groups] == [1.0, 64.0]
    assert groups[1]["weight_decay"] == pytest.approx(1e-3 / 64)
    bn_biases = {id(m.bias) for m in untrained.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {id(p) for p in groups[1]["params"]} == bn_biases
    assert all(p.requires_grad for g in groups for p in g["params"])  # the frozen stem and BN scales left out
    optimizer = torch.optim.SGD(groups, lr=0.1)
    assert _set_lr(optimizer, 0.01) == 0.01
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01, 0.64])
    one = _param_groups(tiny_config(), create_model("small_cnn", widths=(4, 4, 4), stem=4))
    assert len(one) == 1  # scale 1: one group, as before (older checkpoints' optimiser states still load)
