"""Classification metrics for SER, with per-group breakdowns.

UAR (unweighted average recall: the mean of the per-class recalls over the classes present
in the data) is the headline metric; accuracy is reported beside it. Every function takes
plain integer arrays so any job (training, attacks, export checks) can reuse it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

GROUP_KEYS = ("gender", "speaker", "language")


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """``[num_classes, num_classes]`` counts, rows = true class, columns = predicted."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    if y_true.size and (min(y_true.min(), y_pred.min()) < 0
                        or max(y_true.max(), y_pred.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int],
                           labels: Sequence[str]) -> dict:
    """Accuracy, UAR, per-class recall and the confusion matrix.

    Classes absent from ``y_true`` get recall ``None`` and do not count towards UAR.

    Returns:
      ``{"accuracy", "uar", "per_class_recall": {label: recall | None},
      "confusion_matrix": [[...]], "labels": [...], "n", "support": {label: count}}``.
    """
    cm = confusion_matrix(y_true, y_pred, len(labels))
    support = cm.sum(axis=1)
    n = int(cm.sum())
    recalls = {lab: (float(cm[k, k] / support[k]) if support[k] else None)
               for k, lab in enumerate(labels)}
    present = [r for r in recalls.values() if r is not None]
    return {
        "accuracy": float(np.trace(cm) / n) if n else float("nan"),
        "uar": float(np.mean(present)) if present else float("nan"),
        "per_class_recall": recalls,
        "confusion_matrix": cm.tolist(),
        "labels": list(labels),
        "n": n,
        "support": {lab: int(s) for lab, s in zip(labels, support)},
    }


def group_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str],
                  groups: Mapping[str, Sequence[str]]) -> dict:
    """Accuracy and UAR within each value of each grouping.

    Args:
      y_true: true class indices.
      y_pred: predicted class indices.
      labels: class names.
      groups: grouping name -> the group value of every example (e.g. ``{"gender": [...]}``).

    Returns:
      ``{grouping: {value: {"accuracy", "uar", "n"}}}``.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    out = {}
    for key, values in groups.items():
        values = np.asarray(values)
        if values.shape != y_true.shape:
            raise ValueError(f"group {key!r} has {values.size} values for {y_true.size} examples")
        out[key] = {}
        for value in sorted(set(values.tolist())):
            sel = values == value
            m = classification_metrics(y_true[sel], y_pred[sel], labels)
            out[key][str(value)] = {"accuracy": m["accuracy"], "uar": m["uar"], "n": m["n"]}
    return out


def evaluate_predictions(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str],
                         metadata: Sequence[object]) -> dict:
    """Full metrics with ``by_group`` for gender, speaker and language (the metrics.json schema).

    Args:
      y_true: true class indices.
      y_pred: predicted class indices.
      labels: class names.
      metadata: per example, an object with ``gender``, ``speaker`` and ``language``
        attributes (e.g. :class:`ser_tf.data.corpora.Utterance`).

    Returns:
      :func:`classification_metrics` plus ``"by_group"``.
    """
    metrics = classification_metrics(y_true, y_pred, labels)
    metrics["by_group"] = group_metrics(
        y_true, y_pred, labels,
        {key: [str(getattr(m, key)) for m in metadata] for key in GROUP_KEYS})
    return metrics


def summarize_folds(folds: Sequence[dict], pooled: dict | None = None) -> dict:
    """Mean and std over cross-validation folds, plus pooled metrics if given.

    Returns:
      ``{"accuracy", "accuracy_std", "uar", "uar_std", "folds": [...], "pooled": {...}}``
      where accuracy and uar are fold means (population std).
    """
    if not folds:
        raise ValueError("no folds to summarize")
    out: dict = {}
    for key in ("accuracy", "uar"):
        values = np.array([f[key] for f in folds], np.float64)
        out[key] = float(np.nanmean(values))
        out[f"{key}_std"] = float(np.nanstd(values))
    out["folds"] = list(folds)
    if pooled is not None:
        out["pooled"] = pooled
    return out
