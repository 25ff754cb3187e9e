"""The decision path without HTTP: `score_outputs`, `image_thresholds` and `InferenceService.score / verdict`
on hand-made model outputs, where every number of the answer is known.

The model is a stand-in with what the decision path reads (manifest, sha256, p_values from calibration
scores); the manifest is the tiny bundle's, with operating points set per test. Checked: the verdict's
tensors (names, dtypes, values), which operating point decides, the threshold compared in the score's
precision, class-conditional thresholds, non-finite outputs (an error when the verdict is required,
None when not), an operating point the answering model lacks (503 model_changed), the top-k order.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from oodguard.service.batching import BatchResult
from oodguard.service.bundle import conformal_p_values
from oodguard.service.errors import OodguardError
from oodguard.service.inference import InferenceService
from oodguard.service.manifest import OperatingPoint, load_manifest
from oodguard.service.metrics import ServiceMetrics
from oodguard.service.postprocess import NonFiniteOutput, image_thresholds, score_outputs

from .bundle_factory import make_tiny_bundle

CAL = np.linspace(0.30, 0.99, 69)  # calibration scores (sorted)
# three images: predicted red (score 0.9), green (0.55), blue (0.2)
PROBS = np.array([[0.9, 0.05, 0.05], [0.2, 0.55, 0.25], [0.3, 0.3, 0.4]], dtype=np.float32)
SCORES = np.array([0.9, 0.55, 0.2], dtype=np.float32)


@pytest.fixture(scope="module")
def base_manifest(tmp_path_factory):
    return load_manifest(make_tiny_bundle(tmp_path_factory.mktemp("bundle")))


def _manifest(base, points: list[OperatingPoint], default: str, **update):
    return base.model_copy(update={"operating_points": points, "default_operating_point": default, **update})


def _model(manifest, sha256: str = "a" * 64):
    return SimpleNamespace(manifest=manifest, sha256=sha256, name="tiny", version="1",
                           p_values=lambda scores, forms=None: conformal_p_values(CAL, scores))


def _outputs(manifest, probs=PROBS, scores=SCORES) -> dict[str, np.ndarray]:
    return {"probs": probs, manifest.score.output: scores}


def _service() -> InferenceService:
    return InferenceService(settings=None, registry=None, metrics=ServiceMetrics(), limits=None)


def _inference_errors(service: InferenceService) -> float:
    return service.metrics.registry.get_sample_value("oodguard_inference_errors_total")


POINTS = [OperatingPoint(name="lenient", target_tpr=0.99, threshold=0.1),
          OperatingPoint(name="middle", target_tpr=0.95, threshold=0.5),
          OperatingPoint(name="strict", target_tpr=0.90, threshold=0.95)]
ACCEPT = {"lenient": [True, True, True], "middle": [True, True, False], "strict": [False, False, False]}


@pytest.mark.parametrize("score_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", ["lenient", "middle", "strict", None])
def test_verdict_tensors_are_named_typed_and_decided_by_the_requested_point(base_manifest, op, score_dtype):
    manifest = _manifest(base_manifest, POINTS, default="middle")
    model = _model(manifest)
    scores = SCORES.astype(score_dtype)
    service = _service()
    got = service.verdict(BatchResult(model, _outputs(manifest, scores=scores), 3), op, required=True)
    assert sorted(got) == ["accept", "label_index", "ood_score", "p_value"]
    assert got["ood_score"].dtype == np.float32 and got["p_value"].dtype == np.float64
    assert got["accept"].dtype == np.bool_ and got["label_index"].dtype == np.int64
    np.testing.assert_array_equal(got["ood_score"], SCORES)
    # p = (1 + #{cal <= s}) / (n + 1)
    np.testing.assert_array_equal(got["p_value"], [(1 + np.sum(CAL <= s)) / 70 for s in scores.astype(np.float64)])
    np.testing.assert_array_equal(got["accept"], ACCEPT[op or "middle"])
    np.testing.assert_array_equal(got["label_index"], [0, 1, 2])
    # the verdict's images are recorded in the metrics
    decisions = {d: service.metrics.registry.get_sample_value("oodguard_decisions_total", {"decision": d})
                 for d in ("accept", "reject")}
    assert decisions == {"accept": sum(ACCEPT[op or "middle"]), "reject": 3 - sum(ACCEPT[op or "middle"])}


def test_verdict_and_score_agree(base_manifest):
    manifest = _manifest(base_manifest, POINTS, default="middle")
    result = BatchResult(_model(manifest), _outputs(manifest), 3)
    scored = _service().score(result, 2, "middle")
    verdict = _service().verdict(result, "middle", required=False)
    np.testing.assert_array_equal(verdict["accept"], [p["decision"] == "accept" for p in scored.predictions])
    np.testing.assert_array_equal(verdict["label_index"], [p["class_index"] for p in scored.predictions])
    np.testing.assert_array_equal(verdict["p_value"], [p["p_value"] for p in scored.predictions])


@pytest.mark.parametrize("where", ["probs", "score"])
def test_non_finite_outputs_fail_a_required_verdict_and_give_none_otherwise(base_manifest, where):
    manifest = _manifest(base_manifest, POINTS, default="middle")
    probs, scores = PROBS.copy(), SCORES.copy()
    (probs[1] if where == "probs" else scores[1:2])[0] = np.nan
    result = BatchResult(_model(manifest), _outputs(manifest, probs, scores), 3)

    with pytest.raises(NonFiniteOutput, match=r"^the model produced non-finite outputs$"):
        score_outputs(result.model, result.outputs, 1, manifest.operating_point())

    service = _service()
    for call in (lambda: service.verdict(result, None, required=True), lambda: service.score(result, 1, None)):
        with pytest.raises(OodguardError) as info:
            call()
        assert (info.value.kind, info.value.code, info.value.message) == (
            "unavailable", "inference_failed", "the model produced non-finite outputs")
    assert _inference_errors(service) == 2

    quiet = _service()
    assert quiet.verdict(result, None, required=False) is None
    assert _inference_errors(quiet) == 0


def test_an_operating_point_the_answering_model_lacks_is_model_changed(base_manifest):
    """The request was checked against the model active when it arrived; the model that answered (after a
    swap) lacks the point: 503 model_changed for a required verdict and for /v1's score, None otherwise."""
    manifest = _manifest(base_manifest, POINTS, default="middle")
    result = BatchResult(_model(manifest), _outputs(manifest), 3)
    service = _service()
    for call in (lambda: service.verdict(result, "tpr95", required=True), lambda: service.score(result, 1, "tpr95")):
        with pytest.raises(OodguardError) as info:
            call()
        assert (info.value.kind, info.value.code) == ("unavailable", "model_changed")
        assert "'tpr95'" in info.value.message
    assert service.verdict(result, "tpr95", required=False) is None


