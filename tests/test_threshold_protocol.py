"""The threshold-protocol study (``bench.threshold_protocol``) on data whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from bench.threshold_protocol import protocol_metrics


def test_only_the_wide_grid_finds_an_optimum_below_the_default_grid() -> None:
    # One attribute, positives at p = 0.03, negatives at p = 0.01: any threshold in (0.01, 0.03]
    # separates them; 0.05 (the default grid's lowest) and 0.5 predict every image negative.
    labels = np.array([[1], [0], [0], [1], [0], [0]])
    probs = np.where(labels == 1, 0.03, 0.01)
    scores = protocol_metrics(labels, probs, labels, probs)
    assert 0.01 < scores["val_wide"]["threshold"] <= 0.03
    assert scores["val_wide"]["mA"] == pytest.approx(1.0)
    assert scores["val"]["threshold"] == pytest.approx(0.05)
    assert scores["val"]["mA"] == pytest.approx(0.5)
    assert scores["fixed"] == {**scores["val"], "threshold": 0.5}
