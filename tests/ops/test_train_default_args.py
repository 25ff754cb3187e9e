"""scripts/train_default.py: --widths reaches every training stage (or --init-from would refuse the weights),
flip averaging only the served fine-tune, and a malformed --widths is a CLI error naming the problem."""

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


def test_widths_reach_every_stage_and_flip_averaging_only_the_fine_tune(monkeypatch):
    seen = _stage_args(monkeypatch, widths=[128, 384, 384], pretrain_lr=1.1)
    assert _model_kwargs(seen["pretrain"]) == {"widths": [128, 384, 384]}
    assert _model_kwargs(seen["restart"]) == {"widths": [128, 384, 384]}
    assert _model_kwargs(seen["aloe"]) == {"widths": [128, 384, 384], "flip_average": True}
    pre = seen["pretrain"]
    assert pre[pre.index("--lr") + 1] == "1.1"


def test_default_widths_leave_the_recipe_alone(monkeypatch):
    seen = _stage_args(monkeypatch)
    assert _model_kwargs(seen["pretrain"]) is None and "--lr" not in seen["pretrain"]
    assert _model_kwargs(seen["aloe"]) == {"flip_average": True}
    assert _model_kwargs(_stage_args(monkeypatch, flip_average=False)["aloe"]) is None


def test_malformed_widths_is_a_cli_error():
    for bad in ("128,384", "a,b,c", "0,384,384"):
        done = subprocess.run([sys.executable, str(SCRIPT), "--widths", bad], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2
        assert "--widths" in done.stderr and "Traceback" not in done.stderr
