"""Threshold-free diagnostics of stored logits: AUC, the specific-logit floor, protocols."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from campar_ray.evaluate.diagnostics import floor_ties, protocol_figures
from campar_ray.metrics import THRESHOLD_PROTOCOLS, attribute_auc, choose_threshold, par_metrics


def _pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """The definition: P(score of a positive > score of a negative), ties counted half."""
    pos, neg = scores[labels > 0], scores[labels == 0]
    wins = [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)]
    return float(np.mean(wins))


def test_auc_matches_the_pairwise_definition_with_ties_and_missing_classes():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(40, 4))
    labels[:, 3] = 1  # no negatives: AUC undefined
    scores = np.round(rng.normal(size=(40, 4)) + labels, 1)  # rounding makes ties
    auc = attribute_auc(labels, scores)
    for j in range(3):
        assert auc[j] == pytest.approx(_pairwise_auc(labels[:, j], scores[:, j]))
    assert np.isnan(auc[3])


def test_floor_ties_count_negatives_and_positives_at_the_lowest_logit():
    bias = np.array([-2.0, 0.5], dtype=np.float32)
    labels = np.array([[0, 1], [0, 0], [1, 1], [0, 0], [1, 0]])
    # column 0: three images at the floor (two negatives, one positive); column 1: one image
    specific = np.array([[0, 0.1], [0, 0.0], [0, 0.3], [0.4, 0.2], [0.9, 0.5]]) + bias
    ties = floor_ties(labels, specific.astype(np.float32))
    np.testing.assert_allclose(ties["negatives"], [2 / 3, 1 / 3])
    np.testing.assert_allclose(ties["positives"], [1 / 2, 0.0])
    np.testing.assert_allclose(ties["floor"], bias, rtol=1e-6)


def test_protocol_figures_choose_on_val_and_score_test():
    rng = np.random.default_rng(1)
    val_labels, test_labels = rng.integers(0, 2, (60, 5)), rng.integers(0, 2, (50, 5))
    val_probs = np.clip(0.3 * val_labels + rng.uniform(0, 0.7, (60, 5)), 0, 1)
    test_probs = np.clip(0.3 * test_labels + rng.uniform(0, 0.7, (50, 5)), 0, 1)
    figures = protocol_figures(val_labels, val_probs, test_labels, test_probs)
    assert tuple(figures) == THRESHOLD_PROTOCOLS
    assert figures["0.5"]["threshold"] == 0.5
    chosen = choose_threshold(val_labels, val_probs)
    assert figures["val"]["threshold"] == chosen
    assert figures["val"]["mA"] == pytest.approx(par_metrics(test_labels, test_probs, chosen)["mA"])
    assert len(figures["val-per-attribute"]["threshold"]) == 5
    assert len(figures["val-per-attribute"]["attr_mA"]) == 5


def test_protocol_figures_split_each_mA_term_into_its_halves():
    # One attribute, 4 positives and 6 negatives; at 0.5 two positives and one negative pass.
    labels = np.array([[1], [1], [1], [1], [0], [0], [0], [0], [0], [0]])
    probs = np.array([[0.9], [0.6], [0.4], [0.1], [0.7], [0.2], [0.2], [0.1], [0.3], [0.0]])
    fixed = protocol_figures(labels, probs, labels, probs)["0.5"]
    assert fixed["attr_recall"] == [pytest.approx(0.5)]
    assert fixed["attr_predicted_rate"] == [pytest.approx(0.3)]
    true_negative_rate = 5 / 6
    assert fixed["attr_mA"] == [pytest.approx((0.5 + true_negative_rate) / 2)]
