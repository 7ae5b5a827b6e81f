"""Stage-1 loss: BCE on the shared and the specific logits (eq. 13-16).

Reduction: summed over attributes, averaged over images, for both the plain and the weighted
BCE (the baseline's [15] ``size_sum`` reduction). The two therefore share one scale: the
weights lie in [1, e], so switching ``train.loss`` moves the loss by at most a factor e and
the reference learning rate suits both. Summing (not averaging) over attributes keeps the
gradient per attribute independent of how many attributes a dataset has.

Unknown labels (-1, "not annotated") are left out: when a batch has any, each attribute's term
is the mean over the images that know it (0 for an attribute no image of the batch knows), and
the terms are summed over attributes. With every label known this is the sum over attributes
of the mean over images, i.e. the reduction above, which is then computed exactly as before.
The positive rates behind the weights count known labels only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from campar_ray.model.campar import ParOutput


def positive_ratio(labels: np.ndarray, attributes: Sequence[str] | None = None) -> Tensor:
    """Per-attribute positive rate of the (training) labels among the known ones, N x M -> M,
    float32. An attribute with no known label has no rate: refused, named by ``attributes``."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty N x M array, got shape {labels.shape}")
    known = labels >= 0
    if known.all():
        return torch.from_numpy((labels > 0).mean(axis=0)).float()
    counts = known.sum(axis=0)
    if not counts.all():
        index = int(np.flatnonzero(counts == 0)[0])
        name = repr(attributes[index]) if attributes is not None else f"number {index}"
        raise ValueError(
            f"attribute {name} has no known label in the training split (all -1): "
            "annotate some training images or leave the attribute out of the manifest"
        )
    return torch.from_numpy((labels > 0).sum(axis=0) / counts).float()


def attribute_weights(targets: Tensor, ratio: Tensor) -> Tensor:
    """``exp(y * (1 - ratio) + (1 - y) * ratio)``: rare positives and rare negatives weigh more."""
    ratio = ratio.to(targets)
    return torch.exp(targets * (1 - ratio) + (1 - targets) * ratio)


def bce(logits: Tensor, targets: Tensor, ratio: Tensor | None = None) -> Tensor:
    """BCE with logits, summed over attributes and averaged over images (over the images that
    know each attribute when some ``targets`` are -1, see the module doc).

    With ``ratio`` (M positive rates) each term is weighted by :func:`attribute_weights`.
    """
    targets = targets.to(torch.float32)
    known = targets >= 0
    every_label_known = bool(known.all())
    if not every_label_known:
        targets = targets.clamp(min=0)
    losses = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
    if ratio is not None:
        losses = losses * attribute_weights(targets, ratio)
    if every_label_known:
        return losses.sum(dim=1).mean()
    per_attribute = (losses * known).sum(dim=0) / known.sum(dim=0).clamp(min=1)
    return per_attribute.sum()


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
