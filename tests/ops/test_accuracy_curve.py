"""scripts/accuracy_curve.py --replot: the PNG is redrawn from the committed JSON, titled with its model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "accuracy_curve.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_replot_draws_the_png_from_the_json(tmp_path):
    points = [{"run": "pretrain", "epoch": 1, "hours": 0.1, "test_accuracy_subset": 0.5, "train_accuracy": 0.5},
              {"run": "pretrain", "epoch": "final", "hours": 0.1, "test_accuracy_full": 0.55}]
    data = tmp_path / "curve.json"
    data.write_text(json.dumps({"model": "airbench", "subset": 20, "points": points}))
    png = tmp_path / "curve.png"
    done = _run("--replot", "--out", str(data), "--png", str(png))
    assert done.returncode == 0, done.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_replot_without_its_json_or_runs_without_any_is_a_usage_error(tmp_path):
    missing = _run("--replot", "--out", str(tmp_path / "none.json"), "--png", str(tmp_path / "x.png"))
    assert missing.returncode == 2 and "--replot needs an existing --out JSON" in missing.stderr
    no_runs = _run("--out", str(tmp_path / "c.json"))
    assert no_runs.returncode == 2 and "give the run directories" in no_runs.stderr
