"""Model outputs -> per-image predictions: top-k, OOD score, conformal p-value, verdict.

Vectorised over the images of one request. Computes nothing the bundle does not define: the
probabilities and the score come from the ONNX graph, the threshold from the manifest's operating
point (per predicted class for a class-conditional point, per upload-form group for a form-conditional
one), the p-value from the bundle's calibration scores (the image's form group's, when it has them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .manifest import OperatingPoint
from .upload_form import NATIVE


class NonFiniteOutput(ValueError):
    """The model produced NaN/inf for these images: no trustworthy answer exists."""


@dataclass
class Scored:
    """One request's predictions plus the arrays the metrics record."""

    predictions: list[dict]
    scores: np.ndarray
    p_values: np.ndarray
    accepted: np.ndarray


def score_outputs(model, outputs: dict[str, np.ndarray], top_k: int, op: OperatingPoint,
                  forms: list[str] | None = None) -> Scored:
    """`model`: LoadedModel (manifest, p_values); `outputs`: this request's rows of every graph output;
    `forms`: each image's upload-form group (upload_form.py; None: sent already decoded, `native`)."""
    manifest = model.manifest
    probs = np.asarray(outputs["probs"])
    n = probs.shape[0]
    scores = np.asarray(outputs[manifest.score.output]).reshape(n)
    if not (np.isfinite(probs).all() and np.isfinite(scores).all()):
        raise NonFiniteOutput("the model produced non-finite outputs")
    k = min(top_k, probs.shape[1])
    # Stable descending order: ties keep the lower class index first, so answers are deterministic.
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top_probs = probs[np.arange(n)[:, None], order]
    if forms is None:
        forms = [NATIVE] * n
    p_values = model.p_values(scores, forms)
    thresholds = image_thresholds(op, order[:, 0], forms)
    accepted = scores >= thresholds.astype(scores.dtype)  # compared in the score's precision, as always

    classes = manifest.classes
    score_name = manifest.score.name
    predictions = []
    form_conditional = op.form_thresholds is not None
    for idx_row, prob_row, score, p, threshold, ok, form in zip(
        order.tolist(), top_probs.tolist(), scores.tolist(), p_values.tolist(), thresholds.tolist(), accepted.tolist(), forms
    ):
        predictions.append(
            {
                "label": classes[idx_row[0]],
                "class_index": idx_row[0],
                "confidence": prob_row[0],
                "top_k": [{"label": classes[i], "probability": q} for i, q in zip(idx_row, prob_row)],
                "ood_score": score,
                "score_name": score_name,
                "p_value": p,
                "threshold": threshold,
                "operating_point": op.name,
                "decision": "accept" if ok else "reject",
                **({"upload_form": form} if form_conditional else {}),
            }
        )
    return Scored(predictions, scores, p_values, accepted)


def image_thresholds(op: OperatingPoint, predicted: np.ndarray, forms: list[str] | None = None) -> np.ndarray:
    """Each image's threshold: for a class-conditional point its predicted class's, for a form-conditional
    one its upload-form group's (`forms`; None: all `native`), else the operating point's."""
    if op.class_thresholds is not None:
        return np.asarray(op.class_thresholds, dtype=np.float64)[predicted]
    if op.form_thresholds is not None:
        groups = forms if forms is not None else [NATIVE] * len(predicted)
        return np.asarray([op.form_thresholds[g] for g in groups], dtype=np.float64)
    return np.full(predicted.shape, float(op.threshold))
