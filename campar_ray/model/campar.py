"""The stage-1 network: encoder, optional fusion, and the CAM-PAR or baseline head (eq. 9-16).

CAM-PAR adds no parameter to the baseline: the one classifier ``w`` (a 1x1 convolution, M x C
with bias ``b``) both scores the shared feature and builds the class activation maps that
disentangle it. The specific logits use the exact identity
``w_j^T GAP(CAM_j * f) = mean_hw(CAM_j * A_j)`` with ``A = w f``, so they cost one B x M x H x W
map instead of the B x M x C x H x W tensor of eq. 11; ``literal=True`` keeps eq. 11-12 as
written, for tests and the overhead benchmark.

A property worth knowing when training: with the thesis's CAM (eq. 10, ``cam_norm="relu-max"``)
``CAM_j * A_j = ReLU(A_j)^2 / max`` is never negative, so ``l_specific_j >= b_j``: every image
whose map has no positive activation ties at that floor, and its specific loss sends no
gradient to the features. ``cam_norm="min-max"`` keeps the identity and removes the floor;
``logit_norm="batchnorm"`` is the reference classifier of [15] (``Linear + BatchNorm1d``);
``"batchnorm-own"``/``"batchnorm-own-affine"`` centre the specific logits by their own statistics.
Both are documented in ``docs/METHOD.md`` with the equation they depart from.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from campar_ray.config import CHOICES, PREDICT_FROM, ModelConfig
from campar_ray.model.backbone import Backbone, build_backbone
from campar_ray.model.fusion import MultiLevelFusion

CAM_EPS = 1e-6
"""Added to each CAM's denominator: an all-negative (or flat) map gives an all-zero CAM, not NaN."""
CAM_NORMS = CHOICES["model.cam_norm"]
LOGIT_NORMS = CHOICES["model.logit_norm"]


class ParOutput(NamedTuple):
    """Logits of one batch (B x M); ``specific`` is ``None`` for the baseline head."""

    shared: Tensor
    specific: Tensor | None
    cams: Tensor | None
    """B x M x H x W normalised maps, only when asked for (``return_cams=True``)."""


def class_activation_maps(
    activations: Tensor, norm: str = "relu-max", eps: float = CAM_EPS
) -> Tensor:
    """Per image and attribute, a map in [0, 1] that peaks where ``A`` does.

    ``relu-max`` (eq. 10): ``ReLU(A) / (max_hw ReLU(A) + eps)``; zero wherever ``A <= 0``.
    ``min-max``: ``(A - min_hw A) / (max_hw A - min_hw A + eps)``; the weight still rises with
    ``A`` but a negative activation keeps a non-zero weight, so ``CAM * A`` keeps its sign.

    Gradients flow through the normalising extremes (plain autograd, the reference choice),
    which keeps them exact: the CAM does not change when A is scaled by a positive factor, and
    detached extremes would send gradients as if it did.
    """
    if norm == "relu-max":
        positive = F.relu(activations)
        return positive / (positive.amax(dim=(2, 3), keepdim=True) + eps)
    if norm == "min-max":
        low = activations.amin(dim=(2, 3), keepdim=True)
        high = activations.amax(dim=(2, 3), keepdim=True)
        return (activations - low) / (high - low + eps)
    raise ValueError(f"unknown CAM normalisation {norm!r}; valid: {', '.join(CAM_NORMS)}")


