"""PAR metrics (eq. 21-25): hand-computed cases, edge cases, and scikit-learn where it agrees."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    balanced_accuracy_score,
    jaccard_score,
    precision_score,
    recall_score,
)

from campar_ray.metrics import (
    THRESHOLD_PROTOCOLS,
    choose_threshold,
    par_metrics,
    protocol_statement,
    select_threshold,
    summary,
)

LABELS = np.array([[1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 0]])
PREDICTED = np.array([[1, 0, 0, 0], [0, 1, 1, 1], [1, 0, 0, 0]])
PROBS = np.where(PREDICTED == 1, 0.9, 0.1)


def test_hand_computed_case():
    m = par_metrics(LABELS, PROBS)
    # per attribute (TP/P + TN/N) / 2; attribute 3 has no positives: (0 + 2/3) / 2
    np.testing.assert_allclose(m["attr_accuracy"], [1.0, 0.75, 0.75, 1 / 3])
    assert m["mA"] == pytest.approx((1 + 0.75 + 0.75 + 1 / 3) / 4)
    # per image |Y&F|/|Y|F|, /|F|, /|Y|: (1/2, 1, 1/2), (2/3, 2/3, 1), (1/2, 1, 1/2)
    assert m["accuracy"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert m["precision"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    assert m["recall"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    p, r = (1 + 2 / 3 + 1) / 3, 2 / 3
    assert m["f1"] == pytest.approx(2 * p * r / (p + r))
    np.testing.assert_allclose(m["attr_precision"], [1.0, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(m["attr_recall"], [1.0, 0.5, 0.5, 0.0])
    np.testing.assert_allclose(m["attr_positive_rate"], [2 / 3, 2 / 3, 2 / 3, 0])
    np.testing.assert_allclose(m["attr_predicted_rate"], [2 / 3, 1 / 3, 1 / 3, 1 / 3])
    assert summary(m) == {
        key: float(m[key]) for key in ("mA", "accuracy", "precision", "recall", "f1")
    }


def test_f1_comes_from_averaged_precision_and_recall_not_mean_of_per_image_f1():
    labels = np.array([[1, 1], [1, 0]])
    probs = np.array([[1.0, 0.0], [1.0, 1.0]])
    m = par_metrics(labels, probs)
    # image 0: P=1, R=1/2; image 1: P=1/2, R=1 -> mean P = mean R = 3/4, F1 = 3/4
    assert m["f1"] == pytest.approx(0.75)
    per_image_f1 = np.mean([2 * 1 * 0.5 / 1.5, 2 * 0.5 * 1 / 1.5])
    assert m["f1"] != pytest.approx(per_image_f1)


def test_attribute_without_positives_scores_only_its_negatives():
    labels = np.array([[0, 1], [0, 0], [0, 1]])
    m = par_metrics(labels, np.array([[0.9, 0.9], [0.1, 0.1], [0.1, 0.9]]))
    assert m["attr_accuracy"][0] == pytest.approx((0 + 2 / 3) / 2)
    assert m["attr_recall"][0] == 0.0


def test_image_without_positive_labels_or_predictions_scores_zero():
    labels = np.array([[0, 0, 0], [1, 0, 1]])
    m = par_metrics(labels, np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 1.0]]))
    # image 0 has empty Y and F: 0 on every instance metric; image 1 is perfect
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(0.5)
    assert all(np.isfinite(v) for v in summary(m).values())


def test_image_without_positive_predictions_has_zero_precision_and_recall():
    labels = np.array([[1, 1, 0], [1, 0, 0]])
    m = par_metrics(labels, np.array([[0.2, 0.3, 0.1], [0.9, 0.1, 0.1]]))
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(0.5)
    assert m["accuracy"] == pytest.approx(0.5)


def _random_case(seed: int, n: int = 60, m: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, m)) < 0.3).astype(np.int8)
    labels[:3] = 0  # images without positives
    probs = np.clip(labels * 0.4 + rng.random((n, m)) * 0.7, 0, 1)
    probs[3:5] = 0.0  # images without positive predictions
    return labels, probs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_instance_metrics_match_scikit_learn_samples_averages(seed):
    labels, probs = _random_case(seed)
    m = par_metrics(labels, probs)
    pred = (probs >= 0.5).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert m["accuracy"] == pytest.approx(
            jaccard_score(labels, pred, average="samples", zero_division=0)
        )
        assert m["precision"] == pytest.approx(
            precision_score(labels, pred, average="samples", zero_division=0)
        )
        assert m["recall"] == pytest.approx(
            recall_score(labels, pred, average="samples", zero_division=0)
        )
        np.testing.assert_allclose(
            m["attr_precision"], precision_score(labels, pred, average=None, zero_division=0)
        )
        np.testing.assert_allclose(
            m["attr_recall"], recall_score(labels, pred, average=None, zero_division=0)
        )


@pytest.mark.parametrize("seed", [0, 1])
def test_mean_accuracy_is_mean_balanced_accuracy_per_attribute(seed):
    labels, probs = _random_case(seed)
    assert (labels.sum(0) > 0).all() and (labels.sum(0) < len(labels)).all()
    m = par_metrics(labels, probs, threshold=0.6)
    pred = probs >= 0.6
    expected = [balanced_accuracy_score(labels[:, j], pred[:, j]) for j in range(labels.shape[1])]
    np.testing.assert_allclose(m["attr_accuracy"], expected)
    assert m["mA"] == pytest.approx(np.mean(expected))


def test_per_attribute_threshold_is_applied_column_wise():
    labels = np.array([[1, 1], [0, 0]])
    probs = np.array([[0.4, 0.8], [0.2, 0.6]])
    assert par_metrics(labels, probs, threshold=np.array([0.3, 0.7]))["mA"] == pytest.approx(1.0)
    # one threshold of 0.5 predicts attribute 0 all negative and attribute 1 all positive
    assert par_metrics(labels, probs, threshold=0.5)["mA"] == pytest.approx(0.5)


def test_choose_threshold_per_attribute_and_global():
    labels = np.array([[1, 1], [0, 0], [1, 1], [0, 0]])
    probs = np.array([[0.4, 0.8], [0.2, 0.6], [0.4, 0.8], [0.2, 0.6]])
    # attribute 0 separates for t in (0.2, 0.4], attribute 1 for t in (0.6, 0.8]: first wins
    np.testing.assert_allclose(choose_threshold(labels, probs, per_attribute=True), [0.25, 0.65])
    # no single threshold separates both: best global mA is 0.75, first reached at 0.25
    assert choose_threshold(labels, probs) == pytest.approx(0.25)

    # F1 over candidates: 0.5 adds a false positive, 0.9 drops a true one, 0.7 is perfect
    labels, probs = np.array([[1, 0], [1, 1]]), np.array([[0.9, 0.6], [0.9, 0.8]])
    chosen = choose_threshold(labels, probs, metric="f1", candidates=np.array([0.5, 0.7, 0.9]))
    assert chosen == pytest.approx(0.7)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="equal N x M"):
        par_metrics(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="equal N x M"):
        par_metrics(np.zeros(3), np.zeros(3))


def test_select_threshold_follows_each_protocol():
    labels, probs = _random_case(3)
    assert select_threshold("0.5", labels, probs) == 0.5
    chosen = select_threshold("val", labels, probs)
    assert isinstance(chosen, float) and chosen == choose_threshold(labels, probs)
    per_attribute = select_threshold("val-per-attribute", labels, probs)
    assert per_attribute.shape == (labels.shape[1],)
    np.testing.assert_array_equal(
        per_attribute, choose_threshold(labels, probs, per_attribute=True)
    )
    # each attribute's own best mA term can only match or beat one threshold for all
    assert (
        par_metrics(labels, probs, per_attribute)["mA"] >= par_metrics(labels, probs, chosen)["mA"]
    )
    assert THRESHOLD_PROTOCOLS == ("0.5", "val", "val-per-attribute")
    assert all(protocol_statement(p).startswith(f"Threshold protocol {p}:") for p in ("0.5", "val"))


def test_per_attribute_protocol_beats_one_threshold_where_attributes_need_different_ones():
    labels = np.array([[1, 1], [0, 0], [1, 1], [0, 0]])
    probs = np.array([[0.4, 0.8], [0.2, 0.6], [0.4, 0.8], [0.2, 0.6]])
    assert par_metrics(labels, probs, select_threshold("val", labels, probs))["mA"] == 0.75
    per_attribute = select_threshold("val-per-attribute", labels, probs)
    assert par_metrics(labels, probs, per_attribute)["mA"] == pytest.approx(1.0)


@pytest.mark.parametrize("protocol", ["0.4", "test", "per-attribute", ""])
def test_unknown_protocol_names_the_valid_ones(protocol):
    with pytest.raises(
        ValueError, match=r"unknown threshold protocol .*; valid: 0\.5, val, val-per-attribute"
    ):
        select_threshold(protocol, np.zeros((2, 2)), np.zeros((2, 2)))
