"""Calibration: the threshold rule, coverage on synthetic scores, p-value uniformity, and a real bundle."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from scipy import stats

from oodguard.service.bundle import conformal_p_values, make_session, verify_bundle
from oodguard.service.manifest import load_manifest
from oodguard.training.calibrate import CalibrateConfig, calibrate_run, operating_point_name, threshold_for_tpr
from oodguard.training.data import to_tensor
from oodguard.training.evaluate import CALIBRATION_FORMS, DEFAULT_SHIFTS, EvalConfig, evaluate_run
from oodguard.training.export import export_run, run_onnx
from oodguard.training.run_dir import RunData
from oodguard.training.shifts import render_mixed

from ._eval_helpers import make_run

torch.set_num_threads(1)


def test_threshold_rule_by_hand():
    cal = np.arange(1, 20, dtype=np.float32)  # n = 19
    assert threshold_for_tpr(cal, 0.90) == 2.0  # k = floor(0.1 * 20) = 2 -> 2nd smallest
    assert threshold_for_tpr(cal, 0.95) == 1.0  # k = floor(0.05 * 20) = 1
    with pytest.raises(ValueError, match="too few"):
        threshold_for_tpr(cal, 0.99)  # would need n >= 99
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        threshold_for_tpr(cal, 1.0)
    assert operating_point_name(0.95) == "tpr95" and operating_point_name(0.995) == "tpr99.5"


@pytest.mark.parametrize("tpr", [0.90, 0.95, 0.99])
def test_threshold_equals_the_conformal_p_value_rule_with_ties(tpr):
    rng = np.random.default_rng(int(tpr * 100))
    cal = np.sort(rng.integers(0, 30, 400).astype(np.float32))  # many ties
    thr = threshold_for_tpr(cal, tpr)
    fresh = rng.integers(-2, 32, 5000).astype(np.float32)
    accept_by_threshold = fresh >= thr
    accept_by_p_value = conformal_p_values(cal, fresh) > 1 - tpr + 1e-12
    np.testing.assert_array_equal(accept_by_threshold, accept_by_p_value)
    assert np.mean(cal >= thr) >= tpr  # at least tpr of the calibration scores pass


@pytest.mark.parametrize("tpr", [0.90, 0.95, 0.99])
def test_coverage_on_fresh_in_distribution_draws(tpr):
    rng = np.random.default_rng(7)
    n, m = 2000, 20000
    cal = np.sort(rng.normal(size=n).astype(np.float32))
    fresh = rng.normal(size=m).astype(np.float32)
    realised = np.mean(fresh >= threshold_for_tpr(cal, tpr))
    # the threshold's own randomness (~Beta, var tpr(1-tpr)/n) plus the binomial of the m fresh draws
    tol = 4 * np.sqrt(tpr * (1 - tpr) * (1 / n + 1 / m))
    assert abs(realised - tpr) <= tol, (realised, tpr, tol)


def test_marginal_guarantee_over_many_calibration_sets():
    rng = np.random.default_rng(8)
    n, m, reps, tpr = 200, 2000, 300, 0.9
    realised = []
    for _ in range(reps):
        cal = np.sort(rng.standard_t(3, size=n).astype(np.float32))
        realised.append(np.mean(rng.standard_t(3, size=m) >= threshold_for_tpr(cal, tpr)))
    mean, se = float(np.mean(realised)), float(np.std(realised) / np.sqrt(reps))
    assert tpr - 3 * se <= mean <= tpr + 1 / (n + 1) + 3 * se  # P(accept) in [tau, tau + 1/(n+1)]


def test_in_distribution_p_values_are_uniform_and_ood_ones_small():
    rng = np.random.default_rng(9)
    cal = np.sort(rng.normal(size=5000).astype(np.float32))
    p_in = conformal_p_values(cal, rng.normal(size=1000))
    assert stats.kstest(p_in, "uniform").pvalue > 0.01
    p_out = conformal_p_values(cal, rng.normal(-3.0, 1.0, size=1000))
    assert np.median(p_out) < 0.01
    # and a shifted "in-distribution" is detected as non-uniform by the same test (the test has power)
    assert stats.kstest(conformal_p_values(cal, rng.normal(0.3, 1.0, size=1000)), "uniform").pvalue < 0.01


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_data_dir):
    run = make_run(tmp_path_factory.mktemp("cal") / "run", tiny_data_dir)
    evaluate_run(run, EvalConfig(ood=["tinyimagenet", "gaussian"], attacks=["paper"], scores=["msp", "energy"],
                                 max_samples=32, batch_size=32, plots=True, certify=[1 / 255]))
    export_run(run, ["msp", "energy", "mahalanobis"])
    built = calibrate_run(run, CalibrateConfig(score="msp", max_samples=64))
    return run, built


def test_calibration_uses_the_held_out_split_through_onnxruntime(bundle):
    run, built = bundle
    root = built.bundle_dir
    cal = np.load(root / "calibration.npy", allow_pickle=False)
    assert cal.dtype == np.float32 and cal.size == 100 and np.all(np.diff(cal) >= 0)
    # the calibration images, uploaded in the default mix of forms and decoded as the service does
    images, _ = render_mixed(RunData.open(run).calibration_set().images, list(CALIBRATION_FORMS), seed=0)
    session = make_session(root / "model.onnx")
    expected = np.sort(run_onnx(session, to_tensor(images).numpy(), output_names=["msp"])["msp"])
    np.testing.assert_array_equal(cal, expected)
    manifest = built.manifest
    for op in manifest.operating_points:
        assert op.threshold == threshold_for_tpr(cal, op.target_tpr)
        assert 0.0 <= op.realised_tpr <= 1.0


def test_manifest_fields(bundle):
    run, built = bundle
    m = load_manifest(built.bundle_dir)
    assert m.model_dump(mode="json") == built.manifest.model_dump(mode="json")
    assert m.name == "small_cnn-aloe" and re.fullmatch(r"\d{8}-\d{6}", m.version)
    assert m.classes == [f"c{i}" for i in range(10)]
    assert m.input.resize == "area" and m.input.mean == (0.4914, 0.4822, 0.4465) and m.input.height == 32
    assert m.outputs == ["logits", "probs", "msp", "energy", "mahalanobis"]
    assert m.score.name == "msp" and m.score.output == "msp" and m.score.params == {"temperature": 1.0}
    assert [op.name for op in m.operating_points] == ["tpr90", "tpr95", "tpr99"] and m.default_operating_point == "tpr95"
    op = m.operating_point()
    assert set(op.fpr) == {"tinyimagenet", "gaussian", "tinyimagenet/paper", "gaussian/paper"}
    assert m.calibration.size == 100 and m.calibration.seed == 0
    assert m.metrics["evaluation"]["results"]["msp"]["gaussian"]["paper"]["auroc"] >= 0
    # certified rows travel with their description (what the rows mean, which scores were bounded)
    assert m.metrics["evaluation"]["results"]["msp"]["gaussian"]["certified_1_255"]["n_out"] == 32
    assert m.metrics["evaluation"]["certified"]["rows"] == {"certified_1_255": 1 / 255}
    assert m.metrics["validation"]["operating_points"]["tpr95"]["realised_tpr_attacked"].keys() == {"paper"}
    assert m.training["method"] == "aloe" and m.training["model"] == "small_cnn"
    assert m.training["config"]["train"]["calibration_size"] == 100
    assert set(m.lineage.datasets) >= {"cifar10_train.npz", "tinyimagenet_test.npz"}
    assert re.fullmatch(r"[0-9a-f]{64}", m.lineage.checkpoint_sha256)
    assert {"report/eval.md", "report/eval.json", "report/roc_msp.png", "report/export.json"} <= set(m.files)
    assert "report/scores.npz" not in m.files  # raw scores stay in the run, not in the shipped bundle


def test_bundle_and_archive_verify(bundle, tmp_path):
    _, built = bundle
    report = verify_bundle(built.bundle_dir)
    assert report.checks == ["schema", "hashes", "calibration", "onnx", "golden"]
    with np.load(built.bundle_dir / "golden.npz", allow_pickle=False) as golden:
        assert golden["image"].shape == (8, 3, 32, 32) and golden["msp"].shape == (8,)
    assert built.tarball == built.bundle_dir.with_name("bundle.tar.gz") and built.tarball.is_file()
    from oodguard.service.store import safe_extract_tar

    with open(built.tarball, "rb") as fh:
        root = safe_extract_tar(fh, tmp_path)
    assert verify_bundle(root).sha256 == report.sha256


def test_calibrate_errors(tmp_path, tiny_data_dir):
    run = make_run(tmp_path / "run", tiny_data_dir)
    with pytest.raises(ValueError, match="oodguard export"):
        calibrate_run(run, CalibrateConfig())
    export_run(run, ["msp"])
    with pytest.raises(ValueError, match="'energy' is not an output"):
        calibrate_run(run, CalibrateConfig(score="energy"))
    with pytest.raises(ValueError, match="--default 0.8"):
        calibrate_run(run, CalibrateConfig(default_tpr=0.8))
    split = json.loads((run / "split.json").read_text())
    split["cal_indices"] = [10_000]
    (run / "split.json").write_text(json.dumps(split))
    with pytest.raises(ValueError, match="outside the training file"):
        calibrate_run(run, CalibrateConfig())


def test_calibrate_refuses_a_model_exported_from_another_checkpoint(tmp_path, tiny_data_dir):
    run = make_run(tmp_path / "run", tiny_data_dir)
    export_run(run, ["msp"])
    make_run(run, tiny_data_dir, seed=1)  # retrained in place: a new checkpoint, the old export
    with pytest.raises(ValueError, match="exported from another checkpoint"):
        calibrate_run(run, CalibrateConfig(max_samples=16))


def test_realised_rates_per_upload_form_are_recorded(bundle):
    _, built = bundle
    forms = built.manifest.metrics["validation"]["forms"]
    assert list(forms) == list(DEFAULT_SHIFTS)
    assert built.manifest.metrics["validation"]["calibration_forms"] == list(CALIBRATION_FORMS)
    for row in forms.values():
        assert set(row["tpr95"]["fpr"]) == {"tinyimagenet"}  # real sets only: noise has no upload form
        assert 0.0 <= row["tpr95"]["realised_tpr"] <= 1.0 and row["n_in"] == 64
    # the stored form's realised TPR is the operating point's own
    assert forms["stored"]["tpr95"]["realised_tpr"] == built.manifest.operating_point("tpr95").realised_tpr


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory, tiny_data_dir):
    from oodguard.training.data import load_outliers, outlier_holdout

    run = make_run(tmp_path_factory.mktemp("auto") / "run", tiny_data_dir)
    outliers = load_outliers(str(tiny_data_dir))
    _, record = outlier_holdout(outliers, 0.25, seed=0)
    split = json.loads((run / "split.json").read_text())
    split["outlier_holdout"] = {"source": outliers.source, "sha256": outliers.sha256, **record}
    (run / "split.json").write_text(json.dumps(split))
    export_run(run, ["msp", "energy", "mahalanobis"])
    return run


def test_score_auto_compares_every_exported_score_on_validation_data(auto_run, monkeypatch):
    built = calibrate_run(auto_run, CalibrateConfig(score="auto", auto_samples=8, max_samples=32, tarball=False))
    selection = built.manifest.metrics["score_selection"]
    assert set(selection["candidates"]) == {"msp", "energy", "mahalanobis"}
    chosen = selection["chosen"]
    assert built.manifest.score.name == chosen == built.manifest.score.output
    best = min(selection["candidates"].values(), key=lambda r: r["attacked"]["fpr_at_95_tpr"])
    assert selection["candidates"][chosen]["attacked"]["fpr_at_95_tpr"] == best["attacked"]["fpr_at_95_tpr"]
    for r in selection["candidates"].values():
        assert r["attacked"]["n_in"] == 8 and r["attacked"]["n_out"] == 8
        assert r["clean"]["n_in"] == 100  # the whole calibration split
    assert "held-out outlier" in selection["ood"] and "tinyimagenet_outliers.npz" in selection["ood"]
    # the comparison is reused while nothing changed: the second calibration attacks nothing
    import oodguard.training.score_selection as sel

    monkeypatch.setattr(sel, "select_score", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = calibrate_run(auto_run, CalibrateConfig(score="auto", auto_samples=8, max_samples=32, tarball=False))
    assert again.manifest.metrics["score_selection"] == selection


def test_score_auto_under_the_strong_attack_records_it_and_does_not_reuse_a_paper_choice(auto_run, tmp_path):
    built = calibrate_run(auto_run, CalibrateConfig(score="auto", auto_attack="strong", auto_samples=4, max_samples=32,
                                                    tarball=False, out=str(tmp_path / "bundle")))
    selection = built.manifest.metrics["score_selection"]
    assert selection["attack"] == "strong" and selection["rule"].startswith("lowest FPR95 under the strong")
    assert all(r["attacked"]["n_in"] == 4 for r in selection["candidates"].values())


def test_score_auto_without_held_out_outliers_is_a_clear_error(tmp_path, tiny_data_dir):
    run = make_run(tmp_path / "run", tiny_data_dir)
    export_run(run, ["msp", "energy"])
    with pytest.raises(ValueError, match="held-out outlier classes"):
        calibrate_run(run, CalibrateConfig(score="auto", auto_samples=4, max_samples=16, tarball=False))


def test_realised_tpr_and_fpr_match_an_independent_computation(bundle):
    """Recomputed here from onnxruntime scores: TPR = in-distribution test images accepted (score >= threshold),
    FPR = OOD images accepted. An inverted comparison in calibration would swap them for 1 - rate."""
    from oodguard.training.ood_sets import load_ood_set, subsample

    run, built = bundle
    session = make_session(built.bundle_dir / "model.onnx")
    score = lambda u8: run_onnx(session, to_tensor(u8).numpy(), output_names=["msp"])["msp"]  # noqa: E731
    test = subsample(RunData.open(run).test_set(), 64, 0)
    gauss = load_ood_set("gaussian", 64, 0)
    s_in, s_out = score(test.images), score(gauss.images)
    for op in built.manifest.operating_points:
        # the stored-form test and OOD images (quality-75 JPEGs) get their band's threshold in a form-conditional bundle
        applied = op.form_thresholds["jpeg_q75_83"] if op.form_thresholds else op.threshold
        assert op.realised_tpr == pytest.approx(float(np.sum(s_in >= applied)) / len(s_in), abs=1e-12)
        assert op.fpr["gaussian"] == pytest.approx(float(np.sum(s_out >= applied)) / len(s_out), abs=1e-12)
    assert len({op.realised_tpr for op in built.manifest.operating_points}) > 1  # the points differ: not vacuous


def test_form_conditional_bundle_holds_each_groups_calibration_and_its_p_value_mean(bundle):
    """Every group's scores are in the bundle (sorted, the whole split), each point has a threshold per group
    that is that group's quantile, and the recorded mean p-value of the (stored-form) test split is the
    stored quality's group's, as the service answers it."""
    from oodguard.service.bundle import conformal_p_values
    from oodguard.service.upload_form import DEFAULT_GROUPS, FORM_RULE
    from oodguard.training.calibrate import threshold_for_tpr
    from oodguard.training.ood_sets import subsample

    run, built = bundle
    m = built.manifest
    assert set(m.calibration.forms) == set(DEFAULT_GROUPS.names) and m.metrics["validation"]["form_conditional"]
    assert m.calibration.form_rule == FORM_RULE
    scores = {g: np.load(built.bundle_dir / f.file) for g, f in m.calibration.forms.items()}
    for g, s in scores.items():
        assert s.size == m.calibration.size and np.all(np.diff(s) >= 0), g
    for op in m.operating_points:
        assert op.form_thresholds == {g: threshold_for_tpr(s, op.target_tpr) for g, s in scores.items()}
    session = make_session(built.bundle_dir / "model.onnx")
    test = subsample(RunData.open(run).test_set(), m.metrics["validation"]["test_images"], 0)
    s_test = run_onnx(session, to_tensor(test.images).numpy(), output_names=["msp"])["msp"]
    assert m.metrics["validation"]["test_p_value_mean"] == pytest.approx(
        float(np.mean(conformal_p_values(scores["jpeg_q75_83"], s_test))))
