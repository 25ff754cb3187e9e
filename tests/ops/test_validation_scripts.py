"""scripts/val_accuracy.py and scripts/form_validation.py: the numbers recipe choices are made on come from
the run's own calibration split and held-out outliers, and a run without them is a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _script(name: str, *args: str, data_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OODGUARD_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=300,
                          env=env)


def test_val_accuracy_reports_the_calibration_split_one_view_flipped_and_translated(tmp_path, tiny_data_dir):
    from ..training._eval_helpers import make_run

    run = make_run(tmp_path / "run", tiny_data_dir, calibration_size=60)
    done = _script("val_accuracy.py", str(run), "--test", "--translate", "--out", str(tmp_path / "acc.json"),
                   "--threads", "1", data_dir=tiny_data_dir)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads((tmp_path / "acc.json").read_text())
    assert row["validation_images"] == 60
    for key in ("validation_accuracy_one_view", "validation_accuracy_flip", "validation_accuracy_flip_translate",
                "test_accuracy_one_view", "test_accuracy_flip"):
        assert 0.0 <= row[key] <= 1.0
    assert "n=60" in done.stdout


def test_form_validation_judges_each_form_at_its_own_tpr95_and_needs_held_out_outliers(tmp_path, tiny_data_dir):
    from ..training._eval_helpers import make_run

    run = make_run(tmp_path / "run", tiny_data_dir, calibration_size=60)
    missing = _script("form_validation.py", str(run), "--n", "40", data_dir=tiny_data_dir)
    assert missing.returncode == 1 and "no held-out outlier classes" in missing.stderr
    assert "Traceback" not in missing.stderr

    split = json.loads((run / "split.json").read_text())
    split["outlier_holdout"] = {"source": str(tiny_data_dir / "tinyimagenet_outliers.npz"), "indices": list(range(50))}
    (run / "split.json").write_text(json.dumps(split))
    done = _script("form_validation.py", str(run), "--n", "40", "--forms", "stored,jpeg_q30,upscale_x2", "--threads",
                   "1", "--out", str(tmp_path / "forms.json"), data_dir=tiny_data_dir)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads((tmp_path / "forms.json").read_text())
    assert row["n_in"] == 40 and row["n_out"] == 40 and set(row["forms"]) == {"stored", "jpeg_q30", "upscale_x2"}
    for form in row["forms"].values():
        assert 0.0 <= form["fpr_at_own_tpr95"] <= 1.0 and 0.0 <= form["auroc"] <= 1.0
    worst = max(f["fpr_at_own_tpr95"] for f in row["forms"].values())
    assert abs(row["fpr_spread_points"] - 100 * (worst - row["forms"]["stored"]["fpr_at_own_tpr95"])) < 1e-9


def test_val_attack_attacks_both_validation_sides_and_needs_held_out_outliers(tmp_path, tiny_data_dir):
    from ..training._eval_helpers import make_run

    run = make_run(tmp_path / "run", tiny_data_dir, calibration_size=60)
    missing = _script("val_attack.py", str(run), "--n", "20", data_dir=tiny_data_dir)
    assert missing.returncode == 1 and "no held-out outlier classes" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad = _script("val_attack.py", str(run), "--n", "0", data_dir=tiny_data_dir)
    assert bad.returncode == 1 and "--n must be >= 1" in bad.stderr

    split = json.loads((run / "split.json").read_text())
    split["outlier_holdout"] = {"source": str(tiny_data_dir / "tinyimagenet_outliers.npz"), "indices": list(range(50))}
    (run / "split.json").write_text(json.dumps(split))
    done = _script("val_attack.py", str(run), "--n", "20", "--threads", "1", "--out", str(tmp_path / "attack.json"),
                   data_dir=tiny_data_dir)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads((tmp_path / "attack.json").read_text())
    assert row["n_in"] == 20 and row["n_out"] == 20 and row["attack"] == "paper"
    # the worst-case attack pushes inliers down and outliers up: it never makes the two sets easier to tell apart
    assert row["attacked"]["auroc"] <= row["clean"]["auroc"] + 1e-9
    assert row["attacked"]["fpr_at_95_tpr"] >= row["clean"]["fpr_at_95_tpr"] - 1e-9
