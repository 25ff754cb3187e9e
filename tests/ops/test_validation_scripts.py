"""scripts/val_accuracy.py and scripts/form_validation.py: the numbers recipe choices are made on come from
the run's own calibration split and held-out outliers, and a run without them is a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

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


def _load_choose_jpeg_bands():
    import importlib.util

    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("choose_jpeg_bands", SCRIPTS / "choose_jpeg_bands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_jpeg_bands_split_where_the_score_treats_qualities_differently():
    """A score that drops by a step at quality 50 (as re-encoding quality-75 files does) gets a band boundary
    there; a smooth score needs no boundary at all; each band's pooled threshold keeps its target."""
    bands = _load_choose_jpeg_bands()
    base = np.random.default_rng(0).normal(size=2000)
    stepped = {q: base - (1.0 if q >= 50 else 0.0) for q in range(1, 101)}
    stepped["stored"] = base - 1.0
    assert bands.choose_bands(stepped, 1.5, 75, 0.95) == [(1, 49), (50, 100)]
    flat = {q: base for q in range(1, 101)} | {"stored": base}
    assert bands.choose_bands(flat, 1.5, 75, 0.95) == [(1, 100)]
    thr = bands.band_threshold(stepped, 50, 100, 75, 0.95)
    assert abs(float(np.mean(stepped[60] >= thr)) - 0.95) < 0.005
    # the pooled quantile weighs each part by its weight, not by its size
    assert bands.pooled_threshold([np.zeros(10), np.ones(1000)], [0.5, 0.5], 0.95) == 0.0


def test_choose_jpeg_bands_runs_on_validation_data_and_prints_the_bands(tmp_path, tiny_data_dir):
    from ..training._eval_helpers import make_run

    run = make_run(tmp_path / "run", tiny_data_dir, calibration_size=60)
    split = json.loads((run / "split.json").read_text())
    split["outlier_holdout"] = {"source": str(tiny_data_dir / "tinyimagenet_outliers.npz"), "indices": list(range(50))}
    (run / "split.json").write_text(json.dumps(split))
    done = _script("choose_jpeg_bands.py", str(run), "--n", "40", "--n-out", "20", "--threads", "1",
                   "--out", str(tmp_path / "bands.json"), data_dir=tiny_data_dir)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "bands.json").read_text())
    assert result["n_in"] == 40 and result["n_out"] == 20
    covered = [q for lo, hi in result["bands"] for q in range(lo, hi + 1)]
    assert covered == list(range(1, 101))  # the bands partition the qualities, lowest first
    assert f"--jpeg-bands {','.join(f'{lo}-{hi}' for lo, hi in result['bands'])}" in done.stdout
    assert {r["quality"] for r in result["per_quality"]["chosen"]} == set(range(1, 101)) | {"stored"}
