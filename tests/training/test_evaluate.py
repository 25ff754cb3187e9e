"""`evaluate_run` on a tiny run: outputs, attack directions, split hygiene, synthetic OOD sets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from oodguard.training.attacks import pgd_with
from oodguard.training.evaluate import ATTACK_PROTOCOLS, EvalConfig, evaluate_run, load_eval, set_key
from oodguard.training.ood_metrics import METRIC_KEYS
from oodguard.training.ood_sets import SYNTHETIC_SETS, load_ood_set, synthetic_images
from oodguard.training.run_dir import RunData
from oodguard.training.scores import SCORES as ALL_SCORES
from oodguard.training.scores import ScoreContext, attack_objective, fit_mahalanobis

# a classifier's scores (the detector's need a composed model: test_detector.py)
SCORES = [n for n in ALL_SCORES if not ALL_SCORES[n].needs_detector]

from ._eval_helpers import float_images, make_run, tiny_model

torch.set_num_threads(1)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_data_dir):
    run = make_run(tmp_path_factory.mktemp("run") / "run", tiny_data_dir)
    cfg = EvalConfig(ood=["tinyimagenet", "gaussian"], attacks=["paper"], max_samples=48, batch_size=32,
                     maha_fit_samples=200)
    report = evaluate_run(run, cfg)
    return run, report


def test_eval_json_has_every_number_and_its_config(evaluated, tiny_data_dir):
    run, report = evaluated
    # named sets resolve next to the run's --data directory
    assert report["ood_sets"]["tinyimagenet"]["source"] == str(tiny_data_dir / "tinyimagenet_test.npz")
    on_disk = json.loads((run / "eval" / "eval.json").read_text())
    assert on_disk["results"] == report["results"]
    assert report["config"]["attacks"] == ["none", "paper"]  # clean is always evaluated
    assert json.loads(json.dumps(report["attacks"]["paper"])) == {"eps": 1 / 255, "steps": 10, "step_size": 1 / 255, "random_start": False,
                                          "objectives": ["score", "log_msp", "margin", "ce_uniform"], "restarts": 2}
    assert set(report["results"]) == set(SCORES)
    for score in SCORES:
        for set_name in ("tinyimagenet", "gaussian"):
            for attack in ("none", "paper"):
                m = report["results"][score][set_name][attack]
                assert set(METRIC_KEYS) <= set(m) and m["n_in"] == 48 and m["n_out"] == 48
                assert all(0.0 <= m[k] <= 1.0 for k in METRIC_KEYS)
    assert 0.0 <= report["accuracy"]["clean"] <= 1.0 and set(report["accuracy"]["paper"]) == set(SCORES)
    assert "BPDA" in report["attack_notes"]["odin"]
    assert report["versions"]["torch"] == torch.__version__
    assert report["mahalanobis"]["fit_samples"] == 200
    assert report["in_distribution"]["n"] == 48 and report["in_distribution"]["split"] == "test"


def test_attacks_push_scores_the_right_way(evaluated):
    run, _ = evaluated
    _, raw = load_eval(RunData.open(run))
    for score in SCORES:
        clean_in, adv_in = raw[f"{score}__in__none"], raw[f"{score}__in__paper"]
        assert adv_in.mean() < clean_in.mean(), score  # inliers made to look OOD
        for set_name in ("tinyimagenet", "gaussian"):
            clean_out, adv_out = raw[f"{score}__{set_name}__none"], raw[f"{score}__{set_name}__paper"]
            assert adv_out.mean() > clean_out.mean(), (score, set_name)  # outliers made to look in


def test_markdown_and_plots(evaluated):
    run, report = evaluated
    md = (run / "eval" / "eval.md").read_text()
    assert "higher score means more in-distribution" in md
    assert "| OOD set | attack | FPR95 ↓ | AUROC ↑ | AUPR-in ↑ | AUPR-out ↑ | Det. err ↓ |" in md
    auroc = report["results"]["msp"]["gaussian"]["paper"]["auroc"]
    assert "| gaussian | paper (n = 48 + 48) | " in md and f"{100 * auroc:.2f}" in md
    assert "| gaussian | paper (OOD only) (n = 48 + 48) | " in md  # the ALOE / ATOM protocol, clean inliers
    for score in SCORES:
        assert f"## Score `{score}`" in md
        for plot in (f"roc_{score}.png", f"hist_{score}.png"):
            assert (run / "eval" / plot).read_bytes()[:8] == PNG_MAGIC
    assert (run / "eval" / "mahalanobis.npz").is_file()


def test_pgd_on_each_score_stays_in_the_ball_and_moves_the_score():
    model = tiny_model()
    x = float_images(16, seed=3)
    ctx = ScoreContext(mahalanobis=fit_mahalanobis(torch.randn(300, model.feature_dim), torch.arange(300) % 10, 10))
    attack = ATTACK_PROTOCOLS["paper"]
    for name in SCORES:
        x_adv = pgd_with(attack, lambda xa, n=name: -attack_objective(model, xa, n, ctx), x)
        assert torch.max(torch.abs(x_adv - x)) <= attack.eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
        before = attack_objective(model, x, name, ctx).detach()
        after = attack_objective(model, x_adv, name, ctx).detach()
        assert (after < before).float().mean() >= 0.8, name


def test_mahalanobis_is_fitted_without_calibration_images(tmp_path, tiny_data_dir):
    run = RunData.open(make_run(tmp_path / "run", tiny_data_dir, calibration_size=100), data_dir=None)
    fit, cal = run.fit_set(), run.calibration_set()
    assert len(fit) == len(run.train_file()) - 100 and len(cal) == 100
    fit_rows = {img.tobytes() for img in fit.images}
    assert not any(img.tobytes() in fit_rows for img in cal.images)
    assert len(run.fit_set(max_samples=50)) == 50


def test_synthetic_sets_are_fixed_and_distinct():
    for name in SYNTHETIC_SETS:
        a, b = synthetic_images(name, 20), synthetic_images(name, 20)
        assert a.dtype == np.uint8 and a.shape == (20, 32, 32, 3)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, synthetic_images(name, 20, seed=1))
    assert not np.array_equal(synthetic_images("gaussian", 5), synthetic_images("uniform", 5))
    blobs = synthetic_images("blobs", 50)
    assert np.all((blobs == 0) | (blobs >= 191)) and 0.05 < np.mean(blobs > 0) < 0.95
    gauss = synthetic_images("gaussian", 200).astype(float) / 255
    assert abs(gauss.mean() - 0.5) < 0.01 and 0.2 < gauss.std() < 0.26
    image_set = load_ood_set("uniform", max_samples=7)
    assert len(image_set) == 7 and image_set.source.startswith("synthetic:uniform")


def test_bad_config_is_a_clear_error(tmp_path, tiny_data_dir):
    run = make_run(tmp_path / "run", tiny_data_dir)
    with pytest.raises(ValueError, match="unknown attack protocol"):
        evaluate_run(run, EvalConfig(attacks=["fgsm"]))
    with pytest.raises(ValueError, match="unknown score"):
        evaluate_run(run, EvalConfig(scores=["nope"]))
    assert set_key("/data/my svhn.npz") == "my_svhn" and set_key("gaussian") == "gaussian"


def test_an_evaluation_of_other_weights_is_ignored(evaluated, tmp_path, tiny_data_dir):
    run, report = evaluated
    assert report["checkpoint_sha256"] == RunData.open(run).checkpoint_sha256()
    assert load_eval(RunData.open(run)) is not None
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(run, copy)
    make_run(copy, tiny_data_dir, seed=5)  # retrained in place: eval/ now describes other weights
    assert load_eval(RunData.open(copy)) is None


def test_user_folder_and_npz_are_ood_sets(tmp_path, make_image_folder, make_npz):
    images = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    folder = make_image_folder(tmp_path / "my_photos", images)
    npz = make_npz(tmp_path / "svhn.npz", images)
    from_folder, from_npz = load_ood_set(str(folder), max_samples=5), load_ood_set(str(npz))
    assert len(from_folder) == 5 and len(from_npz) == 12
    originals = {img.tobytes() for img in images}  # PNG is lossless: a subset of the very images written
    assert all(img.tobytes() in originals for img in from_folder.images)
    assert set_key(str(folder)) == "my_photos" and set_key(str(npz)) == "svhn"


def test_shift_tables_judge_each_form_at_its_groups_threshold(tmp_path, tiny_data_dir):
    """The default bundle is form-conditional: the evaluation's shift rows say what it accepts per form."""
    run = make_run(tmp_path / "run", tiny_data_dir)
    cfg = EvalConfig(ood=["tinyimagenet"], attacks=[], scores=["msp"], shifts=["stored", "jpeg_q30", "upscale_x2"],
                     max_samples=32, batch_size=32, plots=False)
    report = evaluate_run(run, cfg)
    shifts = report["shifts"]
    _, raw = load_eval(RunData.open(run))
    groups = shifts["form_thresholds"]["msp"]
    # only the groups the evaluated forms fall in: the stored files' quality (75), quality 30, enlarged
    assert set(groups) == {"jpeg_q75_83", "jpeg_q24_33", "larger"}
    assert len(set(groups.values())) > 1  # each group calibrated on its own renders
    expected_group = {"stored": "jpeg_q75_83", "jpeg_q30": "jpeg_q24_33", "upscale_x2": "larger"}
    for form, row in shifts["forms"].items():
        fc = row["scores"]["msp"]["form_conditional"]
        assert row["group"] == expected_group[form] and fc["threshold"] == groups[row["group"]]
        s_in, s_out = raw[f"msp__in__shift_{form}"], raw[f"msp__tinyimagenet__shift_{form}"]
        assert fc["realised_tpr"] == pytest.approx(float(np.mean(s_in >= fc["threshold"])))
        assert fc["fpr"]["tinyimagenet"] == pytest.approx(float(np.mean(s_out >= fc["threshold"])))
        one = row["scores"]["msp"]
        assert one["realised_tpr"] == pytest.approx(float(np.mean(s_in >= shifts["thresholds"]["msp"])))
    md = (run / "eval" / "eval.md").read_text()
    assert "TPR, per group" in md and "| upscale_x2 |" in md and "larger |" in md
    from oodguard.training.report import render_markdown

    assert "Note:" not in md  # a note on the shift section only when the report carries one
    noted = render_markdown({**report, "shifts": {**shifts, "note": "recomputed later"}})
    assert "Note: recomputed later" in noted and noted.index("Upload forms") < noted.index("Note: recomputed later")
