"""PAR metrics exactly as the field's reference code computes them (eq. 21-25).

Labels are 1, 0 or -1 (unknown, not annotated): unknown entries are left out of every figure
(:func:`par_metrics`), which with every label known is the reference code, bit for bit.

Label-based: mA = mean over attributes of (TP/P + TN/N) / 2. Instance-based: accuracy,
precision and recall per image, averaged over images, with an empty denominator scoring 0;
F1 from the *averaged* precision and recall. All vectorised over an N x M array.

Threshold-free: per-attribute ROC AUC (:func:`attribute_auc`, :func:`mean_auc`).

A threshold protocol (:data:`THRESHOLD_PROTOCOLS`, :func:`select_threshold`) says how the
decision threshold is obtained: the fixed 0.5 PAR papers report at, or chosen on validation data.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-20

_PROTOCOLS = {
    "0.5": "0.5 on every attribute, the fixed value PAR papers report at",
    "val": "one threshold for all attributes, chosen on the validation split to maximise mA",
    "val-per-attribute": "one threshold per attribute, each chosen on the validation split to "
    "maximise that attribute's mA term (its balanced accuracy)",
}
THRESHOLD_PROTOCOLS = tuple(_PROTOCOLS)
"""How a decision threshold is obtained: fixed, or chosen on validation data (never test)."""
CALIBRATED = "calibrated"
"""Not a threshold on raw probabilities but the model's calibration read at 0.5
(:mod:`campar_ray.decision.calibration`)."""
DECISION_PROTOCOLS = (*THRESHOLD_PROTOCOLS, CALIBRATED)
"""What a prediction can be decided by (``predict --threshold``, ``load_model``)."""


def par_metrics(
    labels: np.ndarray, probs: np.ndarray, threshold: float | np.ndarray = 0.5
) -> dict[str, float | np.ndarray]:
    """Metrics of ``probs >= threshold`` against ``labels`` (both N x M; 1, 0 or -1 unknown).

    ``threshold`` may be one value or one per attribute. Returns fractions in [0, 1]:
    ``mA``, ``accuracy``, ``precision``, ``recall``, ``f1`` and per-attribute arrays
    ``attr_accuracy`` (the mA term), ``attr_precision``, ``attr_recall``, ``attr_f1``,
    ``attr_positive_rate`` (ground truth) and ``attr_predicted_rate``.

    Unknown labels are left out, and so is the prediction on them: each attribute is scored
    over the images that know it (NaN for an attribute no image knows, which mA then skips),
    each image over the attributes it knows (an image that knows none is not averaged). With
    every label known the figures are those of the reference code, computed as before.
    """
    truth, pred = _binary(labels, probs, threshold)
    known = np.asarray(labels) >= 0
    if known.all():
        return _scores(truth, pred, ~truth, len(truth))
    scores = _scores(truth, pred & known, known & ~truth, known.sum(0), known)
    annotated = known.any(0)
    for key in _ATTRIBUTE_KEYS:
        scores[key] = np.where(annotated, scores[key], np.nan)
    return scores


_ATTRIBUTE_KEYS = (
    "attr_accuracy",
    "attr_precision",
    "attr_recall",
    "attr_f1",
    "attr_positive_rate",
    "attr_predicted_rate",
)


def _scores(
    truth: np.ndarray,
    pred: np.ndarray,
    negative: np.ndarray,
    rows: int | np.ndarray,
    known: np.ndarray | None = None,
) -> dict[str, float | np.ndarray]:
    """eq. 21-25 from boolean N x M truth and prediction (predictions on unknown labels
    already off) and the known negatives; ``rows`` counts each attribute's known labels and
    ``known`` (None: all) says which attributes and images have any to be averaged over."""
    tp = (truth & pred).sum(0).astype(np.float64)
    tn = (negative & ~pred).sum(0).astype(np.float64)
    positives = truth.sum(0).astype(np.float64)
    negatives = negative.sum(0).astype(np.float64)
    predicted = pred.sum(0).astype(np.float64)
    label_accuracy = (tp / (positives + EPS) + tn / (negatives + EPS)) / 2
    attr_precision = tp / (predicted + EPS)
    attr_recall = tp / (positives + EPS)

    intersection = (truth & pred).sum(1).astype(np.float64)
    union = (truth | pred).sum(1).astype(np.float64)
    per_image = (
        intersection / (union + EPS),
        intersection / (pred.sum(1) + EPS),
        intersection / (truth.sum(1) + EPS),
    )
    if known is None:
        accuracy, precision, recall = (np.mean(values) for values in per_image)
        mean_accuracy = label_accuracy.mean()
    else:
        images, attributes = known.any(1), known.any(0)
        accuracy, precision, recall = (_mean(values[images]) for values in per_image)
        mean_accuracy = _mean(label_accuracy[attributes])
    rows = np.maximum(rows, 1)
    return {
        "mA": float(mean_accuracy),
        "accuracy": float(accuracy),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(2 * precision * recall / (precision + recall + EPS)),
        "attr_accuracy": label_accuracy,
        "attr_precision": attr_precision,
        "attr_recall": attr_recall,
        "attr_f1": 2 * attr_precision * attr_recall / (attr_precision + attr_recall + EPS),
        "attr_positive_rate": positives / rows,
        "attr_predicted_rate": predicted / rows,
    }


def _mean(values: np.ndarray) -> float:
    """The mean, NaN (without a warning) when there is nothing to average."""
    return float(values.mean()) if values.size else float("nan")


def metrics_by_group(
    labels: np.ndarray,
    probs: np.ndarray,
    threshold: float | np.ndarray,
    groups: np.ndarray,
) -> dict[str, dict[str, float]]:
    """:func:`summary` of :func:`par_metrics` for the rows of each group (e.g. each image's
    ``source``: every dataset of a merged corpus), groups in sorted order."""
    groups = np.asarray(groups)
    return {
        str(group): summary(par_metrics(labels[groups == group], probs[groups == group], threshold))
        for group in np.unique(groups)
    }


SUMMARY_HEADERS = {"mA": "mA", "accuracy": "Acc", "precision": "Prec", "recall": "Rec", "f1": "F1"}
"""The five headline numbers (:func:`summary`'s keys, in order) and their short table headers."""
SUMMARY_KEYS = tuple(SUMMARY_HEADERS)


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
    # An attribute no validation image knows scores NaN at every threshold: it keeps 0.5.
    unscored = np.isnan(per_threshold).all(axis=0)
    chosen = grid[np.argmax(np.nan_to_num(per_threshold, nan=-1.0), axis=0)]
    return np.where(unscored, 0.5, chosen) if unscored.any() else chosen


def check_protocol(protocol: str) -> None:
    """Refuse an unknown threshold protocol, naming the valid ones."""
    if protocol not in _PROTOCOLS:
        raise ValueError(
            f"unknown threshold protocol {protocol!r}; valid: {', '.join(THRESHOLD_PROTOCOLS)}"
        )


def protocol_statement(protocol: str) -> str:
    """The sentence a report or table carries to say which threshold protocol it follows."""
    check_protocol(protocol)
    return f"Threshold protocol {protocol}: {_PROTOCOLS[protocol]}."


def select_threshold(
    protocol: str, val_labels: np.ndarray, val_probs: np.ndarray
) -> float | np.ndarray:
    """The threshold of ``protocol`` for validation labels and probabilities (both N x M).

    ``0.5`` ignores the data; ``val`` is :func:`choose_threshold` (one value, best mA);
    ``val-per-attribute`` gives M values, each the best of its own column. Pass validation
    data only: a threshold chosen on test would inflate the test figures.
    """
    check_protocol(protocol)
    if protocol == "0.5":
        return 0.5
    if protocol == "val":
        return float(choose_threshold(val_labels, val_probs))
    return choose_threshold(val_labels, val_probs, per_attribute=True)


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


def attribute_auc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC per attribute (Mann-Whitney, ties counted half) over the images that know it
    (labels -1 are left out); NaN where a class is absent."""
    from scipy.stats import rankdata  # here: scipy.stats costs every importer 0.5 s

    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    auc = np.full(labels.shape[1], np.nan)
    for j in range(labels.shape[1]):
        known = labels[:, j] >= 0
        present, column = labels[known, j] > 0, scores[known, j]
        positives = int(present.sum())
        negatives = len(present) - positives
        if positives and negatives:
            ranks = rankdata(column)
            auc[j] = (ranks[present].sum() - positives * (positives + 1) / 2) / (
                positives * negatives
            )
    return auc


def mean_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean ROC AUC over the attributes that have both classes: threshold-free, so it ranks
    checkpoints and heads whatever threshold a protocol later picks (NaN when none has)."""
    auc = attribute_auc(labels, scores)
    return float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan")
