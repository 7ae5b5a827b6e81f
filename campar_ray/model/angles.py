"""Angle between each positive attribute's feature vector and its classifier weight (Fig. 7).

With ``p_t = 0.5`` the prediction depends on ``theta`` between the feature vector and ``w_j``
(eq. 1-4): a robust model keeps ``theta`` small for present attributes. The baseline scores
every attribute from one shared vector ``GAP(f)``; CAM-PAR gives attribute ``j`` its own
vector ``GAP(CAM_j * f)`` (eq. 11-12).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from campar_ray.model.campar import CamParHead, ParModel, class_activation_maps


@torch.no_grad()
def feature_weight_angles(model: ParModel, x: Tensor, labels: Tensor) -> np.ndarray:
    """Angles in degrees over all (image, positive attribute) pairs of the batch ``x``.

    Runs in eval mode (restoring the previous mode) so BatchNorm statistics are not touched.
    An all-zero CAM gives a zero vector, reported as 90 degrees (no alignment).
    """
    was_training = model.training
    model.eval()
    try:
        f = model.features(x).float()
    finally:
        model.train(was_training)
    weight = model.head.classifier.weight.float().flatten(1)  # M x C
    if isinstance(model.head, CamParHead):
        cams = class_activation_maps(model.head.activations(f))
        # GAP(CAM_j * f) for every j without the B x M x C x H x W tensor.
        vectors = torch.einsum("bmhw,bchw->bmc", cams, f) / (f.shape[2] * f.shape[3])
    else:
        vectors = f.mean((2, 3)).unsqueeze(1).expand(-1, weight.shape[0], -1)  # B x M x C
    cosine = F.cosine_similarity(vectors, weight.unsqueeze(0), dim=-1, eps=1e-12)
    angles = torch.rad2deg(torch.arccos(cosine.clamp(-1.0, 1.0)))
    return angles[torch.as_tensor(labels).to(angles.device) > 0].cpu().numpy()