def test_score_output_of_shape_n_by_1_is_one_score_per_image(base_manifest):
    manifest = _manifest(base_manifest, POINTS, default="middle")
    scored = score_outputs(_model(manifest), _outputs(manifest, scores=SCORES.reshape(3, 1)), 1, manifest.operating_point())
    assert scored.scores.shape == (3,) and scored.accepted.shape == (3,) and scored.p_values.shape == (3,)
    assert [p["decision"] for p in scored.predictions] == ["accept", "accept", "reject"]


def test_threshold_is_compared_in_the_scores_precision(base_manifest):
    """A float64 threshold that rounds to the float32 score is met: the score's precision decides, as always."""
    s32 = np.float32(0.7)
    above = float(s32) + 1e-12  # not representable in float32; rounds to s32
    assert np.float32(above) == s32 and above > float(s32)
    manifest = _manifest(base_manifest, [OperatingPoint(name="p", target_tpr=0.95, threshold=above)], default="p")
    scored = score_outputs(_model(manifest), _outputs(manifest, PROBS[:1], np.array([s32])), 1, manifest.operating_point())
    assert scored.accepted.tolist() == [True] and scored.predictions[0]["decision"] == "accept"


def test_class_conditional_point_uses_the_predicted_classes_threshold(base_manifest):
    op = OperatingPoint(name="cc", target_tpr=0.95, threshold=0.5, class_thresholds=[0.95, 0.5, 0.1])
    manifest = _manifest(base_manifest, [op], default="cc")
    np.testing.assert_array_equal(image_thresholds(op, np.array([2, 0, 1, 0])), [0.1, 0.95, 0.5, 0.95])
    assert image_thresholds(op, np.array([2, 0])).dtype == np.float64
    plain = OperatingPoint(name="g", target_tpr=0.95, threshold=0.5)
    np.testing.assert_array_equal(image_thresholds(plain, np.array([2, 0])), [0.5, 0.5])
    # red 0.9 < 0.95: reject; green 0.55 >= 0.5: accept; blue 0.2 >= 0.1: accept (the global 0.5 would reject)
    got = _service().verdict(BatchResult(_model(manifest), _outputs(manifest), 3), None, required=True)
    np.testing.assert_array_equal(got["accept"], [False, True, True])
    scored = score_outputs(_model(manifest), _outputs(manifest), 1, op)
    assert [p["threshold"] for p in scored.predictions] == [0.95, 0.5, 0.1]


