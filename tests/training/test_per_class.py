"""Per-class operating points: class-conditional conformal thresholds (pure functions), the manifest
fields (old bundles unchanged), `oodguard calibrate --per-class` end to end, and the service applying
the predicted class's threshold on /v1 and /v2 alike."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from oodguard.service.bundle import verify_bundle, write_manifest
from oodguard.service.manifest import BundleManifest, OperatingPoint, load_manifest
from oodguard.training import per_class
from oodguard.training.calibrate import CalibrateConfig, calibrate_run, threshold_for_tpr
from oodguard.training.export import export_run

from ._eval_helpers import make_run

torch.set_num_threads(1)


def _scores(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two classes: class 1 is 'hard' (its in-distribution scores are lower)."""
    predicted = rng.integers(0, 2, n)
    scores = rng.normal(np.where(predicted == 0, 2.0, 0.0), 1.0).astype(np.float32)
    return scores, predicted


def test_per_class_thresholds_give_each_class_its_target_tpr():
    rng = np.random.default_rng(0)
    cal, test = _scores(rng, 4000), _scores(rng, 20000)
    glob = threshold_for_tpr(np.sort(cal[0]), 0.95)
    # One global threshold: the hard class is rejected far more often than 5%.
    global_tpr = per_class.class_tpr(*test, [glob, glob], 2)
    assert global_tpr[0] > 0.98 and global_tpr[1] < 0.90
    thresholds, sizes = per_class.class_thresholds(*cal, 2, 0.95, threshold_for_tpr)
    assert sizes == [int(np.sum(cal[1] == 0)), int(np.sum(cal[1] == 1))]
    for c in (0, 1):  # each class's threshold is the global rule on that class's calibration scores
        assert thresholds[c] == threshold_for_tpr(np.sort(cal[0][cal[1] == c]), 0.95)
    assert all(0.94 <= t <= 0.96 for t in per_class.class_tpr(*test, thresholds, 2))


def test_a_class_with_too_few_calibration_images_falls_back_to_the_global_threshold():
    scores = np.linspace(0, 1, 60, dtype=np.float32)
    predicted = np.array([0] * 55 + [1] * 5)  # 5 images cannot calibrate TPR 0.95 (needs >= 19)
    thresholds, sizes = per_class.class_thresholds(scores, predicted, 3, 0.95, threshold_for_tpr)
    glob = threshold_for_tpr(np.sort(scores), 0.95)
    assert sizes == [55, 5, 0] and thresholds[1] == glob and thresholds[2] == glob and thresholds[0] != glob
    assert per_class.class_tpr(scores, predicted, thresholds, 3)[2] is None


def test_per_class_point_records_thresholds_rates_and_sizes():
    rng = np.random.default_rng(1)
    cal, test = _scores(rng, 2000), _scores(rng, 2000)
    ood = {"noise": (rng.normal(-3, 1, 500).astype(np.float32), rng.integers(0, 2, 500))}
    base = OperatingPoint(name="tpr95", target_tpr=0.95, threshold=threshold_for_tpr(np.sort(cal[0]), 0.95))
    point = per_class.per_class_point(base, cal, test, ood, 2, threshold_for_tpr)
    assert point.name == "tpr95_per_class" and point.threshold == base.threshold and point.target_tpr == 0.95
    assert len(point.class_thresholds) == 2 and sum(point.class_calibration_size) == 2000
    assert point.realised_tpr == pytest.approx(float(per_class.accepted(*test, point.class_thresholds).mean()))
    assert set(point.fpr) == {"noise"} and point.fpr["noise"] < 0.2
    assert all(0.9 < t < 1.0 for t in point.class_realised_tpr)


@pytest.fixture
def tiny_bundle_dir(tmp_path):
    from tests.service.bundle_factory import make_tiny_bundle

    return make_tiny_bundle(tmp_path / "tiny", name="tiny", version="1")


