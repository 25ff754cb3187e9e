"""OOD metrics: hand-made cases (ties included) and agreement with scikit-learn on random tied data."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from oodguard.training.ood_metrics import METRIC_KEYS, OODMetrics, ood_metrics, roc_curve


def test_perfect_separation():
    m = ood_metrics([3.0, 4.0], [1.0, 2.0])
    assert m["auroc"] == 1.0 and m["fpr_at_95_tpr"] == 0.0 and m["detection_error"] == 0.0
    assert m["aupr_in"] == 1.0 and m["aupr_out"] == 1.0
    assert (m["n_in"], m["n_out"]) == (2, 2)


def test_inverted_scores():
    m = ood_metrics([1.0, 2.0], [3.0, 4.0])
    assert m["auroc"] == 0.0 and m["fpr_at_95_tpr"] == 1.0
    assert m["detection_error"] == 0.5  # best is to accept nothing (or everything)


def test_all_tied_is_chance():
    m = ood_metrics([1.0, 1.0, 1.0], [1.0, 1.0])
    assert m["auroc"] == 0.5
    assert m["fpr_at_95_tpr"] == 1.0
    assert m["detection_error"] == 0.5
    assert m["aupr_in"] == pytest.approx(3 / 5) and m["aupr_out"] == pytest.approx(2 / 5)


def test_partial_ties_by_hand():
    # in = [2, 1], out = [1, 0]. Thresholds 2 / 1 / 0 give (TPR, FPR) = (.5, 0), (1, .5), (1, 1).
    m = ood_metrics([2.0, 1.0], [1.0, 0.0])
    assert m["auroc"] == pytest.approx(3.5 / 4)  # 3 pairs ordered right, 1 tie counted half
    assert m["fpr_at_95_tpr"] == 0.5
    assert m["detection_error"] == pytest.approx(0.25)
    assert m["aupr_in"] == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)
    roc = roc_curve([2.0, 1.0], [1.0, 0.0])
    np.testing.assert_allclose(roc.tpr, [0, 0.5, 1, 1])
    np.testing.assert_allclose(roc.fpr, [0, 0, 0.5, 1])
    assert roc.thresholds[0] == np.inf and list(roc.thresholds[1:]) == [2.0, 1.0, 0.0]


def test_fpr95_tie_at_the_operating_threshold_counts_the_tied_outlier():
    scores_in = np.arange(20, dtype=float)  # TPR reaches 95% exactly at threshold 1
    assert ood_metrics(scores_in, [0.5])["fpr_at_95_tpr"] == 0.0  # below the threshold: rejected
    assert ood_metrics(scores_in, [1.0])["fpr_at_95_tpr"] == 1.0  # tied with it: accepted
    assert ood_metrics(scores_in, [1.5])["fpr_at_95_tpr"] == 1.0


def test_order_of_tied_scores_does_not_matter():
    rng = np.random.default_rng(0)
    s_in, s_out = rng.integers(0, 4, 50).astype(float), rng.integers(0, 4, 40).astype(float)
    a = ood_metrics(s_in, s_out)
    b = ood_metrics(s_in[::-1], rng.permutation(s_out))
    assert a == b


def test_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        ood_metrics([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        ood_metrics([np.nan, 1.0], [1.0])


def _sklearn_reference(s_in, s_out):
    y = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
    s = np.r_[s_in, s_out]
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    return {
        "auroc": skm.roc_auc_score(y, s),
        "aupr_in": skm.average_precision_score(y, s),
        "aupr_out": skm.average_precision_score(1 - y, -s),
        "fpr_at_95_tpr": fpr[tpr >= 0.95].min(),
        "detection_error": np.min(0.5 * (1 - tpr) + 0.5 * fpr),
    }


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(-5, 5), min_size=1, max_size=60),
    st.lists(st.integers(-5, 5), min_size=1, max_size=60),
    st.floats(0.1, 10.0),
)
def test_agrees_with_sklearn_on_tied_integer_scores(s_in, s_out, scale):
    s_in, s_out = np.array(s_in) * scale, np.array(s_out) * scale
    ours = ood_metrics(s_in, s_out)
    ref = _sklearn_reference(s_in, s_out)
    for key in METRIC_KEYS:
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key


def test_agrees_with_sklearn_on_continuous_scores():
    rng = np.random.default_rng(1)
    s_in, s_out = rng.normal(1.0, 1.0, 3000), rng.normal(0.0, 1.0, 2000)
    ours, ref = ood_metrics(s_in, s_out), _sklearn_reference(s_in, s_out)
    for key in METRIC_KEYS:
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key
    assert 0.7 < ours["auroc"] < 0.8  # Phi(1/sqrt(2)) = 0.76


def test_oodmetrics_accumulates_and_resets():
    rng = np.random.default_rng(2)
    s_in, s_out = rng.normal(1, 1, 100), rng.normal(0, 1, 80)
    scores = np.r_[s_in, s_out]
    is_in = np.r_[np.ones(100), np.zeros(80)]
    order = rng.permutation(180)
    m = OODMetrics()
    for chunk in np.array_split(order, 7):
        m.update(scores[chunk], is_in[chunk])
    result = m.compute()
    assert set(METRIC_KEYS) <= set(result)
    assert result == ood_metrics(s_in, s_out)
    m.reset()
    with pytest.raises(ValueError, match="at least one"):
        m.compute()
    import torch  # tensors are accepted too

    m.update(torch.tensor([1.0, 0.0]), torch.tensor([1, 0]))
    assert m.compute()["auroc"] == 1.0


def test_oodmetrics_refuses_nothing_and_mismatched_lengths_and_takes_tensors():
    with pytest.raises(ValueError, match=r"got 0 and 0\)"):
        OODMetrics().compute()  # nothing accumulated: the same refusal as ood_metrics on empty arrays
    m = OODMetrics()
    with pytest.raises(ValueError, match=r"^scores and is_in must have the same length, got \(3,\) and \(2,\)$"):
        m.update([1.0, 2.0, 3.0], [True, False])
    import torch

    scores = torch.tensor([3.0, 2.0, 1.0, 0.0], requires_grad=True)  # np.asarray alone would refuse it
    m.update(scores * 1.0, torch.tensor([True, True, False, False]))
    assert m.compute()["auroc"] == 1.0


def test_integer_and_unsigned_scores_are_scored_as_floats():
    # unsigned scores negated in place would wrap around (aupr_out); the metrics cast to float64 first
    want = ood_metrics(np.array([3.0, 4.0, 9.0]), np.array([1.0, 2.0, 5.0]))
    assert ood_metrics(np.array([3, 4, 9], np.uint8), np.array([1, 2, 5], np.uint8)) == want
    assert ood_metrics(np.array([3, 4, 9], np.int32), np.array([1, 2, 5], np.int32)) == want


def test_non_finite_scores_are_named():
    with pytest.raises(ValueError, match=r"^scores must be finite \(got NaN or inf\)$"):
        ood_metrics(np.array([1.0, np.nan]), np.array([0.0]))
