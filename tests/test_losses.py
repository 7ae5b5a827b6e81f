"""Stage-1 losses: BCE and the weighted BCE of the baseline [15], against hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from campar_ray.model import ParOutput, attribute_weights, bce, positive_ratio, stage1_loss

LOGITS = torch.tensor([[0.0, 2.0], [-1.0, 3.0]])
TARGETS = torch.tensor([[1.0, 0.0], [0.0, 1.0]])


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# -log(sigmoid(z)) = softplus(-z) for a positive, -log(1 - sigmoid(z)) = softplus(z) for a negative.
TERMS = [[_softplus(-0.0), _softplus(2.0)], [_softplus(-1.0), _softplus(-3.0)]]


def test_bce_is_summed_over_attributes_and_averaged_over_images():
    expected = (sum(TERMS[0]) + sum(TERMS[1])) / 2
    assert bce(LOGITS, TARGETS).item() == pytest.approx(expected, rel=1e-6)


def test_weighted_bce_uses_the_positive_rate_weights():
    ratio = torch.tensor([0.2, 0.7])
    # positive: exp(1 - ratio); negative: exp(ratio)
    weights = [[math.exp(0.8), math.exp(0.7)], [math.exp(0.2), math.exp(0.3)]]
    expected = (np.array(weights) * np.array(TERMS)).sum() / 2
    assert bce(LOGITS, TARGETS, ratio).item() == pytest.approx(expected, rel=1e-6)


def test_attribute_weights_formula_and_range():
    ratio = torch.tensor([0.0, 0.1, 0.5, 1.0])
    weights = attribute_weights(torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 0]]), ratio)
    torch.testing.assert_close(weights[0], torch.exp(1 - ratio))
    torch.testing.assert_close(weights[1], torch.exp(ratio))
    assert weights.min() >= 1 and weights.max() <= math.e + 1e-6  # same scale as plain BCE


def test_stage1_loss_adds_shared_and_specific_terms():
    specific = torch.tensor([[1.0, -1.0], [0.5, 0.0]])
    campar = stage1_loss(ParOutput(LOGITS, specific, None), TARGETS)
    assert campar.item() == pytest.approx((bce(LOGITS, TARGETS) + bce(specific, TARGETS)).item())
    baseline = stage1_loss(ParOutput(LOGITS, None, None), TARGETS)
    assert baseline.item() == pytest.approx(bce(LOGITS, TARGETS).item())
    ratio = torch.tensor([0.3, 0.6])
    weighted = stage1_loss(ParOutput(LOGITS, specific, None), TARGETS, ratio)
    expected = bce(LOGITS, TARGETS, ratio) + bce(specific, TARGETS, ratio)
    assert weighted.item() == pytest.approx(expected.item())


def test_loss_is_float32_and_differentiable_from_bf16_logits():
    logits = LOGITS.to(torch.bfloat16).requires_grad_()
    loss = bce(logits, TARGETS.to(torch.int8))
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(logits.grad.float()).all()


def test_positive_ratio_per_attribute():
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 0, 0]], dtype=np.int8)
    ratio = positive_ratio(labels)
    assert ratio.dtype == torch.float32
    torch.testing.assert_close(ratio, torch.tensor([0.75, 0.5, 0.0]))
    with pytest.raises(ValueError, match="N x M"):
        positive_ratio(np.array([1, 0, 1]))


@pytest.mark.parametrize("logit_norm", ["none", "batchnorm", "batchnorm-own-affine"])
def test_prior_bias_starts_each_attribute_at_its_positive_rate(logit_norm):
    from campar_ray.model import CamParHead, init_bias_from_prior

    head = CamParHead(8, 3, logit_norm=logit_norm).eval()
    ratio = torch.tensor([0.5, 0.1, 0.0])
    for bias in head.output_biases():
        init_bias_from_prior(bias, ratio)
    expected = torch.tensor([0.5, 0.1, 1e-3])
    for bias in head.output_biases():
        assert torch.allclose(torch.sigmoid(bias), expected, atol=1e-6)
    with torch.no_grad():  # a zero feature map scores exactly the prior, BatchNorm or not
        if head.logit_norm is not None:
            head.classifier.bias.zero_()  # cancelled by training-time centring anyway
        out = head(torch.zeros(2, 8, 3, 3))
    assert torch.allclose(torch.sigmoid(out.shared), expected.expand(2, 3), atol=1e-6)
    assert torch.allclose(torch.sigmoid(out.specific), expected.expand(2, 3), atol=1e-6)