def test_manifest_fields_are_optional_and_old_bundles_keep_their_hash(tiny_bundle_dir):
    m = load_manifest(tiny_bundle_dir)
    assert all(op.class_thresholds is None for op in m.operating_points)
    assert "class_thresholds" not in m.to_json()  # written as before: no new keys, the same content hash
    verify_bundle(tiny_bundle_dir)
    raw = json.loads(m.to_json())
    raw["operating_points"][0]["class_thresholds"] = [0.5]  # the model has 3 classes
    with pytest.raises(ValueError, match="class_thresholds has 1 entries for 3 classes"):
        BundleManifest.model_validate(raw)


def test_service_applies_the_predicted_class_threshold(tmp_path, monkeypatch):
    """/v1/predict and the v2 verdict: accept iff score >= class_thresholds[predicted class]."""
    from fastapi.testclient import TestClient

    from oodguard.service.app import create_app
    from oodguard.service.settings import Settings
    from tests.service.bundle_factory import encode_image, make_tiny_bundle

    for key in [k for k in os.environ if k.startswith("OODGUARD_")]:
        monkeypatch.delenv(key)
    root = make_tiny_bundle(tmp_path / "b", name="tiny", version="1")
    m = load_manifest(root)
    # Red and blue confident images both score ~1.0 (msp); make "red" (class 0) demand more than that.
    strict = OperatingPoint(name="tpr95_per_class", target_tpr=0.95, threshold=m.operating_point().threshold,
                            class_thresholds=[1.01, 0.0, 0.0], class_calibration_size=[1, 1, 1])
    write_manifest(root, m.model_copy(update={"operating_points": [*m.operating_points, strict], "content_sha256": None}))
    files = [("files", ("r.png", encode_image((255, 0, 0)), "image/png")), ("files", ("b.png", encode_image((0, 0, 255)), "image/png"))]
    with TestClient(create_app(Settings(bundle=root, max_wait_ms=1.0, decode_threads=1))) as client:
        glob = client.post("/v1/predict", files=files).json()["predictions"]
        assert [p["decision"] for p in glob] == ["accept", "accept"]
        per = client.post("/v1/predict?operating_point=tpr95_per_class", files=files).json()["predictions"]
        assert [(p["label"], p["decision"], p["threshold"]) for p in per] == [("red", "reject", 1.01), ("blue", "accept", 0.0)]
        images = np.zeros((2, 3, 8, 8), np.float32)
        images[0, 0], images[1, 2] = 1.0, 1.0
        body = {"inputs": [{"name": "image", "shape": [2, 3, 8, 8], "datatype": "FP32", "data": images.ravel().tolist()}],
                "outputs": [{"name": "accept"}, {"name": "label_index"}], "parameters": {"operating_point": "tpr95_per_class"}}
        out = {o["name"]: o["data"] for o in client.post("/v2/models/tiny/infer", json=body).json()["outputs"]}
        assert out == {"accept": [False, True], "label_index": [0, 2]}


@pytest.mark.slow
def test_calibrate_per_class_end_to_end(tmp_path, tiny_data_dir):
    run = make_run(tmp_path / "run", tiny_data_dir)
    export_run(run, ["msp", "energy"])
    built = calibrate_run(run, CalibrateConfig(score="msp", max_samples=64, per_class=True, tarball=False,
                                               ood=["gaussian"], tprs=[0.9, 0.95]))
    m = load_manifest(built.bundle_dir)
    assert [op.name for op in m.operating_points] == ["tpr90", "tpr90_per_class", "tpr95", "tpr95_per_class"]
    assert m.default_operating_point == "tpr95"
    for op in m.operating_points:
        assert len(op.class_realised_tpr) == len(m.classes)  # recorded for global points too
    point = m.operating_point("tpr95_per_class")
    assert len(point.class_thresholds) == 10 and sum(point.class_calibration_size) == m.calibration.size
    assert set(point.fpr) == {"gaussian"} and 0.0 <= point.realised_tpr <= 1.0
    verify_bundle(built.bundle_dir)
