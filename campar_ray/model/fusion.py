"""Multi-level feature fusion: MCA channel attention, then multiplicative fusion (paper 4.2).

After SPOL's MCA/MFF module [10]: the three levels are pooled, concatenated and squeezed into
one shared latent vector V; V is mapped back to each level's width to give sigmoid channel
weights; the reweighted levels are brought to one spatial size, projected by 1x1 convolutions
to the deepest level's width (not reduced: the paper's change to MFF-Net) and multiplied
element-wise, so a location stays strong only where every level responds.

Normalisation (why training stays stable): each projection is followed by BatchNorm, so every
factor of the product has zero mean and unit variance per channel at initialisation and the
product of the three has unit variance too, whatever the widths or the depth of the backbone.
Without it the product of three raw maps scales with the cube of their magnitudes and
explodes or vanishes. There is no ReLU on the factors: a product of three rectified maps is
zero on about 7/8 of the entries at initialisation and would starve most positions of
gradient; the CAM's own ReLU gives the non-negativity where the method needs it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REDUCTION = 16
"""Squeeze ratio of the shared latent V (as in squeeze-and-excitation)."""


class MultiLevelFusion(nn.Module):
    """Fuse three levels (shallow to deep) into one map with the deepest level's width.

    ``size`` fixes the output's spatial size; ``None`` keeps the deepest level's size.
    """

    def __init__(self, channels: Sequence[int], size: tuple[int, int] | None = None):
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"fusion needs at least two levels, got widths {tuple(channels)}")
        self.out_channels = channels[-1]
        self.size = None if size is None else (int(size[0]), int(size[1]))
        hidden = max(sum(channels) // REDUCTION, 16)
        self.squeeze = nn.Sequential(nn.Linear(sum(channels), hidden), nn.ReLU(inplace=True))
        self.excite = nn.ModuleList(nn.Linear(hidden, width) for width in channels)
        self.project = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(width, self.out_channels, 1, bias=False),
                nn.BatchNorm2d(self.out_channels),
            )
            for width in channels
        )

    def forward(self, levels: Sequence[Tensor]) -> Tensor:
        latent = self.squeeze(torch.cat([level.mean((2, 3)) for level in levels], dim=1))
        size = self.size or tuple(levels[-1].shape[-2:])
        fused = None
        for level, excite, project in zip(levels, self.excite, self.project, strict=True):
            weights = torch.sigmoid(excite(latent))[:, :, None, None]
            factor = project(_resize(level * weights, size))
            fused = factor if fused is None else fused * factor
        return fused


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Area-average when shrinking (every shallow pixel counts), bilinear when enlarging."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
