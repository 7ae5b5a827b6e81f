"""The stage-1 network: encoder, optional fusion, and the CAM-PAR or baseline head (eq. 9-16).

CAM-PAR adds no parameter to the baseline: the one classifier ``w`` (a 1x1 convolution, M x C
with bias ``b``) both scores the shared feature and builds the class activation maps that
disentangle it. The specific logits use the exact identity
``w_j^T GAP(CAM_j * f) = mean_hw(CAM_j * A_j)`` with ``A = w f``, so they cost one B x M x H x W
map instead of the B x M x C x H x W tensor of eq. 11; ``literal=True`` keeps eq. 11-12 as
written, for tests and the overhead benchmark.

A property worth knowing when training: ``CAM_j * A_j = ReLU(A_j)^2 / max`` is never negative,
so ``l_specific_j >= b_j``. A negative image can push its specific logit no lower than the
bias, and the specific loss of negatives falls only as fast as the optimiser moves ``b``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from campar_ray.config import ModelConfig
from campar_ray.model.backbone import Backbone, build_backbone
from campar_ray.model.fusion import MultiLevelFusion

CAM_EPS = 1e-6
"""Added to each CAM's maximum: an all-negative activation map gives an all-zero CAM, not NaN."""
PREDICT_FROM = ("specific", "shared", "mean")


class ParOutput(NamedTuple):
    """Logits of one batch (B x M); ``specific`` is ``None`` for the baseline head."""

    shared: Tensor
    specific: Tensor | None
    cams: Tensor | None
    """B x M x H x W normalised maps, only when asked for (``return_cams=True``)."""


def class_activation_maps(activations: Tensor, eps: float = CAM_EPS) -> Tensor:
    """``ReLU(A) / (max_hw ReLU(A) + eps)`` per image and attribute (eq. 10).

    Gradients flow through the normalising maximum (plain autograd, the reference choice),
    which keeps them exact: the CAM does not change when A is scaled, and a detached maximum
    would send gradients as if it did.
    """
    positive = F.relu(activations)
    return positive / (positive.amax(dim=(2, 3), keepdim=True) + eps)


class _Head(nn.Module):
    """One 1x1-convolution classifier over ``f``; the head types differ in what they score."""

    def __init__(self, channels: int, num_attributes: int):
        super().__init__()
        self.classifier = nn.Conv2d(channels, num_attributes, kernel_size=1)

    def activations(self, f: Tensor) -> Tensor:
        """``A = w f`` without bias, B x M x H x W, in float32 even under autocast.

        The max-normalisation and spatial means are precision-sensitive and the head is a
        negligible share of the FLOPs, so it never runs in bf16/fp16.
        """
        with torch.autocast(device_type=f.device.type, enabled=False):
            return F.conv2d(f.float(), self.classifier.weight.float())

    @property
    def bias(self) -> Tensor:
        return self.classifier.bias.float()


class CamParHead(_Head):
    """Shared logits ``mean_hw(A) + b`` and CAM-disentangled specific logits."""

    def __init__(self, channels: int, num_attributes: int, literal: bool = False):
        super().__init__(channels, num_attributes)
        self.literal = literal
        """Compute eq. 11-12 as written (B x M x C x H x W); same values, far more memory."""

    def forward(self, f: Tensor, return_cams: bool = False) -> ParOutput:
        activations = self.activations(f)
        cams = class_activation_maps(activations)
        shared = activations.mean((2, 3)) + self.bias
        if self.literal:
            specific = self._literal_specific(f, cams)
        else:
            specific = (cams * activations).mean((2, 3)) + self.bias
        return ParOutput(shared, specific, cams if return_cams else None)

    def _literal_specific(self, f: Tensor, cams: Tensor) -> Tensor:
        with torch.autocast(device_type=f.device.type, enabled=False):
            disentangled = cams.unsqueeze(2) * f.float().unsqueeze(1)  # eq. 11: B x M x C x H x W
            pooled = disentangled.mean((3, 4))  # GAP: B x M x C
            weight = self.classifier.weight.float().flatten(1)  # M x C
            return (pooled * weight).sum(-1) + self.bias  # eq. 12


class BaselineHead(_Head):
    """GAP + linear classifier: shared logits only (the OFMA baseline [15])."""

    def forward(self, f: Tensor, return_cams: bool = False) -> ParOutput:
        with torch.autocast(device_type=f.device.type, enabled=False):
            weight = self.classifier.weight.float().flatten(1)
            shared = F.linear(f.float().mean((2, 3)), weight, self.bias)
        cams = class_activation_maps(self.activations(f)) if return_cams else None
        return ParOutput(shared, None, cams)


HEADS = {"campar": CamParHead, "baseline": BaselineHead}


class ParModel(nn.Module):
    """Encoder -> (fusion) -> head. ``head.classifier`` is the M x C x 1 x 1 classifier."""

    def __init__(self, backbone: Backbone, head: _Head, fusion: MultiLevelFusion | None = None):
        super().__init__()
        self.backbone = backbone
        self.add_module("fusion", fusion)
        self.head = head

    def features(self, x: Tensor) -> Tensor:
        """``f``: B x C x H x W, the fused map when fusion is on, else the deepest level."""
        levels = self.backbone(x)
        return levels[-1] if self.fusion is None else self.fusion(levels)

    def forward(self, x: Tensor, return_cams: bool = False) -> ParOutput:
        return self.head(self.features(x), return_cams=return_cams)


def build_model(cfg: ModelConfig, num_attributes: int) -> ParModel:
    """The network of one row of the ablation table (head x fusion) for ``num_attributes``."""
    if cfg.head not in HEADS:
        raise ValueError(f"unknown model.head {cfg.head!r}; valid: {', '.join(HEADS)}")
    if cfg.predict_from not in PREDICT_FROM:
        raise ValueError(
            f"unknown model.predict_from {cfg.predict_from!r}; valid: {', '.join(PREDICT_FROM)}"
        )
    if cfg.fusion_size is not None and not cfg.fusion:
        raise ValueError(
            f"model.fusion_size={list(cfg.fusion_size)} needs model.fusion=true "
            "(without fusion the head sees the deepest level at its own size)"
        )
    if num_attributes < 1:
        raise ValueError(f"num_attributes must be at least 1, got {num_attributes}")
    backbone = build_backbone(cfg.backbone, cfg.weights)
    fusion = MultiLevelFusion(backbone.channels, cfg.fusion_size) if cfg.fusion else None
    head = HEADS[cfg.head](backbone.channels[-1], num_attributes)
    return ParModel(backbone, head, fusion)


def prediction_logits(output: ParOutput, predict_from: str) -> Tensor:
    """The logits whose sigmoid is the prediction: ``specific``, ``shared`` or their ``mean``.

    The baseline has only shared logits, which it returns for every choice.
    """
    if predict_from not in PREDICT_FROM:
        raise ValueError(f"unknown predict_from {predict_from!r}; valid: {', '.join(PREDICT_FROM)}")
    if output.specific is None or predict_from == "shared":
        return output.shared
    if predict_from == "specific":
        return output.specific
    return (output.shared + output.specific) / 2
