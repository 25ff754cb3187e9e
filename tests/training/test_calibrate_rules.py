"""Calibration's rules as small pure functions, checked by hand in milliseconds (no model, no run).

What a bundle records per operating point - realised TPR on the test split, FPR per OOD set clean and
attacked, TPR under attack, the rate on the calibration split - and per upload form, and which
settings `CalibrateConfig` refuses. The end-to-end path (a real run through onnxruntime) is
test_calibrate.py; these are what `make mutation` runs against training/calibrate.py.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone

import numpy as np
import pytest

from oodguard.service.upload_form import DEFAULT_GROUPS, FormGroups
from oodguard.training.calibrate import CalibrateConfig, _accept_rate, _operating_points, _per_form, operating_point_name
from oodguard.training.shifts import render_form


def test_accept_rate_counts_the_threshold_itself_as_accepted():
    assert _accept_rate(np.array([1.0, 2.0, 3.0, 4.0]), 2.0) == 0.75
    assert _accept_rate(np.array([1.0, 2.0]), 2.5) == 0.0
    assert isinstance(_accept_rate(np.array([1.0]), 0.0), float)


def test_operating_points_by_hand():
    thresholds = {0.9: 2.0, 0.95: 1.0}
    cal = np.array([0.0, 1.0, 2.0, 3.0], dtype=np.float32)
    test = np.array([0.5, 1.0, 1.5, 2.0, 3.0])
    ood = {"gaussian": np.array([0.0, 1.0, 2.5]), "tinyimagenet": np.array([3.0, 0.0])}
    attacked = {
        ("in", "paper"): np.array([0.9, 1.0, 2.0]),
        ("tinyimagenet", "paper"): np.array([1.0, 3.0, 0.1, 0.2]),
        ("tinyimagenet", "strong"): np.array([2.0, 0.1]),
    }
    points, validation = _operating_points(thresholds, cal, test, ood, attacked)

    assert [p.name for p in points] == ["tpr90", "tpr95"]
    tpr90, tpr95 = points
    assert (tpr90.target_tpr, tpr90.threshold, tpr95.target_tpr, tpr95.threshold) == (0.9, 2.0, 0.95, 1.0)
    assert tpr90.realised_tpr == 2 / 5 and tpr95.realised_tpr == 4 / 5  # a score equal to the threshold counts
    assert tpr90.fpr == {"gaussian": 1 / 3, "tinyimagenet": 1 / 2, "tinyimagenet/paper": 1 / 4, "tinyimagenet/strong": 1 / 2}
    assert tpr95.fpr == {"gaussian": 2 / 3, "tinyimagenet": 1 / 2, "tinyimagenet/paper": 2 / 4, "tinyimagenet/strong": 1 / 2}

    assert set(validation) == {"tpr90", "tpr95"}
    assert validation["tpr90"] == {
        "threshold": 2.0, "target_tpr": 0.9, "calibration_tpr": 2 / 4, "realised_tpr": 2 / 5, "fpr": tpr90.fpr,
        "realised_tpr_attacked": {"paper": 1 / 3}, "applied_threshold_stored_form": 2.0, "form_thresholds": None,
    }
    assert validation["tpr95"]["calibration_tpr"] == 3 / 4
    assert validation["tpr95"]["realised_tpr_attacked"] == {"paper": 2 / 3}


def test_operating_points_without_attacks():
    points, validation = _operating_points({0.5: 1.0}, np.array([0.0, 1.0]), np.array([1.0, 0.0]), {"g": np.array([2.0])}, {})
    assert points[0].name == "tpr50" and points[0].fpr == {"g": 1.0} and points[0].realised_tpr == 0.5
    assert validation["tpr50"]["realised_tpr_attacked"] == {}


def test_rates_per_upload_form_are_the_forms_own():
    rng = np.random.default_rng(0)
    test = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    ood = {"tinyimagenet": type("Set", (), {"images": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)})()}
    calls = []

    def served(images: np.ndarray) -> np.ndarray:  # brightness as the "score"
        calls.append(images.shape)
        return images.reshape(len(images), -1).mean(axis=1) / 255.0

    thresholds = {0.9: 0.49, 0.95: 0.5}
    out = _per_form(served, test, ood, thresholds, None, ["png", "jpeg_q30"], DEFAULT_GROUPS)
    assert list(out) == ["png", "jpeg_q30"]
    for form in ("png", "jpeg_q30"):
        s_in, s_out = served(render_form(test, form)), served(render_form(ood["tinyimagenet"].images, form))
        assert out[form]["n_in"] == 6
        for tpr, thr in thresholds.items():
            entry = out[form][operating_point_name(tpr)]
            assert entry == {"threshold": thr, "realised_tpr": float(np.mean(s_in >= thr)),
                             "fpr": {"tinyimagenet": float(np.mean(s_out >= thr))}}
    jpeg = served(render_form(test, "jpeg_q30"))
    assert not np.array_equal(jpeg, served(test))  # the forms really differ: each was rendered, not reused


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tprs": [0.9, 1.0]}, r"must be in \(0, 1\)"),
        ({"tprs": [0.0, 0.9], "default_tpr": 0.9}, r"must be in \(0, 1\)"),
        ({"tprs": []}, r"must be in \(0, 1\)"),
        ({"tprs": [0.9], "default_tpr": 0.95}, "is not one of the --tpr values"),
        ({"calibration_forms": []}, r"^--calibration-forms: give at least one form \(e.g. stored\)$"),
        ({"calibration_forms": ["sepia"]}, "unknown upload form"),
        ({"validation_forms": ["sepia"]}, "unknown upload form"),
        ({"auto_samples": 0}, r"^--auto-samples must be >= 1$"),
        ({"auto_attack": "fast"}, r"^--auto-attack must be 'paper' or 'strong', got 'fast'$"),
    ],
)
def test_config_refuses(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CalibrateConfig(**kwargs).validate()


def test_config_normalises(monkeypatch):
    monkeypatch.setenv("TZ", "Etc/GMT-9")  # local time 9 h ahead of UTC: the default version must still be UTC
    time.tzset()
    try:
        cfg = CalibrateConfig(tprs=[0.99, 0.9, 0.95, 0.9], default_tpr=0.95, auto_samples=1)
        before = datetime.now(timezone.utc)
        cfg.validate()
        after = datetime.now(timezone.utc)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert cfg.tprs == [0.9, 0.95, 0.99]
    assert re.fullmatch(r"\d{8}-\d{6}", cfg.version)  # a UTC timestamp when none is given
    stamp = datetime.strptime(cfg.version, "%Y%m%d-%H%M%S").replace(tzinfo=timezone.utc)
    assert before.replace(microsecond=0) <= stamp <= after
    kept = CalibrateConfig(version="v7")
    kept.validate()
    assert kept.version == "v7"


# -- threshold_for_tpr where (1 - tau)(n + 1) is near an integer or has a fractional part >= .5 (the
# mutation run found the sizes used elsewhere, 19 / 200 / 400 / 2000, blind to the rounding of k)


def test_threshold_for_tpr_k_at_its_boundaries():
    from oodguard.training.calibrate import threshold_for_tpr

    assert threshold_for_tpr(np.arange(15.0), 0.9) == 0.0  # (0.1)(16) = 1.6: k = 1, not the rounded 2
    with pytest.raises(ValueError, match="too few"):
        threshold_for_tpr(np.arange(18.0), 0.95)  # (0.05)(19) = 0.95: k = 0
    assert threshold_for_tpr(np.arange(19.0), 0.95) == 0.0  # (0.05)(20) = 1 despite float error: k = 1
    assert threshold_for_tpr(np.arange(9.0), 0.90000000001) == 0.0  # (1 - tau)(10) = 1 - 1e-10: 9 decimals say 1
    with pytest.raises(ValueError, match=r"^19 calibration scores are too few for a TPR of 0.99: need at least 99$"):
        threshold_for_tpr(np.arange(19.0), 0.99)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match=rf"^target TPR must be in \(0, 1\), got {bad}$"):
            threshold_for_tpr(np.arange(100.0), bad)


def test_form_conditional_points_apply_the_stored_forms_group_threshold_to_stored_images_and_keep_every_group():
    groups = {"native": 0.0, "jpeg_q1_48": 0.1, "jpeg_q49_72": 0.2, "jpeg_q73_83": 1.0, "jpeg_q84_100": 0.3,
              "smaller": 2.0, "larger": 3.0}
    points, validation = _operating_points({0.95: 2.0}, np.array([0.0, 1.0, 2.0]), np.array([0.5, 1.0, 2.0, 3.0]),
                                           {"g": np.array([1.5, 0.0])}, {("in", "paper"): np.array([1.0, 0.0])},
                                           form_thresholds={0.95: groups}, stored_group="jpeg_q73_83")
    op = points[0]
    assert op.threshold == 2.0 and op.form_thresholds == groups  # the mix's threshold kept for reference
    assert op.realised_tpr == 3 / 4 and op.fpr == {"g": 1 / 2}  # at the stored group's threshold 1.0, not 2.0
    assert validation["tpr95"]["realised_tpr_attacked"] == {"paper": 1 / 2}
    assert validation["tpr95"]["applied_threshold_stored_form"] == 1.0


def test_rates_per_upload_form_use_the_forms_group_threshold():
    rng = np.random.default_rng(1)
    test = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    ood = {"t": type("Set", (), {"images": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)})()}
    served = lambda images: images.reshape(len(images), -1).mean(axis=1) / 255.0  # noqa: E731
    bands = FormGroups(((1, 29), (30, 30), (31, 100)))
    groups = {"native": 0.0, "jpeg_q1_29": 0.9, "jpeg_q30_30": 1.1, "jpeg_q31_100": 0.9, "smaller": 0.9, "larger": 0.9}
    out = _per_form(served, test, ood, {0.95: 0.5}, {0.95: groups}, ["png", "jpeg_q30", "upscale_x2"], bands)
    assert [out[f]["group"] for f in out] == ["native", "jpeg_q30_30", "larger"]
    assert out["png"]["tpr95"] == {"threshold": 0.0, "realised_tpr": 1.0, "fpr": {"t": 1.0}}
    assert out["jpeg_q30"]["tpr95"] == {"threshold": 1.1, "realised_tpr": 0.0, "fpr": {"t": 0.0}}
