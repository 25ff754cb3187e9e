"""The verdict's semantics through POST /v1/predict: the requested operating point drives the decision,
a score exactly at the threshold is accepted, and decision and p-value agree at every operating point."""

from __future__ import annotations

import numpy as np
import pytest

from oodguard.service.bundle import write_manifest
from oodguard.service.manifest import OperatingPoint, load_manifest

from .bundle_factory import encode_image, make_tiny_bundle

MIXED = (200, 120, 40)  # a colour between classes: a middling score


def _predict(client, op: str, color=MIXED) -> dict:
    r = client.post(f"/v1/predict?operating_point={op}", content=encode_image(color), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    return r.json()["predictions"][0]


def _with_points(bundle, points: list[OperatingPoint], default: str):
    manifest = load_manifest(bundle)
    write_manifest(bundle, manifest.model_copy(update={"operating_points": points, "default_operating_point": default}))


def test_the_requested_operating_point_decides_and_the_threshold_itself_is_accepted(tmp_path, make_client):
    bundle = make_tiny_bundle(tmp_path / "b")
    score = _predict(make_client(bundle=bundle), "tpr95")["ood_score"]
    s32 = float(np.float32(score))
    below, above = float(np.nextafter(np.float32(s32), np.float32(-1))), float(np.nextafter(np.float32(s32), np.float32(2)))
    _with_points(bundle, [OperatingPoint(name="lenient", target_tpr=0.99, threshold=below),
                          OperatingPoint(name="exact", target_tpr=0.95, threshold=s32),
                          OperatingPoint(name="strict", target_tpr=0.90, threshold=above)], default="strict")
    client = make_client(bundle=bundle)
    got = {op: _predict(client, op) for op in ("lenient", "exact", "strict")}
    assert got["lenient"]["decision"] == "accept" and got["strict"]["decision"] == "reject"
    assert got["exact"]["decision"] == "accept"  # score == threshold: accept (>=, not >)
    for op, pred in got.items():
        assert pred["operating_point"] == op and pred["threshold"] == pytest.approx(
            {"lenient": below, "exact": s32, "strict": above}[op], abs=0)


def test_decision_equals_the_conformal_p_value_rule_at_every_operating_point(tmp_path, make_client):
    """With thresholds set by calibration's rule, accept iff p_value > 1 - target TPR, for every image and point."""
    from oodguard.training.calibrate import threshold_for_tpr  # the rule the bundle promises

    bundle = make_tiny_bundle(tmp_path / "b", calibration_size=300)
    cal = np.load(bundle / "calibration.npy")
    points = [OperatingPoint(name=f"tpr{int(t * 100)}", target_tpr=t, threshold=threshold_for_tpr(cal, t))
              for t in (0.80, 0.90, 0.95)]
    _with_points(bundle, points, default="tpr95")
    client = make_client(bundle=bundle)
    rng = np.random.default_rng(0)
    colors = [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(40)]
    seen = set()
    for op in points:
        for color in colors:
            pred = _predict(client, op.name, color)
            assert (pred["decision"] == "accept") == (pred["p_value"] > 1 - op.target_tpr + 1e-12), (op.name, color)
            seen.add(pred["decision"])
    assert seen == {"accept", "reject"}  # the images straddle the thresholds
