"""The robust detector (issue 14): `--method disc` training, `oodguard guard` composition, the `detector` score
through evaluation, export and certification."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from oodguard.cli import app
from oodguard.training.architectures import GuardedNet, create_model
from oodguard.training.attacks import pgd_linf
from oodguard.training.certify import IntervalBounds, score_upper_bounds
from oodguard.training.compose import compose_guarded
from oodguard.training.config import DISC_CLASSES, DISC_IN, DISC_OUT
from oodguard.training.run_dir import RunDirError, load_checkpoint, load_model_from_run
from oodguard.training.scores import (
    SCORES,
    ScoreContext,
    attack_objective,
    check_model_scores,
    compute_scores,
    detector_margin,
    scored_forward,
    worst_case_plan,
)
from oodguard.training.trainer import _attack, train

from ._eval_helpers import make_run

torch.set_num_threads(1)
DETECTOR = {"widths": [8, 16, 16], "stem": 8}
EPS = 8 / 255


@pytest.fixture(scope="module")
def detector_run(tiny_data_dir, tmp_path_factory):
    """A tiny detector trained for 30 steps at ε = 8/255 (PGD-2 from a random start), validated every epoch."""
    from oodguard.training.config import resolve_config

    out = tmp_path_factory.mktemp("disc") / "run"
    # the calibration split and outlier hold-out of `make_run` (calibration_size 100, split seed 0)
    cfg = resolve_config("robust_disc", data=str(tiny_data_dir), outliers=str(tiny_data_dir), out=str(out),
                         calibration_size=100, batch_size=32, outlier_batch_size=32, max_steps=30,
                         model_kwargs=dict(DETECTOR), attack_steps=2, step_size=EPS / 2, threads=1, progress=False,
                         disc_val_samples=40, seed=3)
    return train(cfg), out


def test_disc_trains_a_two_output_detector_with_a_per_epoch_pgd_validation(detector_run):
    result, out = detector_run
    assert result.stopped == "completed" and result.test_accuracy is None  # a detector has no class accuracy
    config = json.loads((out / "config.json").read_text())
    assert config["classes"] == list(DISC_CLASSES) and config["num_classes"] == 2
    assert config["train"]["method"] == "disc" and config["train"]["eps"] == pytest.approx(EPS)
    records = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "event" not in r]
    assert len(records) == 4 and all("disc_val" in r for r in records)  # 3 epochs of 9 steps, the partial 4th
    last = records[-1]["disc_val"]  # 40 calibration images; the 30 held-out outliers (10% of 300) are all there are
    assert last["n_in"] == 40 and last["n_out"] == 30 and last["attack"] == "PGD-10 both sides"
    # the synthetic outliers (noise) are easy to tell from the class images: the detector learnt that much
    assert last["auroc_clean"] > 0.9
    assert 0.0 <= last["auroc_pgd"] <= last["auroc_clean"]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["model_config"]["num_classes"] == 2


def test_the_validation_attack_is_an_attack():
    from oodguard.training.config import resolve_config
    from oodguard.training.trainer import _disc_validate

    torch.manual_seed(1)
    model = create_model("small_cnn", num_classes=2, **DETECTOR).train()
    g = torch.Generator().manual_seed(2)
    bright, dark = torch.rand(40, 3, 32, 32, generator=g) * 0.5 + 0.5, torch.rand(40, 3, 32, 32, generator=g) * 0.5
    report = _disc_validate(resolve_config("robust_disc"), model, (bright, dark), torch.device("cpu"))
    assert model.training  # left as it was found
    assert report["auroc_clean"] > 0.9  # this random net happens to give bright images the higher margin ...
    assert report["auroc_pgd"] < report["auroc_clean"] - 0.2  # ... which PGD at 8/255 on both sides undoes


def test_the_disc_training_attack_pushes_each_side_toward_the_other():
    from oodguard.training.config import resolve_config

    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=2, **DETECTOR).train()
    cfg = resolve_config("robust_disc", attack_steps=3, step_size=EPS / 2)
    x_in, x_out = torch.rand(16, 3, 32, 32), torch.rand(16, 3, 32, 32)
    y = torch.full((16,), DISC_IN, dtype=torch.long)
    adv_in, adv_out = _attack(cfg, model, model, x_in, y, x_out, torch.Generator().manual_seed(0),
                              torch.device("cpu"), amp=False)
    assert float((adv_in - x_in).abs().max()) <= EPS + 1e-6 and float((adv_out - x_out).abs().max()) <= EPS + 1e-6
    # judged as the evaluation sees the model, in eval mode (the recipe attacks that function: attack_bn "eval")
    assert cfg.attack_bn == "eval" and model.training  # the attack leaves the model in train mode
    model.eval()
    with torch.no_grad():
        # inliers are made to look like outliers (margin down), outliers like inliers (margin up)
        assert float(detector_margin(model(adv_in)).mean()) < float(detector_margin(model(x_in)).mean())
        assert float(detector_margin(model(adv_out)).mean()) > float(detector_margin(model(x_out)).mean())


def _classifier_run(root, data_dir, detector_dir, **kw):
    """A tiny classifier run that held out what the detector held out (as two runs with the same seeds do)."""
    run = make_run(root, data_dir, **kw)
    split = json.loads((run / "split.json").read_text())
    split["outlier_holdout"] = json.loads((detector_dir / "split.json").read_text())["outlier_holdout"]
    (run / "split.json").write_text(json.dumps(split))
    return run


def test_guard_composes_classifier_and_detector(detector_run, tiny_data_dir, tmp_path):
    _, det = detector_run
    clf = _classifier_run(tmp_path / "clf", tiny_data_dir, det)
    out = compose_guarded(clf, det, tmp_path / "guarded")
    model, config = load_model_from_run(out)
    classifier, _ = load_model_from_run(clf)
    detector, _ = load_model_from_run(det)
    assert isinstance(model, GuardedNet) and config["composed"]["detector"]["method"] == "disc"
    assert json.loads((out / "split.json").read_text()) == json.loads((clf / "split.json").read_text())
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), classifier(x))  # the classifier, as trained
        logits, scores = compute_scores(model, x, ["energy", "detector"], ScoreContext())
        torch.testing.assert_close(scores["detector"], detector(x)[:, DISC_IN] - detector(x)[:, DISC_OUT])
        torch.testing.assert_close(logits, classifier(x))
    # what the attacks differentiate: the score itself, computed without the classifier
    torch.testing.assert_close(attack_objective(model, x, "detector", ScoreContext()).detach(), scores["detector"])
    value, objectives = scored_forward(model, "detector", ScoreContext())(x)
    assert list(objectives) == ["score"] and torch.equal(value, objectives["score"])
    assert worst_case_plan("detector", ("score", "log_msp", "margin", "ce_uniform"), 1) == (("score",), 4)
    assert worst_case_plan("energy", ("score", "margin"), 2) == (("score", "margin"), 2)


def test_guard_refuses_mismatched_runs_and_writes_nothing(detector_run, tiny_data_dir, tmp_path):
    _, det = detector_run
    other_split = _classifier_run(tmp_path / "clf_other", tiny_data_dir, det, calibration_size=60)
    with pytest.raises(RunDirError, match="different calibration images"):
        compose_guarded(other_split, det, tmp_path / "bad")
    no_holdout = make_run(tmp_path / "clf_no_holdout", tiny_data_dir)  # trained on every outlier class
    with pytest.raises(RunDirError, match="outlier"):
        compose_guarded(no_holdout, det, tmp_path / "bad")
    clf = _classifier_run(tmp_path / "clf", tiny_data_dir, det)
    with pytest.raises(ValueError, match="not an in-vs-out detector"):
        compose_guarded(clf, clf, tmp_path / "bad")
    with pytest.raises(ValueError, match="a detector, not a classifier"):
        compose_guarded(det, det, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bad")] == []


def test_guard_cli_errors_are_usage_errors(detector_run, tmp_path):
    _, det = detector_run
    result = CliRunner().invoke(app, ["guard", "--classifier", str(tmp_path / "missing"), "--detector", str(det),
                                      "--out", str(tmp_path / "g")])
    assert result.exit_code == 2 and "run directory not found" in result.output


def test_detector_score_needs_a_detector():
    model = create_model("small_cnn", num_classes=10, **DETECTOR)
    with pytest.raises(ValueError, match="oodguard guard"):
        check_model_scores(model, ["energy", "detector"])
    check_model_scores(model, ["energy"])
    assert SCORES["detector"].needs_detector and SCORES["detector"].exportable


def test_guarded_run_evaluates_exports_and_certifies(detector_run, tiny_data_dir, tmp_path):
    from oodguard.training.evaluate import EvalConfig, evaluate_run
    from oodguard.training.export import export_run

    _, det = detector_run
    out = compose_guarded(_classifier_run(tmp_path / "clf", tiny_data_dir, det), det, tmp_path / "guarded")
    cfg = EvalConfig(ood=["tinyimagenet"], attacks=["none", "fast"], scores=["energy", "detector"], max_samples=24,
                     batch_size=24, certify=[1 / 255], plots=False, shifts=[])
    report = evaluate_run(out, cfg, tmp_path / "eval")
    per = report["results"]["detector"]["tinyimagenet"]
    assert per["none"]["n_in"] == 24 and per["certified_1_255"]["auroc"] <= per["none"]["auroc"]
    assert report["certified"]["scores"] == ["energy", "detector"]
    with np.load(tmp_path / "eval" / "scores.npz") as raw:
        assert bool((raw["detector__tinyimagenet__certified_1_255"] >= raw["detector__tinyimagenet__none"]).all())

    result = export_run(out, data_dir=str(tiny_data_dir))  # the detector is exported by default
    assert result.outputs == ["logits", "probs", "msp", "energy", "mahalanobis", "detector"]
    assert result.parity_max_abs_diff["detector"] <= 1e-4


def test_fusion_tradeoff_measures_the_bounded_fusion_on_validation_data(detector_run, tiny_data_dir, tmp_path):
    """scripts/fusion_tradeoff.py: margin + a * log msp, clean and under the strong attack plus the log-K bound."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    _, det = detector_run
    out = compose_guarded(_classifier_run(tmp_path / "clf", tiny_data_dir, det), det, tmp_path / "guarded")
    script = Path(__file__).resolve().parents[2] / "scripts" / "fusion_tradeoff.py"
    env = {**os.environ, "OODGUARD_DATA_DIR": str(tiny_data_dir), "OMP_NUM_THREADS": "1"}
    run = lambda *a: subprocess.run([sys.executable, str(script), str(out), *a], capture_output=True, text=True,  # noqa: E731
                                    timeout=300, env=env)
    bad = run("--n-clean", "20", "--n-attack", "30")
    assert bad.returncode == 1 and "--n-attack <= --n-clean" in bad.stderr and "Traceback" not in bad.stderr
    done = run("--n-clean", "24", "--n-attack", "8", "--attack-fused", "0.5", "--n-fused", "4", "--threads", "1",
               "--out", str(tmp_path / "fusion.json"), "--scores-out", str(tmp_path / "fusion.npz"))
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "fusion.json").read_text())
    assert result["n_clean"] == [24, 24] and result["n_attack"] == [8, 8] and result["strong_direct"]["n"] == [4, 4]
    rows = {r["weight"]: r for r in result["rows"]}
    assert rows[0.0]["strong_bound"] == result["detector_strong_attacked"]  # a = 0: the detector alone
    bounds = [r["strong_bound"]["auroc"] for r in result["rows"]]
    assert bounds == sorted(bounds, reverse=True)  # a larger say for the classifier can only cost under the bound
    with np.load(tmp_path / "fusion.npz") as raw:
        assert raw["clean_in_margin"].shape == (24,) and raw["strong_out_margin"].shape == (8,)
        assert bool((raw["clean_in_log_msp"] <= 0).all()) and bool((raw["clean_in_log_msp"] >= -np.log(10) - 1e-5).all())
        # the attack only pushes each side the way it is asked to
        assert bool((raw["strong_in_margin"] <= raw["clean_in_margin"][:8] + 1e-5).all())
        assert bool((raw["strong_out_margin"] >= raw["clean_out_margin"][:8] - 1e-5).all())


def test_detector_bound_contains_random_and_pgd_points(detector_run):
    _, det = detector_run
    detector, _ = load_model_from_run(det)
    for p in detector.parameters():
        p.requires_grad_(False)
    x = torch.rand(1, 3, 32, 32)
    eps = 2 / 255
    ub = float(score_upper_bounds(None, x, eps, ["detector"], detector=IntervalBounds(detector))["detector"][0])
    g = torch.Generator().manual_seed(0)
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    u = torch.rand((1000, 3, 32, 32), generator=g)
    u[500:] = (u[500:] > 0.5).float()  # vertices of the ball, where interval bounds are tightest-tested
    points = lo + u * (hi - lo)
    pgd = pgd_linf(lambda v: detector_margin(detector(v)), x, eps=eps, steps=30, step_size=eps / 4)
    with torch.no_grad():
        margins = detector_margin(detector(torch.cat([points, pgd])))
        clean = float(detector_margin(detector(x))[0])
    assert float(margins[-1]) > clean  # the attack did raise the margin ...
    assert float(margins.max()) <= ub  # ... and no point of the ball exceeds the certified bound