class LogitBatchNorm(nn.BatchNorm1d):
    """The reference classifier's ``BatchNorm1d`` over the logits [15], for both logit kinds.

    Statistics come from the shared logits (the plain ``Linear`` output of [15]) and the same
    per-attribute affine map ``scale * l + shift`` is applied to the specific logits. Folded
    into the classifier (``w' = scale * w``, ``b' = scale * b + shift``) that is exactly eq.
    9-12 with one classifier while ``scale > 0``: both CAM normalisations are unchanged by a
    positive rescaling of ``A``. The specific logits are then never centred: their offset from
    the shared ones (about -3 on PETA's negatives) stays in every prediction at 0.5, which
    :class:`OwnLogitBatchNorm` removes. A training batch of one image uses the running
    statistics instead of raising, since the last batch of an epoch may hold one image.
    """

    def forward(
        self, shared: Tensor, specific: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        scale, shift = self.affine_map(shared)
        normalised = specific * scale + shift if specific is not None else None
        return shared * scale + shift, normalised

    def affine_map(
        self,
        logits: Tensor | None = None,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(scale, shift)`` per attribute: from the batch ``logits`` when training (updating
        the running statistics), else the running statistics (also what the folded, exported
        classifier uses). ``weight``/``bias`` replace this module's own affine parameters
        (a module without them borrows them: :class:`OwnLogitBatchNorm`)."""
        if self.training and logits is not None and logits.shape[0] > 1:
            mean, var = logits.mean(0), logits.var(0, unbiased=False)
            with torch.no_grad():
                n = logits.shape[0]
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
                self.num_batches_tracked += 1
        else:
            mean, var = self.running_mean, self.running_var
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is None else bias
        scale = weight / torch.sqrt(var + self.eps)
        return scale, bias - mean * scale

    def folded(self, kind: str) -> tuple[Tensor, Tensor]:
        """``(scale, shift)`` of logit ``kind`` at the running statistics: one map for both."""
        return self.affine_map()

    def shifts(self) -> tuple[Tensor, ...]:
        """The parameters every logit ends with (to start at the prior)."""
        return (self.bias,)


class OwnLogitBatchNorm(nn.Module):
    """Shared logits as in [15]; specific logits standardised by statistics of their own.

    ``own_affine=False`` (``logit_norm="batchnorm-own"``): the specific logits' own running
    mean and variance, then the shared logits' learnt ``weight``/``bias``; no parameter
    beyond the reference's 2 M. ``own_affine=True`` (``"batchnorm-own-affine"``): their own
    ``weight``/``bias`` too (2 M more). Either way each logit kind is centred on its own
    batch, so at 0.5 the specific logits no longer carry their offset from the shared ones.

    Folded, the specific logits are the plain head with a classifier of their own
    (``scale_s * w``, ``scale_s * b + shift_s``), exact while ``scale_s > 0`` as for
    :class:`LogitBatchNorm`: CAM-PAR's "one classifier" then holds up to a per-attribute
    positive rescaling and an offset, which is what is measured against the shared form.
    """

    def __init__(self, num_attributes: int, own_affine: bool):
        super().__init__()
        self.shared = LogitBatchNorm(num_attributes)
        self.specific = LogitBatchNorm(num_attributes, affine=own_affine)

    def forward(
        self, shared: Tensor, specific: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        scale, shift = self.shared.affine_map(shared)
        if specific is None:
            return shared * scale + shift, None
        own_scale, own_shift = self.specific.affine_map(specific, *self._borrowed())
        return shared * scale + shift, specific * own_scale + own_shift

    def folded(self, kind: str) -> tuple[Tensor, Tensor]:
        """``(scale, shift)`` of logit ``kind`` (``shared``/``specific``), running statistics."""
        if kind == "shared":
            return self.shared.affine_map()
        return self.specific.affine_map(None, *self._borrowed())

    def shifts(self) -> tuple[Tensor, ...]:
        own = () if self.specific.bias is None else (self.specific.bias,)
        return (self.shared.bias, *own)

    def _borrowed(self) -> tuple[Tensor | None, Tensor | None]:
        if self.specific.weight is not None:
            return None, None
        return self.shared.weight, self.shared.bias


def logit_norm_module(kind: str, num_attributes: int, specific: bool) -> nn.Module | None:
    """The ``model.logit_norm`` module of a head (``specific``: it has specific logits; a
    baseline head has none, so every BatchNorm form is the reference's for it)."""
    if kind not in LOGIT_NORMS:
        raise ValueError(f"unknown model.logit_norm {kind!r}; valid: {', '.join(LOGIT_NORMS)}")
    if kind == "none":
        return None
    if kind == "batchnorm" or not specific:
        return LogitBatchNorm(num_attributes)
    return OwnLogitBatchNorm(num_attributes, own_affine=kind == "batchnorm-own-affine")


class _Head(nn.Module):
    """One 1x1-convolution classifier over ``f``; the head types differ in what they score.

    ``logit_norm="batchnorm"`` adds the reference ``BatchNorm1d`` over the logits (2 M
    parameters, as in [15]); ``batchnorm-own`` gives CAM-PAR's specific logits running
    statistics of their own (no more parameters), ``batchnorm-own-affine`` an affine map of
    their own too (2 M more); ``cam_norm`` chooses the CAM normalisation (no parameters).
    """

    SPECIFIC: bool
    """Whether the head scores specific logits (its default kind of logit)."""

    def __init__(
        self,
        channels: int,
        num_attributes: int,
        cam_norm: str = "relu-max",
        logit_norm: str = "none",
    ):
        super().__init__()
        if cam_norm not in CAM_NORMS:
            raise ValueError(f"unknown model.cam_norm {cam_norm!r}; valid: {', '.join(CAM_NORMS)}")
        self.classifier = nn.Conv2d(channels, num_attributes, kernel_size=1)
        self.cam_norm = cam_norm
        self.logit_norm = logit_norm_module(logit_norm, num_attributes, self.SPECIFIC)

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

    def cams(self, activations: Tensor) -> Tensor:
        return class_activation_maps(activations, self.cam_norm)

    def normalise(self, shared: Tensor, specific: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The logits after the reference BatchNorm, when the head has one."""
        if self.logit_norm is None:
            return shared, specific
        return self.logit_norm(shared, specific)

    def effective_classifier(self, kind: str | None = None) -> tuple[Tensor, Tensor]:
        """``(w', b')``, M x C and M: the classifier of logit ``kind`` (``shared`` or
        ``specific``; default: the head's own kind, specific for CAM-PAR) with any BatchNorm
        folded in at its running statistics (what the model scores with in eval mode).

        The logit of an attribute-specific feature ``v`` is ``w'_j . v + b'_j``; Fig. 7 and
        the floor diagnostics measure against these. The two kinds differ only when the
        specific logits have statistics of their own (``logit_norm="batchnorm-own*"``).
        """
        kind = kind or ("specific" if self.SPECIFIC else "shared")
        weight, bias = self.classifier.weight.float().flatten(1), self.bias
        if self.logit_norm is None:
            return weight, bias
        scale, shift = self.logit_norm.folded(kind)
        return weight * scale[:, None], bias * scale + shift

    def output_biases(self) -> tuple[Tensor, ...]:
        """The parameters the logits end with: the BatchNorm shifts when the head has them,
        else ``b`` (the ones to start at the prior: ``b`` cancels under batch normalisation)."""
        return (self.classifier.bias,) if self.logit_norm is None else self.logit_norm.shifts()


class CamParHead(_Head):
    """Shared logits ``mean_hw(A) + b`` and CAM-disentangled specific logits."""

    SPECIFIC = True

    def __init__(self, channels: int, num_attributes: int, literal: bool = False, **norms: str):
        super().__init__(channels, num_attributes, **norms)
        self.literal = literal
        """Compute eq. 11-12 as written (B x M x C x H x W); same values, far more memory."""

    def forward(self, f: Tensor, return_cams: bool = False) -> ParOutput:
        activations = self.activations(f)
        cams = self.cams(activations)
        shared = activations.mean((2, 3)) + self.bias
        if self.literal:
            specific = self._literal_specific(f, cams)
        else:
            specific = (cams * activations).mean((2, 3)) + self.bias
        shared, specific = self.normalise(shared, specific)
        return ParOutput(shared, specific, cams if return_cams else None)

    def _literal_specific(self, f: Tensor, cams: Tensor) -> Tensor:
        with torch.autocast(device_type=f.device.type, enabled=False):
            disentangled = cams.unsqueeze(2) * f.float().unsqueeze(1)  # eq. 11: B x M x C x H x W
            pooled = disentangled.mean((3, 4))  # GAP: B x M x C
            weight = self.classifier.weight.float().flatten(1)  # M x C
            return (pooled * weight).sum(-1) + self.bias  # eq. 12


class BaselineHead(_Head):
    """GAP + linear classifier: shared logits only (the OFMA baseline [15])."""

    SPECIFIC = False

    def forward(self, f: Tensor, return_cams: bool = False) -> ParOutput:
        with torch.autocast(device_type=f.device.type, enabled=False):
            weight = self.classifier.weight.float().flatten(1)
            shared = F.linear(f.float().mean((2, 3)), weight, self.bias)
        shared, _ = self.normalise(shared, None)
        cams = self.cams(self.activations(f)) if return_cams else None
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
    return ParModel(backbone, *build_top(cfg, backbone.channels, num_attributes))


def build_top(
    cfg: ModelConfig, channels: tuple[int, ...], num_attributes: int
) -> tuple[_Head, MultiLevelFusion | None]:
    """``(head, fusion)`` of ``cfg`` over encoder levels of widths ``channels``: everything
    above the encoder (a frozen encoder's cached levels feed it directly)."""
    fusion = MultiLevelFusion(channels, cfg.fusion_size) if cfg.fusion else None
    head = HEADS[cfg.head](
        channels[-1], num_attributes, cam_norm=cfg.cam_norm, logit_norm=cfg.logit_norm
    )
    return head, fusion
