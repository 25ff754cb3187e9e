"""Class-conditional ("Mondrian") conformal operating points: one threshold per predicted class.

A global threshold accepts `target_tpr` of in-distribution images on average, but a class the model
finds hard (low scores) is rejected far more often than 1 - target_tpr. Calibrating each predicted
class on its own calibration images (same rule as the global point, `calibrate.threshold_for_tpr`)
gives every predicted class that TPR. `oodguard calibrate --per-class` adds, next to each `tprXX`
point, a `tprXX_per_class` point; the service applies `class_thresholds[argmax(probs)]`.

A class with too few calibration images for the target (fewer than 1 / (1 - tpr) - 1) falls back to
the global threshold; `class_calibration_size` says how many each class had. Everything here is a
pure function of scores and predicted classes, apart from `predictor`, which runs the ONNX graph.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from oodguard.service.manifest import OperatingPoint

Rule = Callable[[np.ndarray, float], float]  # (sorted calibration scores, target TPR) -> threshold
SUFFIX = "_per_class"


def class_thresholds(
    scores: np.ndarray, predicted: np.ndarray, num_classes: int, target_tpr: float, rule: Rule
) -> tuple[list[float], list[int]]:
    """(threshold per class, calibration images per class). Too few images for `rule`: the global threshold."""
    scores, predicted = np.asarray(scores), np.asarray(predicted)
    global_threshold = rule(np.sort(scores), target_tpr)
    thresholds, sizes = [], []
    for c in range(num_classes):
        own = np.sort(scores[predicted == c])
        sizes.append(int(own.size))
        try:
            thresholds.append(float(rule(own, target_tpr)))
        except ValueError:
            thresholds.append(float(global_threshold))
    return thresholds, sizes


def accepted(scores: np.ndarray, predicted: np.ndarray, thresholds: list[float]) -> np.ndarray:
    """Accept iff score >= the threshold of the image's predicted class (in the scores' precision)."""
    scores = np.asarray(scores)
    return scores >= np.asarray(thresholds, dtype=np.float64)[np.asarray(predicted)].astype(scores.dtype)


def class_tpr(scores: np.ndarray, predicted: np.ndarray, thresholds: list[float], num_classes: int) -> list[float | None]:
    """Share of in-distribution images accepted, per predicted class (None: no image predicted as it)."""
    ok = accepted(scores, predicted, thresholds)
    predicted = np.asarray(predicted)
    return [float(ok[predicted == c].mean()) if np.any(predicted == c) else None for c in range(num_classes)]


def per_class_point(
    base: OperatingPoint,
    calibration: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    ood: dict[str, tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    rule: Rule,
) -> OperatingPoint:
    """The class-conditional sibling of `base` (same target TPR): thresholds, realised TPR, FPR per OOD set.

    Each of `calibration`, `test` and the `ood` sets is (scores, predicted class) from the served graph.
    """
    thresholds, sizes = class_thresholds(*calibration, num_classes, base.target_tpr, rule)
    test_ok = accepted(*test, thresholds)
    return OperatingPoint(
        name=base.name + SUFFIX,
        target_tpr=base.target_tpr,
        threshold=base.threshold,
        realised_tpr=float(test_ok.mean()),
        fpr={key: float(accepted(*sp, thresholds).mean()) for key, sp in ood.items()},
        class_thresholds=thresholds,
        class_calibration_size=sizes,
        class_realised_tpr=class_tpr(*test, thresholds, num_classes),
    )


def with_class_tpr(point: OperatingPoint, test: tuple[np.ndarray, np.ndarray], num_classes: int) -> OperatingPoint:
    """A global point plus its realised TPR per predicted class (how unevenly one threshold treats classes)."""
    return point.model_copy(update={"class_realised_tpr": class_tpr(*test, [point.threshold] * num_classes, num_classes)})


def add_per_class_points(
    points: list[OperatingPoint],
    predict: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    calibration_images: np.ndarray,
    test_images: np.ndarray,
    ood_images: dict[str, np.ndarray],
    num_classes: int,
    rule: Rule,
) -> list[OperatingPoint]:
    """`points` with their per-class TPR, each followed by its class-conditional sibling."""
    cal, test = predict(calibration_images), predict(test_images)
    ood = {key: predict(images) for key, images in ood_images.items()}
    out = []
    for point in points:
        out += [with_class_tpr(point, test, num_classes), per_class_point(point, cal, test, ood, num_classes, rule)]
    return out


def predictor(session, score: str, batch_size: int) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """uint8 NHWC images -> (served score, predicted class) from the exported graph, as the service computes them."""
    from . import data
    from .export import run_onnx

    def predict(images_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = run_onnx(session, data.to_tensor(images_u8).numpy(), batch_size, ["probs", score])
        return out[score].reshape(-1), np.argmax(out["probs"], axis=1)

    return predict
