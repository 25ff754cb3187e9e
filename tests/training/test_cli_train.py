"""`oodguard train`: clear errors for bad arguments and paths; a tiny run end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from oodguard.cli import app
from oodguard.training.run_dir import load_model_from_run

runner = CliRunner()
TINY = ["--model-kwargs", '{"widths": [8, 16, 16], "stem": 8}', "--calibration-size", "40", "--batch-size", "32",
        "--outlier-batch-size", "64", "--threads", "1", "--no-progress"]


def _train(*args):
    return runner.invoke(app, ["--log-level", "WARNING", "train", *args])


def _error_of(result) -> str:
    return result.stderr + result.stdout


@pytest.mark.parametrize("args,message", [
    (["--method", "fancy"], "unknown method 'fancy'; valid methods: msp, oe, adv, aoe, aloe"),
    (["--model", "vgg99"], "unknown model 'vgg99'; valid models: airbench, densenet100, fast_cnn, resnet18, small_cnn, wrn40_2"),
    (["--eps", "1/x"], "'1/x' is not a number or fraction"),
    (["--model-kwargs", "{oops"], "not valid JSON"),
    (["--recipe", "gpu"], "unknown recipe 'gpu'"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
    (["--save-every-steps", "-5"], "save_every_steps must be >= 0"),
    (["--upload-blur-p", "1.5"], "upload_blur_p must be in [0, 1]"),
    (["--upload-quality-min", "0"], "need 1 <= upload_quality_min <= upload_quality_max <= 100"),
    (["--upload-quality-min", "60", "--upload-quality-max", "50"], "need 1 <= upload_quality_min <= upload_quality_max"),
    (["--ema-decay", "1"], "ema_decay must be in [0, 1) (0: off)"),
    (["--device", "tpu0"], "unknown device 'tpu0'; use auto, cpu, cuda or cuda:N"),
])
def test_bad_arguments_fail_with_a_message(args, message, tmp_path):
    result = _train(*args, "--out", str(tmp_path / "run"))
    assert result.exit_code == 2 and message in _error_of(result)
    assert "Traceback" not in _error_of(result)
    assert not (tmp_path / "run").exists()


def test_missing_data_paths_are_named(tmp_path):
    result = _train("--data-dir", str(tmp_path / "no-such-dir"), "--out", str(tmp_path / "run"))
    assert result.exit_code == 2 and str(tmp_path / "no-such-dir" / "cifar10_train.npz") in _error_of(result)
    result = _train("--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run"))
    assert result.exit_code == 2 and "no such dataset file or directory" in _error_of(result)
    assert not (tmp_path / "run").exists()  # nothing written when the data is not there


def test_model_help_names_every_registered_architecture():
    import inspect

    from oodguard.training.architectures import list_architectures
    from oodguard.training.cli_train import train_command

    help_text = inspect.signature(train_command).parameters["model"].default.help
    assert all(name in help_text for name in list_architectures()), help_text


def test_missing_outliers_are_named(tiny_data_dir, tmp_path):
    result = _train("--method", "aloe", "--data", str(tiny_data_dir), "--outliers", str(tmp_path / "nope.npz"),
                    "--out", str(tmp_path / "run"), *TINY)
    assert result.exit_code == 2 and "nope.npz" in _error_of(result)


def test_tiny_run_end_to_end_then_clear_errors_for_reuse(tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    result = _train("--method", "aloe", "--data", str(tiny_data_dir), "--outliers", str(tiny_data_dir),
                    "--max-steps", "12", "--out", str(run), *TINY)
    assert result.exit_code == 0, _error_of(result)
    assert "images/s:" in result.stdout and "stopped (completed) at step 12/12" in result.stdout
    assert "test accuracy: 0." in result.stdout or "test accuracy: 1." in result.stdout
    model, config = load_model_from_run(run)
    assert config["train"]["method"] == "aloe" and config["train"]["data"] == str(tiny_data_dir)
    assert json.loads((run / "summary.json").read_text())["images_per_s"] > 0
    # the same --out again: refused with advice
    again = _train("--data", str(tiny_data_dir), "--out", str(run), *TINY)
    assert again.exit_code == 2 and "--resume" in _error_of(again) and "--overwrite" in _error_of(again)
    # --resume may not silently change the recipe
    changed = _train("--out", str(run), "--resume", "--lr", "0.5")
    assert changed.exit_code == 2 and "--lr (run: 0.1, given: 0.5)" in _error_of(changed)


def test_resume_without_a_checkpoint(tmp_path):
    result = _train("--out", str(tmp_path / "never"), "--resume")
    assert result.exit_code == 2 and "checkpoint not found" in _error_of(result)


def test_help_shows_recipe_defaults():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for text in ("--time-budget", "--recipe", "small_cnn; fast recipe: fast_cnn; airbench recipe: airbench; paper recipe: densenet100", "0.00392157", "aloe"):
        assert text in result.stdout


def test_importing_the_train_command_does_not_import_torch():
    code = "import sys, oodguard.training.cli_train; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
