"""Threshold-free evidence about a run's scores, computed from stored logits in seconds.

Why a head wins or loses mA can be read off its logits without retraining:

- **Per-attribute AUC** of each logit kind: how well a score ranks positives above negatives,
  whatever threshold a protocol then picks. A head whose AUC matches the baseline's but whose
  mA does not is losing at the threshold, not in what it learnt.
- **The floor.** With the thesis's CAM (eq. 10) ``l_specific_j >= b_j``, with equality for
  every image whose activation map ``A_j`` has no positive value; all of them tie at one value
  and fall on one side of any threshold together. ``floor_ties`` counts, per attribute, the
  negatives and positives tied at the attribute's lowest specific logit: for the ``relu-max``
  CAM that lowest value is ``b_j`` (the ties are the images with an all-zero CAM), and under a
  CAM normalisation without a floor it holds one image unless scores really tie.
- **Per-attribute mA terms** under each threshold protocol (``metrics.THRESHOLD_PROTOCOLS``),
  with the two halves of each term: the recall of positives and the predicted-positive rate.
  mA is ``(recall + true-negative rate) / 2``, so a head with a better AUC and a worse mA at
  0.5 shows here whether it is the positives or the negatives it gives up, and on which
  attributes (compare the predicted rate with the positive rate of the split).
"""

from __future__ import annotations

import numpy as np

from campar_ray.metrics import (
    THRESHOLD_PROTOCOLS,
    par_metrics,
    select_threshold,
    summary,
)

TIE_RTOL = 1e-6
"""Relative tolerance of a tie at the floor: float32 logits that are ``0 + b`` are exactly equal,
this only absorbs BatchNorm's folded arithmetic."""


def floor_ties(labels: np.ndarray, specific: np.ndarray) -> dict[str, np.ndarray]:
    """Share of negatives and of positives whose specific logit ties at the attribute's minimum.

    Returns ``negatives`` and ``positives`` (M values each, NaN where a class is absent) and
    ``floor`` (the minimum itself, M values). Unknown labels (-1) count in neither class.
    """
    labels = np.asarray(labels)
    present, absent = labels > 0, labels == 0
    specific = np.asarray(specific, dtype=np.float64)
    floor = specific.min(axis=0)
    tied = np.isclose(specific, floor, rtol=TIE_RTOL, atol=TIE_RTOL)
    with np.errstate(invalid="ignore", divide="ignore"):
        negatives = (tied & absent).sum(0) / absent.sum(0)
        positives = (tied & present).sum(0) / present.sum(0)
    return {"negatives": negatives, "positives": positives, "floor": floor}


def protocol_figures(
    val_labels: np.ndarray, val_probs: np.ndarray, test_labels: np.ndarray, test_probs: np.ndarray
) -> dict[str, dict]:
    """Test metrics under every protocol, thresholds chosen on val only.

    Per protocol: the five summary figures, ``threshold`` (one value or M values),
    ``attr_mA`` (the per-attribute mA terms on test), ``attr_recall`` (recall of the positives)
    and ``attr_predicted_rate`` (share of test images predicted positive).
    """
    figures = {}
    for protocol in THRESHOLD_PROTOCOLS:
        threshold = select_threshold(protocol, val_labels, val_probs)
        metrics = par_metrics(test_labels, test_probs, threshold)
        figures[protocol] = {
            **summary(metrics),
            "threshold": np.asarray(threshold).tolist(),
            "attr_mA": metrics["attr_accuracy"].tolist(),
            "attr_recall": metrics["attr_recall"].tolist(),
            "attr_predicted_rate": metrics["attr_predicted_rate"].tolist(),
        }
    return figures
