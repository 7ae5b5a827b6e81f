"""Angle between each positive attribute's feature vector and its classifier weight (Fig. 7).

With ``p_t = 0.5`` the prediction depends on ``theta`` between the feature vector and ``w_j``
(eq. 1-4): a robust model keeps ``theta`` small for present attributes. The baseline scores
every attribute from one shared vector ``GAP(f)``; CAM-PAR gives attribute ``j`` its own
vector ``GAP(CAM_j * f)`` (eq. 11-12).

Two angles, because the thesis's one cannot tell the heads apart fairly:

- ``weight``: between ``v`` and ``w_j`` as in eq. 1-4. With the thesis's CAM (``relu-max``)
  ``w_j . GAP(CAM_j * f) = mean(ReLU(A_j)^2) / max >= 0``, so CAM-PAR's angle can never
  exceed 90 degrees, whatever the network learnt; the baseline's can.
- ``decision``: between ``[v, 1]`` and ``[w_j, b_j]``, the classifier with its bias (and any
  BatchNorm folded in). Their dot product is the logit itself, so the angle is below 90
  degrees exactly when the attribute is predicted present at ``p_t = 0.5``, for either head.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from campar_ray.model.campar import CamParHead, ParModel

ANGLE_KINDS = ("weight", "decision")


@torch.no_grad()
def feature_weight_angles(
    model: ParModel, x: Tensor, labels: Tensor, kind: str = "weight"
) -> np.ndarray:
    """Angles in degrees over all (image, positive attribute) pairs of the batch ``x``.

    Runs in eval mode (restoring the previous mode) so BatchNorm statistics are not touched.
    An all-zero CAM gives a zero vector: 90 degrees for ``weight`` (no alignment).
    """
    if kind not in ANGLE_KINDS:
        raise ValueError(f"unknown angle kind {kind!r}; valid: {', '.join(ANGLE_KINDS)}")
    was_training = model.training
    model.eval()
    try:
        f = model.features(x).float()
        weight, bias = model.head.effective_classifier()
    finally:
        model.train(was_training)
    if isinstance(model.head, CamParHead):
        cams = model.head.cams(model.head.activations(f))
        # GAP(CAM_j * f) for every j without the B x M x C x H x W tensor.
        vectors = torch.einsum("bmhw,bchw->bmc", cams, f) / (f.shape[2] * f.shape[3])
    else:
        vectors = f.mean((2, 3)).unsqueeze(1).expand(-1, weight.shape[0], -1)  # B x M x C
    if kind == "decision":
        vectors = torch.cat([vectors, torch.ones_like(vectors[..., :1])], dim=-1)
        weight = torch.cat([weight, bias[:, None]], dim=-1)
    cosine = F.cosine_similarity(vectors, weight.unsqueeze(0), dim=-1, eps=1e-12)
    angles = torch.rad2deg(torch.arccos(cosine.clamp(-1.0, 1.0)))
    return angles[torch.as_tensor(labels).to(angles.device) > 0].cpu().numpy()