def test_top_k_lists_tied_classes_in_index_order(base_manifest):
    """Ties keep the lower class index first (a stable sort), over many classes, so answers are deterministic."""
    classes = [f"c{i}" for i in range(40)]
    manifest = _manifest(base_manifest, POINTS, default="middle", classes=classes)
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 3, (4, 40)).astype(np.float32)
    probs = counts / counts.sum(1, keepdims=True)
    scored = score_outputs(_model(manifest), _outputs(manifest, probs, np.full(4, 0.6, np.float32)), 40,
                           manifest.operating_point())
    for row, pred in zip(probs, scored.predictions):
        expected = sorted(range(40), key=lambda i: (-row[i], i))
        assert [int(t["label"][1:]) for t in pred["top_k"]] == expected
        assert pred["class_index"] == expected[0] and pred["label"] == classes[expected[0]]


def test_the_answering_models_p_values_feed_its_drift_test(base_manifest):
    """Each scored image's p-value is one observation of the drift test of the model that answered (when it is
    the one the test runs for); another model's answers (a request that finished on the old model) are not."""
    manifest = _manifest(base_manifest, POINTS, default="middle")
    service = _service()
    service.metrics.drift.reset("a" * 64)
    service.verdict(BatchResult(_model(manifest, "a" * 64), _outputs(manifest), 3), None, required=True)
    service.score(BatchResult(_model(manifest, "a" * 64), _outputs(manifest), 3), 1, None)
    assert service.metrics.drift.state.n == 6
    service.score(BatchResult(_model(manifest, "b" * 64), _outputs(manifest), 3), 1, None)
    assert service.metrics.drift.state.n == 6


def test_p_values_count_calibration_scores_equal_to_the_score():
    """p(s) = (1 + #{cal <= s}) / (n + 1): a calibration score equal to s counts (ties go to in-distribution)."""
    cal = np.array([0.1, 0.2, 0.2, 0.3], dtype=np.float32)
    np.testing.assert_array_equal(conformal_p_values(cal, np.array([0.05, 0.1, 0.2, 0.25, 0.3, 0.4], dtype=np.float32)),
                                  np.array([1, 2, 4, 4, 5, 5]) / 5)


def test_unknown_operating_points_are_named(base_manifest):
    from oodguard.service.inference import resolve_operating_point

    manifest = _manifest(base_manifest, POINTS, default="middle")
    with pytest.raises(KeyError) as info:
        manifest.operating_point("tpr95")
    assert info.value.args == ("tpr95",)
    assert manifest.operating_point(None).name == "middle" and manifest.operating_point("strict") is POINTS[2]
    with pytest.raises(OodguardError) as err:
        resolve_operating_point(manifest, "tpr95")
    assert (err.value.kind, err.value.code, err.value.message) == (
        "invalid_input", "unknown_operating_point", "unknown operating_point 'tpr95'; this model has: lenient, middle, strict")


def test_predict_hands_its_announcement_to_the_batcher(make_client):
    """/v1/predict announces itself (`incoming()`) before reading its body and hands that ticket to `infer`, which
    releases it once the images are queued: the collector then knows nobody else is coming and runs at once
    instead of waiting out max_wait_ms for a request that has already arrived."""
    from oodguard.service.batching import _Ticket

    from .bundle_factory import encode_image

    client = make_client(max_wait_ms=1000.0)
    batcher = client.app.state.inference.batcher
    tickets, real_infer = [], batcher.infer

    async def spy(images, ticket=None):
        tickets.append(ticket)
        return await real_infer(images, ticket)

    batcher.infer = spy
    r = client.post("/v1/predict", content=encode_image((255, 0, 0)), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["label"] == "red"
    assert len(tickets) == 1 and isinstance(tickets[0], _Ticket)
