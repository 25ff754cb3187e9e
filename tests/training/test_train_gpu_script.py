"""scripts/train_gpu.sh (the shipped model's GPU recipe): its commands are valid `oodguard train` invocations,
its second stage fine-tunes the first and its third (the warm restart) the second. Run here on the CPU
(DEVICE=cpu), on tiny data, with seconds of budget: what it checks is the script's flags and stage wiring, not
the GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_every_stage_completes_and_each_starts_from_the_one_before(tiny_data_dir, tmp_path):
    env = {**os.environ, "RUNS": str(tmp_path), "DATA_DIR": str(tiny_data_dir), "DEVICE": "cpu",
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "EXTRA_ARGS": "--calibration-size 40 --threads 1",
           # architecture options go in MODEL_KWARGS, which keeps the flip averaging only if it says so
           "MODEL_KWARGS": '{"flip_average": true, "widths": [16, 32, 32], "stem": 16}'}
    for stage, amount in (("pretrain", "3"), ("aloe", "3"), ("restart", "1")):
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "train_gpu.sh"), stage, amount], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        summary = json.loads((tmp_path / stage / "summary.json").read_text())
        # seconds of budget on a CPU: the fitted schedule may end by the budget before it completes; the restart
        # is a number of epochs and completes
        assert summary["stopped"] in (("completed",) if stage == "restart" else ("completed", "time_budget"))
        assert summary["step"] >= 1
        assert summary["device"] == "cpu" and summary["model"] == "fast_cnn"
        assert (tmp_path / stage / "checkpoints" / "last.pt").is_file()
    train = json.loads((tmp_path / "aloe" / "config.json").read_text())["train"]
    assert train["method"] == "aloe" and Path(train["init_from"]) == tmp_path / "pretrain"
    assert train["eps"] in ("1/255", 1 / 255) and train["lambda_oe"] == 0.5
    assert (train["batch_size"], train["outlier_batch_size"]) == (128, 128)
    pretrain = json.loads((tmp_path / "pretrain" / "config.json").read_text())["train"]
    assert pretrain["method"] == "msp" and pretrain["label_smoothing"] == 0.1 and pretrain["time_budget"] == 3
    restart = json.loads((tmp_path / "restart" / "config.json").read_text())["train"]
    assert restart["method"] == "aloe" and Path(restart["init_from"]) == tmp_path / "aloe"
    assert restart["epochs"] == 1 and restart["time_budget"] is None and restart["lr"] == 0.01
    assert {k: restart[k] for k in ("eps", "lambda_oe", "batch_size", "outlier_batch_size", "crop_pad", "seed")} == \
        {k: train[k] for k in ("eps", "lambda_oe", "batch_size", "outlier_batch_size", "crop_pad", "seed")}
    for stage_train in (pretrain, train, restart):
        assert stage_train["model_kwargs"] == {"flip_average": True, "widths": [16, 32, 32], "stem": 16}

    # run again: the finished stage is kept, its checkpoint untouched; FORCE=1 trains it again
    checkpoint = tmp_path / "pretrain" / "checkpoints" / "last.pt"
    before = checkpoint.read_bytes()
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "train_gpu.sh"), "pretrain", "3"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "finished, kept" in proc.stdout and checkpoint.read_bytes() == before
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "train_gpu.sh"), "pretrain", "3"], env={**env, "FORCE": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "finished, kept" not in proc.stdout


def test_an_unknown_stage_is_a_usage_error():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "train_gpu.sh"), "finetune", "10"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "unknown stage 'finetune'" in proc.stderr


def test_every_stage_flip_averages_by_default(tmp_path):
    # the shipped recipe's model kwargs when MODEL_KWARGS is unset: the command lines, printed by a stand-in python
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_KWARGS", "EXTRA_ARGS")}
    for stage in ("pretrain", "aloe", "restart"):
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "train_gpu.sh"), stage, "60"],
                              env={**env, "RUNS": str(tmp_path / "runs"), "PYTHON": str(fake)},
                              capture_output=True, text=True, timeout=30)
        args = proc.stdout.splitlines()
        assert proc.returncode == 0 and args[args.index("--model-kwargs") + 1] == '{"flip_average": true}', proc.stdout
        assert args.count("--model-kwargs") == 1
