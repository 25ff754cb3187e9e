"""scripts/train_robust.py's choice of the detector epoch, and scripts/run_from_bundle.py (a run directory
rebuilt from a bundle's graph: the same function, the same calibration split; with --flip-average, that function
averaged over mirror views)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from ._scripts import SCRIPTS, load_script


def test_the_detector_epoch_is_chosen_by_validation_auroc_under_attack(tmp_path):
    train_robust = load_script("train_robust")
    run = tmp_path / "detector"
    (run / "checkpoints").mkdir(parents=True)
    records = [{"epoch": 1, "disc_val": {"auroc_clean": 0.90, "auroc_pgd": 0.40}},
               {"epoch": 2, "disc_val": {"auroc_clean": 0.80, "auroc_pgd": 0.55}},  # the most robust
               {"epoch": 3, "disc_val": {"auroc_clean": 0.95, "auroc_pgd": 0.50}},
               {"epoch": 3.5, "disc_val": {"auroc_clean": 0.99, "auroc_pgd": 0.99}},  # a partial epoch: no checkpoint
               {"event": "end"}]
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    for epoch in (1, 2, 3):
        (run / "checkpoints" / f"epoch_{epoch:03d}.pt").write_bytes(b"")
    path, record = train_robust.best_epoch_checkpoint(run)
    assert path.name == "epoch_002.pt" and record["disc_val"]["auroc_pgd"] == 0.55
    (run / "checkpoints" / "epoch_002.pt").unlink()  # only epochs with a checkpoint can be chosen
    assert train_robust.best_epoch_checkpoint(run)[0].name == "epoch_003.pt"


def test_with_a_weight_average_the_trained_weights_can_win_and_are_written_out(tmp_path):
    train_robust = load_script("train_robust")
    run = tmp_path / "detector"
    (run / "checkpoints").mkdir(parents=True)
    records = [{"epoch": 1, "disc_val": {"auroc_clean": 0.7, "auroc_pgd": 0.30},
                "disc_val_trained_weights": {"auroc_clean": 0.8, "auroc_pgd": 0.45}},
               {"epoch": 2, "disc_val": {"auroc_clean": 0.8, "auroc_pgd": 0.40},
                "disc_val_trained_weights": {"auroc_clean": 0.9, "auroc_pgd": 0.50}}]  # the most robust
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    average, trained = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    for epoch in (1, 2):
        torch.save({"model": average, "trained_model": trained, "step": epoch}, run / "checkpoints" / f"epoch_{epoch:03d}.pt")
    path, record = train_robust.best_epoch_checkpoint(run)
    assert path.name == "epoch_002_trained.pt" and record["weights"] == "trained"
    assert record["disc_val"]["auroc_pgd"] == 0.50 and record["epoch"] == 2
    written = torch.load(path, weights_only=True)
    assert torch.equal(written["model"]["w"], trained["w"])
    assert written["step"] == 2  # the rest of the epoch's checkpoint, unchanged
    records[1]["disc_val"]["auroc_pgd"] = 0.50  # a tie between the two: the average (the run's own model) wins
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    assert train_robust.best_epoch_checkpoint(run)[0].name == "epoch_002.pt"


def test_a_composition_of_the_same_runs_is_kept_and_any_change_rebuilds_it(tmp_path):
    """train_robust.py keeps OUT/guarded (and the score choice cached in its export) on a second invocation only
    when it composes the same classifier run and byte-identical detector weights."""
    from oodguard.service.bundle import sha256_file

    train_robust = load_script("train_robust")
    classifier, checkpoint, guarded = tmp_path / "classifier", tmp_path / "epoch_007.pt", tmp_path / "guarded"
    checkpoint.write_bytes(b"weights")
    (guarded / "export").mkdir(parents=True)
    (guarded / "config.json").write_text(json.dumps({"composed": {
        "classifier": {"run_dir": str(classifier)}, "detector": {"checkpoint_sha256": sha256_file(checkpoint)}}}))
    assert not train_robust.composed_from(guarded, classifier, checkpoint)  # not exported yet
    (guarded / "export" / "model.onnx").write_bytes(b"onnx")
    assert train_robust.composed_from(guarded, classifier, checkpoint)
    assert not train_robust.composed_from(guarded, tmp_path / "other", checkpoint)
    checkpoint.write_bytes(b"other weights")
    assert not train_robust.composed_from(guarded, classifier, checkpoint)
    (guarded / "config.json").write_text("{}")  # not a composition at all
    assert not train_robust.composed_from(guarded, classifier, checkpoint)


def test_run_from_bundle_rebuilds_the_same_model_and_split(tmp_path, tiny_data_dir):
    from oodguard.cli import app
    from oodguard.training.run_dir import load_model_from_run, load_split

    from ..training._eval_helpers import float_images, make_run

    run = make_run(tmp_path / "run", tiny_data_dir)
    config = json.loads((run / "config.json").read_text())
    config["train"].update(split_seed=0, outlier_holdout=0.1)  # what `oodguard train` records
    (run / "config.json").write_text(json.dumps(config))
    runner = CliRunner()
    for args in (["export", str(run), "--scores", "energy"],
                 ["calibrate", str(run), "--score", "energy", "--out", str(tmp_path / "bundle"), "--no-tarball",
                  "--max-samples", "32"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    done = subprocess.run([sys.executable, str(SCRIPTS / "run_from_bundle.py"), str(tmp_path / "bundle"), "--out",
                           str(tmp_path / "rebuilt"), "--data-dir", str(tiny_data_dir)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    original, _ = load_model_from_run(run)
    rebuilt, rebuilt_config = load_model_from_run(tmp_path / "rebuilt")
    x = float_images(16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), original(x), atol=1e-4, rtol=0)
    assert load_split(tmp_path / "rebuilt")["cal_indices"] == load_split(run)["cal_indices"]
    assert rebuilt_config["rebuilt_from_bundle"]["parity_max_abs_logit_diff"] <= 1e-4
    again = subprocess.run([sys.executable, str(SCRIPTS / "run_from_bundle.py"), str(tmp_path / "bundle"), "--out",
                            str(tmp_path / "rebuilt")], capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "exists" in again.stderr  # never over an existing directory

    # --flip-average: the same weights, served as the mean of the image's and its mirror image's logits
    flipped_run = tmp_path / "rebuilt_flip"
    done = subprocess.run([sys.executable, str(SCRIPTS / "run_from_bundle.py"), str(tmp_path / "bundle"), "--out",
                           str(flipped_run), "--data-dir", str(tiny_data_dir), "--flip-average"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    flipped, flipped_config = load_model_from_run(flipped_run)
    assert flipped.flip_average and flipped_config["model_config"]["flip_average"]
    assert flipped_config["train"]["model_kwargs"]["flip_average"]
    with torch.no_grad():
        mirrored_mean = (rebuilt.head(rebuilt.features(x)) + rebuilt.head(rebuilt.features(torch.flip(x, dims=(3,))))) / 2
        torch.testing.assert_close(flipped(x), mirrored_mean, atol=1e-5, rtol=0)
        assert (flipped(x) - rebuilt(x)).abs().max() > 1e-3  # the option is not a no-op


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
