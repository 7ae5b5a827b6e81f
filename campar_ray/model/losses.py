"""Stage-1 loss: BCE on the shared and the specific logits (eq. 13-16).

Reduction: summed over attributes, averaged over images, for both the plain and the weighted
BCE (the baseline's [15] ``size_sum`` reduction). The two therefore share one scale: the
weights lie in [1, e], so switching ``train.loss`` moves the loss by at most a factor e and
the reference learning rate suits both. Summing (not averaging) over attributes keeps the
gradient per attribute independent of how many attributes a dataset has.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from campar_ray.model.campar import ParOutput


def positive_ratio(labels: np.ndarray) -> Tensor:
    """Per-attribute positive rate of the (training) labels, N x M -> M, float32."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty N x M array, got shape {labels.shape}")
    return torch.from_numpy((labels > 0).mean(axis=0)).float()


def attribute_weights(targets: Tensor, ratio: Tensor) -> Tensor:
    """``exp(y * (1 - ratio) + (1 - y) * ratio)``: rare positives and rare negatives weigh more."""
    ratio = ratio.to(targets)
    return torch.exp(targets * (1 - ratio) + (1 - targets) * ratio)


def bce(logits: Tensor, targets: Tensor, ratio: Tensor | None = None) -> Tensor:
    """BCE with logits, summed over attributes and averaged over images.

    With ``ratio`` (M positive rates) each term is weighted by :func:`attribute_weights`.
    """
    targets = targets.to(torch.float32)
    losses = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
    if ratio is not None:
        losses = losses * attribute_weights(targets, ratio)
    return losses.sum(dim=1).mean()


def stage1_loss(output: ParOutput, targets: Tensor, positive_ratio: Tensor | None = None) -> Tensor:
    """Loss1 = L(shared) + L(specific); the baseline has only the shared term."""
    loss = bce(output.shared, targets, positive_ratio)
    if output.specific is not None:
        loss = loss + bce(output.specific, targets, positive_ratio)
    return loss


def init_bias_from_prior(bias: Tensor, ratio: Tensor) -> None:
    """Start each attribute's ``bias`` at ``logit(positive rate)`` (the prior of Lin et al., 2017).

    ``bias`` is one of the head's ``output_biases()``: the classifier's ``b``, or a BatchNorm
    shift when the logits are batch-normalised (``b`` then cancels).

    CAM-PAR's specific logit of a negative image cannot fall below the bias
    (``mean(CAM * A) >= 0``), and Adam moves a bias by about ``lr`` per step, so with a zero
    bias and the reference ``lr = 1e-4`` negatives stay near ``sigmoid(0) = 0.5`` for most
    of training. Starting at the prior removes that handicap for both heads alike.
    """
    with torch.no_grad():
        bias.copy_(torch.logit(ratio.clamp(1e-3, 1 - 1e-3)).to(bias))
