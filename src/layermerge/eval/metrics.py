"""Metrics, written out by hand so their definitions are visible and dependency-free.

Each takes 1-D arrays. Degenerate inputs follow the usual conventions: Matthews correlation is 0
when a confusion-matrix margin is empty, F1 is 0 when there are no true or predicted positives, and
Pearson/Spearman are NaN when either side is constant (a correlation is undefined there).
``task_score`` turns predictions into the number the literature reports for a task, in percent
(an undefined correlation counts as 0 there).
"""

from __future__ import annotations

import math

import numpy as np

from layermerge.errors import DataError


def _pair(predictions, labels) -> tuple[np.ndarray, np.ndarray]:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or predictions.ndim != 1:
        raise DataError(f"predictions {predictions.shape} and labels {labels.shape} must be 1-D of equal "
                        "length")
    if predictions.size == 0:
        raise DataError("cannot score zero examples")
    return predictions, labels


def accuracy(predictions, labels) -> float:
    predictions, labels = _pair(predictions, labels)
    return float(np.mean(predictions == labels))


def f1_binary(predictions, labels, positive: int = 1) -> float:
    """F1 of the positive class: 2·TP / (2·TP + FP + FN)."""
    predictions, labels = _pair(predictions, labels)
    tp = int(np.sum((predictions == positive) & (labels == positive)))
    fp = int(np.sum((predictions == positive) & (labels != positive)))
    fn = int(np.sum((predictions != positive) & (labels == positive)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews_corrcoef(predictions, labels) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K), equal to the φ coefficient for two classes:
    (c·s − Σ_k p_k t_k) / sqrt((s² − Σ p_k²)(s² − Σ t_k²)) with c correct, s total, p_k/t_k the
    predicted/true counts of class k."""
    predictions, labels = _pair(predictions, labels)
    classes = np.union1d(predictions, labels)
    p = np.array([np.sum(predictions == k) for k in classes], dtype=np.float64)
    t = np.array([np.sum(labels == k) for k in classes], dtype=np.float64)
    s = float(predictions.size)
    c = float(np.sum(predictions == labels))
    denominator = math.sqrt((s * s - p @ p) * (s * s - t @ t))
    return 0.0 if denominator == 0 else float((c * s - p @ t) / denominator)


def pearson(x, y) -> float:
    x, y = _pair(x, y)
    x, y = x.astype(np.float64) - np.mean(x), y.astype(np.float64) - np.mean(y)
    denominator = math.sqrt(float(x @ x) * float(y @ y))
    return float("nan") if denominator == 0 else float(x @ y) / denominator


def rank_with_ties(values) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span (as Spearman requires)."""
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size, dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < values.size:
        end = start
        while end + 1 < values.size and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x, y) -> float:
    """Pearson correlation of tie-averaged ranks."""
    x, y = _pair(x, y)
    return pearson(rank_with_ties(x), rank_with_ties(y))


def f1_macro(predictions, labels) -> float:
    """The unweighted mean of each class's F1 (classes seen in labels or predictions)."""
    predictions, labels = _pair(predictions, labels)
    classes = np.union1d(predictions, labels)
    return float(np.mean([f1_binary(predictions, labels, positive=k) for k in classes]))


# Metric name (a task spec's ``metric``) -> parts computed from (predictions, labels); the score is their
# mean. The names are those of layermerge.data.tasks.LABEL_METRICS.
METRIC_PARTS = {
    "accuracy": {"accuracy": accuracy},
    "f1": {"f1": f1_binary},
    "macro_f1": {"macro_f1": f1_macro},
    "matthews": {"matthews": matthews_corrcoef},
    "accuracy_f1": {"accuracy": accuracy, "f1": f1_binary},
    "pearson": {"pearson": pearson},
    "spearman": {"spearman": spearman},
    "pearson_spearman": {"pearson": pearson, "spearman": spearman},
}


def task_score(metric: str, predictions, labels) -> tuple[float, dict[str, float]]:
    """(score, parts), both in percent: the mean of the metric's parts, as GLUE reports it. ``metric`` may
    also be a callable ``(predictions, labels) -> float in [0, 1]`` (a task's own scorer)."""
    if callable(metric):
        _pair(predictions, labels)
        value = float(metric(np.asarray(predictions), np.asarray(labels)))
        return 100.0 * value, {"score": 100.0 * value}
    if metric not in METRIC_PARTS:
        raise DataError(f"unknown metric {metric!r}; known: {', '.join(METRIC_PARTS)}")
    parts = {name: 100.0 * fn(predictions, labels) for name, fn in METRIC_PARTS[metric].items()}
    # A constant prediction has no correlation with anything: count it as 0, not NaN, so averages
    # and JSON reports stay numbers.
    parts = {name: 0.0 if math.isnan(value) else value for name, value in parts.items()}
    return float(np.mean(list(parts.values()))), parts
