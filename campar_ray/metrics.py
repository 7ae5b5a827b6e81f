"""PAR metrics exactly as the field's reference code computes them (eq. 21-25).

Label-based: mA = mean over attributes of (TP/P + TN/N) / 2. Instance-based: accuracy,
precision and recall per image, averaged over images, with an empty denominator scoring 0;
F1 from the *averaged* precision and recall. All vectorised over an N x M array.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-20


def par_metrics(
    labels: np.ndarray, probs: np.ndarray, threshold: float | np.ndarray = 0.5
) -> dict[str, float | np.ndarray]:
    """Metrics of ``probs >= threshold`` against binary ``labels`` (both N x M).

    ``threshold`` may be one value or one per attribute. Returns fractions in [0, 1]:
    ``mA``, ``accuracy``, ``precision``, ``recall``, ``f1`` and per-attribute arrays
    ``attr_accuracy`` (the mA term), ``attr_precision``, ``attr_recall``, ``attr_f1``,
    ``attr_positive_rate`` (ground truth) and ``attr_predicted_rate``.
    """
    truth, pred = _binary(labels, probs, threshold)
    tp = (truth & pred).sum(0).astype(np.float64)
    tn = (~truth & ~pred).sum(0).astype(np.float64)
    positives = truth.sum(0).astype(np.float64)
    negatives = (~truth).sum(0).astype(np.float64)
    predicted = pred.sum(0).astype(np.float64)
    label_accuracy = (tp / (positives + EPS) + tn / (negatives + EPS)) / 2
    attr_precision = tp / (predicted + EPS)
    attr_recall = tp / (positives + EPS)

    intersection = (truth & pred).sum(1).astype(np.float64)
    union = (truth | pred).sum(1).astype(np.float64)
    accuracy = np.mean(intersection / (union + EPS))
    precision = np.mean(intersection / (pred.sum(1) + EPS))
    recall = np.mean(intersection / (truth.sum(1) + EPS))
    return {
        "mA": float(label_accuracy.mean()),
        "accuracy": float(accuracy),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(2 * precision * recall / (precision + recall + EPS)),
        "attr_accuracy": label_accuracy,
        "attr_precision": attr_precision,
        "attr_recall": attr_recall,
        "attr_f1": 2 * attr_precision * attr_recall / (attr_precision + attr_recall + EPS),
        "attr_positive_rate": positives / max(len(truth), 1),
        "attr_predicted_rate": predicted / max(len(truth), 1),
    }


SUMMARY_KEYS = ("mA", "accuracy", "precision", "recall", "f1")


def summary(metrics: dict[str, float | np.ndarray]) -> dict[str, float]:
    """The five headline numbers, JSON-ready."""
    return {key: float(metrics[key]) for key in SUMMARY_KEYS}


def choose_threshold(
    labels: np.ndarray,
    probs: np.ndarray,
    metric: str = "mA",
    per_attribute: bool = False,
    candidates: np.ndarray | None = None,
) -> float | np.ndarray:
    """The threshold that maximises ``metric`` on (validation) data.

    One global value by default; ``per_attribute=True`` picks each attribute's threshold by
    its own balanced accuracy (the mA term), which is what mA rewards.
    """
    grid = (
        np.round(np.linspace(0.05, 0.95, 19), 2) if candidates is None else np.asarray(candidates)
    )
    if not per_attribute:
        scores = [par_metrics(labels, probs, t)[metric] for t in grid]
        return float(grid[int(np.argmax(scores))])
    per_threshold = np.stack([par_metrics(labels, probs, t)["attr_accuracy"] for t in grid])
    return grid[np.argmax(per_threshold, axis=0)]


def _binary(
    labels: np.ndarray, probs: np.ndarray, threshold: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    probs = np.asarray(probs)
    if labels.shape != probs.shape or labels.ndim != 2:
        raise ValueError(
            f"labels {labels.shape} and probs {probs.shape} must be equal N x M arrays"
        )
    return labels > 0, probs >= np.asarray(threshold)
