"""The decision (campar_ray.decision): which logits, logits -> probabilities, the CFAR
refinement, thresholds by protocol and the calibration, on small arrays (no Ray, no network)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from campar_ray.decision import (
    CALIBRATED,
    calibrated_probabilities,
    cfar_logits,
    check_decision,
    final_logits,
    final_source,
    fit_calibration,
    prediction_logits,
    probabilities,
    read_calibration,
    refine,
    save_calibration,
    source_probabilities,
)
from campar_ray.metrics import select_threshold
from campar_ray.model import ParOutput
from campar_ray.run.logits import SplitLogits


def test_prediction_logits_choice_on_tensors_and_arrays():
    shared, specific = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 0.0]])
    out = ParOutput(shared, specific, None)
    assert torch.equal(prediction_logits(out, "specific"), specific)
    assert torch.equal(prediction_logits(out, "shared"), shared)
    assert torch.equal(prediction_logits(out, "mean"), torch.tensor([[2.0, -1.0]]))
    baseline = ParOutput(shared, None, None)
    assert all(torch.equal(prediction_logits(baseline, p), shared) for p in ("specific", "mean"))
    assert torch.equal(cfar_logits(baseline), shared) and torch.equal(cfar_logits(out), specific)
    with pytest.raises(ValueError, match="valid: specific, shared, mean"):
        prediction_logits(out, "max")
    stored = _split(shared.numpy(), specific.numpy(), np.array([[1, 0]]))
    np.testing.assert_array_equal(prediction_logits(stored, "mean"), [[2.0, -1.0]])
    np.testing.assert_array_equal(cfar_logits(stored), specific.numpy())


def test_probabilities_are_float32_sigmoid_of_arrays_and_tensors():
    logits = np.array([[-30.0, 0.0, 2.0]], dtype=np.float32)
    expected = 1 / (1 + np.exp(-logits.astype(np.float64)))
    np.testing.assert_allclose(probabilities(logits), expected, rtol=1e-6)
    assert probabilities(torch.from_numpy(logits)).dtype == np.float32


class _Lookup:
    def reconstruct(self, r):
        return r[:, ::-1].copy()


class _Head:
    threshold = 0.4

    def logits(self, r_hat, logits):
        return 2 * r_hat + logits

    def refined_logits(self, logits):
        return refine(logits, _Lookup(), self)


def test_refinement_and_final_source():
    rng = np.random.default_rng(0)
    split = _split(rng.normal(size=(6, 3)), rng.normal(size=(6, 3)), rng.random((6, 3)) > 0.5)
    head = _Head()
    specific = split.specific.astype(np.float32)
    expected = 2 * probabilities(specific)[:, ::-1] + specific
    np.testing.assert_allclose(final_logits(split, "shared", head), expected, rtol=1e-6)
    np.testing.assert_array_equal(final_logits(split, "shared", None), split.shared)
    assert final_source(split, "mean", None) == "stage1_mean"
    assert final_source(split, "mean", head) == "stage1_cfar"
    baseline = _split(split.shared, None, split.labels)
    assert final_source(baseline, "specific", None) == "stage1_shared"
    sources = source_probabilities(split, "mean", head)
    assert list(sources) == ["stage1_shared", "stage1_specific", "stage1_mean", "stage1_cfar"]


def test_calibration_decides_at_half_where_val_per_attribute_thresholds_do(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.random((400, 4)) < [0.1, 0.3, 0.5, 0.8]
    shared = rng.normal(size=(400, 4)) + 1.5 * labels - 1.0
    val = _split(shared, None, labels)
    calibration = fit_calibration(val, "specific", None)
    assert calibration.source == "stage1_shared"
    raw = probabilities(shared)
    thresholds = select_threshold("val-per-attribute", val.labels, raw)
    calibrated = calibrated_probabilities(shared.astype(np.float32), calibration)
    # the same decisions, except where a probability sits on its threshold to float precision
    disagree = (calibrated >= 0.5) != (raw >= thresholds)
    assert np.all(np.abs(raw - thresholds)[disagree] < 1e-6)
    assert calibration.threshold.value == 0.5 and calibration.threshold.protocol == CALIBRATED
    save_calibration(str(tmp_path / "calibration.json"), calibration)
    assert read_calibration(str(tmp_path / "calibration.json"), 4) == calibration
    with pytest.raises(ValueError, match="is not a calibration"):
        read_calibration(str(tmp_path / "calibration.json"), 5)
    check_decision(CALIBRATED)
    with pytest.raises(ValueError, match=r"valid: 0\.5, val, val-per-attribute, calibrated"):
        check_decision("test")


def _split(shared, specific, labels) -> SplitLogits:
    m = np.shape(shared)[1]
    return SplitLogits(
        images=[str(i) for i in range(len(shared))],
        labels=np.asarray(labels, dtype=np.int8),
        shared=np.asarray(shared, dtype=np.float32),
        specific=None if specific is None else np.asarray(specific, dtype=np.float32),
        attributes=tuple(f"a{j}" for j in range(m)),
        eval_attributes=(),
    )
