"""scripts/train_default.py: --widths and flip averaging reach every training stage (or --init-from would refuse
the weights; flip averaging changes only evaluation), and a malformed --widths is a CLI error naming the problem."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from ._scripts import SCRIPTS, load_script

SCRIPT = SCRIPTS / "train_default.py"


def _stage_args(monkeypatch, **overrides) -> dict[str, list[str]]:
    mod = load_script("train_default")
    seen: dict[str, list[str]] = {}
    monkeypatch.setattr(mod, "_train", lambda run, args, log: seen.setdefault(run.name, args) and 0.0)
    args = argparse.Namespace(threads=1, pretrain_epochs=15, pretrain_lr=None, widths=None, restart_epochs=3,
                              restart_lr=0.6, finetune_epochs=2, finetune_lr=0.05, flip_average=True)
    for key, value in overrides.items():
        setattr(args, key, value)
    mod.pretrain_run(Path("pretrain"), args, Path("log"))
    mod.restart_run(Path("pretrain"), Path("restart"), args, Path("log"))
    mod.finetune_run("aloe", Path("restart"), Path("aloe"), args, Path("log"))
    return seen


def _model_kwargs(stage: list[str]) -> dict | None:
    return json.loads(stage[stage.index("--model-kwargs") + 1]) if "--model-kwargs" in stage else None


def test_widths_and_flip_averaging_reach_every_stage(monkeypatch):
    seen = _stage_args(monkeypatch, widths=[128, 384, 384], pretrain_lr=1.1)
    for stage in ("pretrain", "restart", "aloe"):
        assert _model_kwargs(seen[stage]) == {"widths": [128, 384, 384], "flip_average": True}, stage
    pre = seen["pretrain"]
    assert pre[pre.index("--lr") + 1] == "1.1"


def test_default_widths_leave_the_recipe_alone(monkeypatch):
    seen = _stage_args(monkeypatch)
    assert "--lr" not in seen["pretrain"]
    assert _model_kwargs(seen["pretrain"]) == _model_kwargs(seen["aloe"]) == {"flip_average": True}
    unflipped = _stage_args(monkeypatch, flip_average=False)
    assert _model_kwargs(unflipped["pretrain"]) is None and _model_kwargs(unflipped["aloe"]) is None


def test_malformed_widths_is_a_cli_error():
    for bad in ("128,384", "a,b,c", "0,384,384"):
        done = subprocess.run([sys.executable, str(SCRIPT), "--widths", bad], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2
        assert "--widths" in done.stderr and "Traceback" not in done.stderr


def test_finetuned_must_be_a_run_directory(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "runs"), "--finetuned",
                           str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "--finetuned" in done.stderr and "not a run directory" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs" / "pretrain").exists()  # nothing trained in its place


def _fake_run(path: Path, init_from: Path | None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"train": {"init_from": str(init_from) if init_from else None}}))
    (path / "summary.json").write_text(json.dumps({"stopped": "completed"}))
    return path


def test_a_finetuned_run_is_recorded_with_the_runs_it_was_started_from(tmp_path):
    # the GPU recipe's chain: pretrain -> aloe -> restart (shipped); pretrain itself came from a run that is gone
    mod = load_script("train_default")
    pretrain = _fake_run(tmp_path / "gpu" / "pretrain", init_from=tmp_path / "gone")
    aloe = _fake_run(tmp_path / "gpu" / "aloe", init_from=pretrain)
    restart = _fake_run(tmp_path / "gpu" / "restart", init_from=aloe)
    assert mod.init_from_chain(restart) == [pretrain, aloe]
    assert mod.init_from_chain(pretrain) == []  # its source is not on disk: the chain ends there
    # a run directory without a summary (a stage that never finished) ends the chain too
    (pretrain / "summary.json").unlink()
    assert mod.init_from_chain(restart) == [aloe]
    # a run pointing at itself does not loop
    looped = _fake_run(tmp_path / "looped", init_from=tmp_path / "looped")
    assert mod.init_from_chain(looped) == []
