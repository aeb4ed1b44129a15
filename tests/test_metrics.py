"""Metrics: accuracy, UAR, confusion matrix, groups and fold summaries."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from ser_tf.evaluation.metrics import (classification_metrics, confusion_matrix,
                                       evaluate_predictions, summarize_folds)


def test_uar_is_mean_recall_over_present_classes():
    y_true = [0, 0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 0, 1, 1, 0, 2]
    m = classification_metrics(y_true, y_pred, ["a", "b", "c", "d"])
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["uar"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert m["per_class_recall"] == {"a": 0.75, "b": 0.5, "c": 1.0, "d": None}
    assert m["confusion_matrix"][0] == [3, 1, 0, 0]
    assert m["n"] == 7


def test_confusion_matrix_checks_input():
    with pytest.raises(ValueError):
        confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError):
        confusion_matrix([0, 1], [0], 3)


def test_by_group_and_fold_summary():
    meta = [SimpleNamespace(gender=g, speaker=s, language="de")
            for g, s in [("f", "1"), ("f", "1"), ("m", "2"), ("m", "2")]]
    m = evaluate_predictions([0, 1, 0, 1], [0, 1, 1, 1], ["x", "y"], meta)
    assert m["by_group"]["gender"]["f"]["accuracy"] == 1.0
    assert m["by_group"]["gender"]["m"]["uar"] == pytest.approx(0.5)
    assert set(m["by_group"]) == {"gender", "speaker", "language"}
    s = summarize_folds([{"accuracy": 0.5, "uar": 0.4}, {"accuracy": 0.7, "uar": 0.8}], m)
    assert s["uar"] == pytest.approx(0.6) and s["uar_std"] == pytest.approx(0.2)
    assert s["pooled"]["n"] == 4 and len(s["folds"]) == 2
    assert np.isclose(s["accuracy"], 0.6)
