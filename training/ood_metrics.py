"""OOD detection metrics. Convention: in-distribution is the POSITIVE class and a HIGHER score means
MORE in-distribution; an input is accepted as in-distribution iff score >= threshold.

- TPR(t) = fraction of in-distribution scores >= t;  FPR(t) = fraction of OOD scores >= t.
- `fpr_at_95_tpr`: the smallest FPR over thresholds whose TPR >= 0.95 (no interpolation).
- `auroc`: area under the ROC curve = P(s_in > s_out) + 0.5 P(s_in == s_out).
- `aupr_in`: average precision with in-distribution positive; `aupr_out`: with OOD positive and the
  score negated (both as scikit-learn's `average_precision_score`: sum_k (R_k - R_{k-1}) P_k).
- `detection_error`: min over thresholds (including "accept nothing") of 0.5 (1 - TPR) + 0.5 FPR.

Ties: thresholds are the distinct score values, so tied in/out scores move TPR and FPR together
(a diagonal ROC segment), never in an order-dependent staircase.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METRIC_KEYS = ("fpr_at_95_tpr", "auroc", "aupr_in", "aupr_out", "detection_error")


@dataclass(frozen=True)
class RocCurve:
    """ROC points from (0, 0) (accept nothing) to (1, 1) (accept everything), thresholds descending."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray  # thresholds[0] = +inf (accept nothing)


def _validate(scores_in: np.ndarray, scores_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s_in = np.asarray(scores_in, dtype=np.float64).ravel()
    s_out = np.asarray(scores_out, dtype=np.float64).ravel()
    if s_in.size == 0 or s_out.size == 0:
        raise ValueError(f"need at least one in-distribution and one OOD score (got {s_in.size} and {s_out.size})")
    if not (np.all(np.isfinite(s_in)) and np.all(np.isfinite(s_out))):
        raise ValueError("scores must be finite (got NaN or inf)")
    return s_in, s_out


def _roc_counts(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (tp, fp) at each distinct score, thresholds descending; `pos` scores are the positives."""
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(pos.size, dtype=np.int64), np.zeros(neg.size, dtype=np.int64)])
    order = np.argsort(-scores, kind="stable")
    scores, is_pos = scores[order], is_pos[order]
    # last index of each group of equal scores: the counts up to there are the counts at that threshold
    last_of_group = np.r_[np.flatnonzero(np.diff(scores) != 0), scores.size - 1]
    tp = np.cumsum(is_pos)[last_of_group]
    fp = (last_of_group + 1) - tp
    return tp, fp, scores[last_of_group]


def roc_curve(scores_in: np.ndarray, scores_out: np.ndarray) -> RocCurve:
    """ROC with one point per distinct score value (ties grouped), accept iff score >= threshold."""
    s_in, s_out = _validate(scores_in, scores_out)
    tp, fp, thresholds = _roc_counts(s_in, s_out)
    return RocCurve(fpr=np.r_[0.0, fp / s_out.size], tpr=np.r_[0.0, tp / s_in.size], thresholds=np.r_[np.inf, thresholds])


def _average_precision(tp: np.ndarray, fp: np.ndarray) -> float:
    """sum_k (R_k - R_{k-1}) P_k over the distinct-threshold points (cumulative counts, without (0, 0))."""
    recall = tp / tp[-1]
    precision = tp / (tp + fp)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def ood_metrics(scores_in: np.ndarray, scores_out: np.ndarray) -> dict[str, float]:
    """All metrics of the module docstring: keys `METRIC_KEYS` plus `n_in` and `n_out`."""
    s_in, s_out = _validate(scores_in, scores_out)
    tp, fp, _ = _roc_counts(s_in, s_out)
    tpr = np.r_[0.0, tp / s_in.size]
    fpr = np.r_[0.0, fp / s_out.size]
    # OOD positive, score negated: the same distinct thresholds walked from the other end.
    tp_out, fp_out, _ = _roc_counts(-s_out, -s_in)
    return {
        # the last point accepts everything (TPR = 1), so the set of qualifying thresholds is never empty
        "fpr_at_95_tpr": float(fpr[1:][tp >= 0.95 * s_in.size * (1 - 1e-12)].min()),
        "auroc": float(np.trapezoid(tpr, fpr)),
        "aupr_in": _average_precision(tp, fp),
        "aupr_out": _average_precision(tp_out, fp_out),
        "detection_error": float(np.min(0.5 * (1.0 - tpr) + 0.5 * fpr)),
        "n_in": int(s_in.size),
        "n_out": int(s_out.size),
    }


class OODMetrics:
    """Accumulate scores batch by batch, then `compute()` the fixed keys of `ood_metrics`.

        m = OODMetrics()
        m.update(scores, is_in)   # is_in: 1 for in-distribution, 0 for OOD
        m.compute()               # {"fpr_at_95_tpr": ..., "auroc": ..., ...}
        m.reset()
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._in: list[np.ndarray] = []
        self._out: list[np.ndarray] = []

    def update(self, scores, is_in) -> None:
        s = _to_numpy(scores).astype(np.float64).ravel()
        mask = _to_numpy(is_in).astype(bool).ravel()
        if s.shape != mask.shape:
            raise ValueError(f"scores and is_in must have the same length, got {s.shape} and {mask.shape}")
        self._in.append(s[mask])
        self._out.append(s[~mask])

    def compute(self) -> dict[str, float]:
        s_in = np.concatenate(self._in) if self._in else np.empty(0)
        s_out = np.concatenate(self._out) if self._out else np.empty(0)
        return ood_metrics(s_in, s_out)


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)
