"""What the network takes as input: uint8 pixels normalised by the encoder's mean and std.

The encoders were pretrained on inputs normalised this way, so the convention belongs to the
model: training, scoring, evaluation's probes and the export all normalise here, and the
export writes the same mean and std into its metadata. ImageNet's statistics are the default;
a timm encoder brings its own (:attr:`campar_ray.model.Backbone.mean`). Decoding and resizing
(NumPy + PIL, no torch) stay in :mod:`campar_ray.data.transforms`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(
    images: torch.Tensor,
    *,
    channels_last: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 ``N x H x W x 3`` -> float32 ``N x 3 x H x W``, scaled to [0, 1] then by the
    encoder's ``mean`` and ``std`` (ImageNet's unless the encoder has its own, see
    :attr:`campar_ray.model.Backbone.mean`).

    Runs wherever ``images`` lives (the GPU when batches are moved there first). Permuting
    an NHWC tensor already yields the channels-last layout, so that layout is kept when
    asked for instead of being copied twice.
    """
    shift = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    scale = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    x = images.permute(0, 3, 1, 2).float().div_(255).sub_(shift).div_(scale)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=memory_format)
