"""--resume continues bit-for-bit; a signal stops the run cleanly with a usable checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from oodguard.training.run_dir import load_checkpoint
from oodguard.training.trainer import train


def _weights(run_dir):
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")


@pytest.mark.parametrize("method,stop", [("aloe", 7), ("msp", 11)])  # 11 = exactly an epoch boundary
def test_resume_reproduces_the_uninterrupted_run_exactly(method, stop, tiny_config, tmp_path):
    common = dict(method=method, max_steps=16, eval_test=False, random_start=True, eps=4 / 255)
    full = train(tiny_config(out=str(tmp_path / "full"), **common))
    first = train(tiny_config(out=str(tmp_path / "split"), stop_at_step=stop, **common))
    assert first.stopped == "stop_at_step" and first.step == stop
    second = train(tiny_config(out=str(tmp_path / "split"), resume=True, **common))
    assert second.stopped == "completed" and second.step == 16
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "split")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert full.step_losses[stop:] == second.step_losses  # the same batches, attacks and updates


def test_resume_uses_the_stored_config(tiny_config, tmp_path):
    train(tiny_config(method="oe", max_steps=10, stop_at_step=4, eval_test=False, lr=0.02))
    result = train(tiny_config(method="msp", resume=True, lr=0.5))  # stored method/lr win; only operational knobs change
    assert result.config.method == "oe" and result.config.lr == 0.02 and result.step == 10


class _Killed(Exception):
    """Stands for SIGKILL: the process ends inside the loop, with no chance to save."""


def test_a_run_killed_mid_epoch_resumes_from_its_last_periodic_checkpoint_exactly(tiny_config, tmp_path, monkeypatch):
    from oodguard.training import trainer

    common = dict(method="aloe", max_steps=16, eval_test=False, random_start=True, eps=4 / 255)  # 11 steps an epoch
    full = train(tiny_config(out=str(tmp_path / "full"), **common))
    real_stop_reason = trainer._stop_reason

    def killed_after_step_8(cfg, step, *args):
        if step == 8:
            raise _Killed
        return real_stop_reason(cfg, step, *args)

    monkeypatch.setattr(trainer, "_stop_reason", killed_after_step_8)
    with pytest.raises(_Killed):
        train(tiny_config(out=str(tmp_path / "split"), save_every_steps=3, **common))
    assert _weights(tmp_path / "split")["step"] == 6  # the last multiple of 3 before the kill, mid-epoch
    monkeypatch.setattr(trainer, "_stop_reason", real_stop_reason)
    resumed = train(tiny_config(out=str(tmp_path / "split"), resume=True, **common))
    assert resumed.step == 16 and resumed.config.save_every_steps == 3  # kept: not given again
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "split")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert full.step_losses[6:] == resumed.step_losses


def test_save_every_steps_can_be_changed_or_turned_off_on_resume(tiny_config, tmp_path):
    common = dict(method="msp", max_steps=10, eval_test=False)
    train(tiny_config(stop_at_step=2, save_every_steps=4, **common))
    assert train(tiny_config(resume=True, stop_at_step=4, save_every_steps=0, **common)).config.save_every_steps == 0
    assert train(tiny_config(resume=True, **common)).config.save_every_steps == 0


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "oodguard.cli", "--log-level", "WARNING", "train", "--method", "oe",
           "--data", str(tiny_data_dir), "--outliers", str(tiny_data_dir), "--calibration-size", "40",
           "--batch-size", "32", "--outlier-batch-size", "64", "--max-steps", "100000", "--threads", "1",
           "--model-kwargs", '{"widths": [8, 16, 16], "stem": 8}', "--no-progress", "--no-eval-test", "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not ((run / "log.jsonl").exists() and (run / "log.jsonl").read_text().strip()):  # an epoch done
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "stopped (terminated)" in out and "--resume" in out
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    step = state["step"]
    assert step >= 11
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped"] == "terminated" and summary["step"] == step
    resumed = subprocess.run([sys.executable, "-m", "oodguard.cli", "--log-level", "WARNING", "train", "--out", str(run),
                              "--resume", "--stop-at-step", str(step + 3), "--no-progress"],
                             capture_output=True, text=True, timeout=120, env={**os.environ})
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == step + 3
