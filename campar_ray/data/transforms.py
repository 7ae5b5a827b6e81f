"""Image transforms of the reference recipe, as pure NumPy/torch functions on batches.

The pipeline splits them in two on purpose:

- deterministic and done once per image where decoding happens (:func:`resize`), so the
  same image always yields the same pixels before any randomness;
- random and vectorised over an ``N x H x W x 3`` uint8 batch (:func:`pad_random_crop`,
  :func:`random_hflip`, bundled as :func:`augment`), still uint8 so batches stay four times
  smaller than float while they travel through Ray's object store;
- :func:`normalize` last, in torch on the training device: uint8 NHWC in, float NCHW out.

Train and evaluation share decode + resize + normalise; only training augments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize one ``H x W x 3`` uint8 image to ``size = (H, W)`` (bilinear, antialiased).

    PIL's bilinear filter is what torchvision's ``Resize`` applies to PIL images, so the
    pixels match the reference recipe's input.
    """
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def pad_random_crop(images: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """Zero-pad every side by ``pad`` and crop each image back to its size at a random offset.

    The reference's ``Pad(10)`` + ``RandomCrop``; one independent offset per image, done with
    one gather instead of a Python loop.
    """
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if pad == 0:
        return images
    count, height, width, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = rng.integers(0, 2 * pad + 1, count)[:, None] + np.arange(height)
    cols = rng.integers(0, 2 * pad + 1, count)[:, None] + np.arange(width)
    return padded[np.arange(count)[:, None, None], rows[:, :, None], cols[:, None, :]]


def random_hflip(images: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Mirror each image left-right with probability ``p`` (independently per image)."""
    flip = rng.random(len(images)) < p
    out = images.copy()
    out[flip] = images[flip][:, :, ::-1]
    return out


def augment(images: np.ndarray, *, pad: int, rng: np.random.Generator) -> np.ndarray:
    """The reference training augmentation on a resized uint8 batch: pad + crop, then flip."""
    return random_hflip(pad_random_crop(images, pad, rng), rng)


def normalize(images: torch.Tensor, *, channels_last: bool = False) -> torch.Tensor:
    """uint8 ``N x H x W x 3`` -> float32 ``N x 3 x H x W`` scaled by the ImageNet mean/std.

    Runs wherever ``images`` lives (the GPU when batches are moved there first). Permuting
    an NHWC tensor already yields the channels-last layout, so that layout is kept when
    asked for instead of being copied twice.
    """
    import torch  # here, not at the top: decode tasks need only NumPy + PIL (torch costs seconds)

    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    x = images.permute(0, 3, 1, 2).float().div_(255).sub_(mean).div_(std)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=memory_format)
