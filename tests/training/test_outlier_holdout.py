"""Validation outliers: whole outlier classes held out of training, recorded in split.json, rebuilt exactly."""

from __future__ import annotations

import numpy as np

from oodguard.training.data import ImageSet, held_out_outliers, outlier_holdout


def _outliers(n_classes=20, per_class=5):
    labels = np.repeat(np.arange(n_classes), per_class)
    images = np.zeros((len(labels), 4, 4, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(len(labels)) % 256
    images[:, 0, 0, 1] = np.arange(len(labels)) // 256
    return ImageSet(images, labels, [f"k{i}" for i in range(n_classes)], "x.npz", "sha")


def test_whole_classes_are_held_out_and_never_trained_on():
    s = _outliers()
    keep, record = outlier_holdout(s, 0.1, seed=0)
    assert len(record["classes"]) == 2 and record["n_val"] == 10 and record["n_train"] == 90
    assert not np.isin(s.labels[keep], record["classes"]).any()
    val = held_out_outliers(s, record)
    assert len(val) == 10 and set(np.unique(val.labels)) == set(record["classes"])
    assert len(set(keep.tolist()) | set(np.flatnonzero(np.isin(s.labels, record["classes"])).tolist())) == 100
    assert outlier_holdout(s, 0.1, seed=0)[1] == record  # seeded
    assert outlier_holdout(s, 0.1, seed=5)[1]["classes"] != record["classes"]


def test_unlabelled_outliers_hold_out_images_and_zero_holds_out_nothing():
    s = ImageSet(np.zeros((50, 4, 4, 3), np.uint8), np.full(50, -1), [], "u", None)
    keep, record = outlier_holdout(s, 0.2, seed=1)
    assert len(record["indices"]) == 10 and len(keep) == 40 and not set(keep) & set(record["indices"])
    assert len(held_out_outliers(s, record)) == 10
    keep0, record0 = outlier_holdout(s, 0.0)
    assert len(keep0) == 50 and record0["classes"] == [] and record0["indices"] == []
