"""Metrics of sequence-level objectives, as the field reports them (CMU-MOSI / MOSEI papers and
their common toolkit, MMSA). Pure numpy: validation during training, `bastion eval classify`
and the benchmark all call these.

classify (K classes):
    accuracy        share of examples whose argmax is the label
    macro_f1        mean F1 over the classes that occur as label or prediction (scikit-learn's
                    f1_score(average="macro"); a class never predicted and never true is left out)

regress (one value per example, e.g. sentiment in [-3, 3]):
    mae             mean absolute error
    pearson         Pearson correlation of predictions and labels (0 when either is constant:
                    undefined there, and a JSON log cannot hold NaN)
    acc2_nonneg     Acc-2, negative (< 0) vs non-negative (>= 0), over every example
                    (MMSA's "Has0_acc_2")
    acc2_nonzero    Acc-2, negative (< 0) vs positive (> 0), examples labelled exactly 0 left
                    out (MMSA's "Non0_acc_2"; the convention of most MOSI papers since 2019)
    acc7            Acc-7: round(clip(x, -3, 3)) of prediction and label compared as 7 classes
                    (numpy's round: halves to even, as MMSA)
"""
from __future__ import annotations

import numpy as np


def classification_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """[N, K] scores (logits or probabilities) and [N] class indices -> accuracy, macro_f1."""
    predicted = scores.argmax(-1)
    labels = labels.astype(np.int64)
    return {"accuracy": float((predicted == labels).mean()), "macro_f1": macro_f1(predicted, labels)}


def macro_f1(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean of per-class F1 = 2 TP / (2 TP + FP + FN) over the classes present."""
    classes = np.union1d(predicted, labels)
    f1 = []
    for c in classes:
        tp = np.sum((predicted == c) & (labels == c))
        fp = np.sum((predicted == c) & (labels != c))
        fn = np.sum((predicted != c) & (labels == c))
        f1.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1))


def regression_metrics(predicted: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """[N] predictions and [N] labels -> mae, pearson, acc2_nonneg, acc2_nonzero, acc7."""
    predicted, labels = predicted.astype(np.float64), labels.astype(np.float64)
    nonzero = labels != 0
    acc2_nonzero = float(((predicted[nonzero] > 0) == (labels[nonzero] > 0)).mean()) if nonzero.any() else 0.0
    return {
        "mae": float(np.abs(predicted - labels).mean()),
        "pearson": pearson(predicted, labels),
        "acc2_nonneg": float(((predicted >= 0) == (labels >= 0)).mean()),
        "acc2_nonzero": acc2_nonzero,
        "acc7": float((_seven_classes(predicted) == _seven_classes(labels)).mean()),
    }


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    dx, dy = x - x.mean(), y - y.mean()
    denominator = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    return float((dx * dy).sum() / denominator) if denominator > 0 else 0.0


def _seven_classes(values: np.ndarray) -> np.ndarray:
    return np.round(np.clip(values, -3.0, 3.0))


__all__ = ["classification_metrics", "macro_f1", "pearson", "regression_metrics"]
