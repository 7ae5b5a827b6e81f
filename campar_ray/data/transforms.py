"""Image transforms of the reference recipe, as pure NumPy/torch functions on batches.

Where each one runs is a matter of speed:

- in the decode task, per image, while the image is in cache: :func:`resize_image`
  (deterministic: the same image always yields the same pixels before any randomness), then
  for training a random :class:`Shift` (mirrored while decoding, shifted as it is written
  into the block by :func:`shift_into`), still uint8 so blocks stay four times smaller than
  float while they travel through Ray's object store;
- :func:`normalize` last, in torch on the training device: uint8 NHWC in, float NCHW out.

Train and evaluation share decode + resize + normalise; only training augments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize a Pillow image to ``size = (H, W)`` (bilinear, antialiased).

    PIL's bilinear filter is what torchvision's ``Resize`` applies to PIL images, so the
    pixels match the reference recipe's input.
    """
    height, width = size
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.BILINEAR)


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """:func:`resize_image` for an ``H x W x 3`` uint8 array already decoded."""
    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(resize_image(Image.fromarray(image), size))


@dataclass(frozen=True)
class Shift:
    """One draw of the reference augmentation for one image: ``Pad(pad)`` + ``RandomCrop``
    is a shift by ``(dy, dx)`` in ``[-pad, pad]`` with zero fill, then a left-right ``flip``.

    Applied as: mirror while decoding (``decode_image(mirror=True)``, on the small source
    image, before resizing; PIL's filter is symmetric, so the pixels are those of mirroring
    after), then :func:`shift_into` by ``(dy, -dx)`` (mirroring after a crop at ``dx`` is
    cropping the mirrored image at ``-dx``). :meth:`offset` gives the shift to apply.
    """

    dy: int
    dx: int
    flip: bool

    @classmethod
    def draw(cls, count: int, pad: int, rng: np.random.Generator) -> list[Shift]:
        """``count`` independent draws (one call to ``rng`` for all: per-image calls cost as
        much as the shift itself)."""
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        offsets = rng.integers(-pad, pad + 1, (count, 2)).tolist()
        flips = (rng.random(count) < 0.5).tolist()
        return [cls(dy, dx, flip) for (dy, dx), flip in zip(offsets, flips, strict=True)]

    def offset(self) -> tuple[int, int]:
        """The ``(dy, dx)`` for :func:`shift_into` once the image is mirrored (if ``flip``)."""
        return self.dy, -self.dx if self.flip else self.dx


def shift_into(out: np.ndarray, image: np.ndarray, dy: int, dx: int) -> None:
    """Write ``image`` shifted by ``(dy, dx)`` into ``out`` (same shape):
    ``out[y, x] = image[y + dy, x + dx]``, zero outside.

    The same pixels as zero-padding and cropping, with one copy of the overlap instead of a
    padded batch and a gather (a tenth of the time on a 256 x 192 block).
    """
    height, width = image.shape[:2]
    rows = slice(max(0, -dy), min(height, height - dy))
    cols = slice(max(0, -dx), min(width, width - dx))
    out[rows, cols] = image[rows.start + dy : rows.stop + dy, cols.start + dx : cols.stop + dx]
    out[: rows.start] = 0  # only the uncovered borders: zeroing all of out first
    out[rows.stop :] = 0  # costs as much again as the copy
    out[:, : cols.start] = 0
    out[:, cols.stop :] = 0


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
    import torch  # here, not at the top: decode tasks need only NumPy + PIL (torch costs seconds)

    shift = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    scale = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    x = images.permute(0, 3, 1, 2).float().div_(255).sub_(shift).div_(scale)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=memory_format)
