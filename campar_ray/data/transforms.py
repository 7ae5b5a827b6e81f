"""Image transforms of the reference recipe, as pure NumPy functions on images and batches.

Where each one runs is a matter of speed:

- in the decode task, per image, while the image is in cache: :func:`resize_image`
  (deterministic: the same image always yields the same pixels before any randomness), then
  for training a random :class:`Shift` (mirrored while decoding, shifted as it is written
  into the block by :func:`shift_into`), still uint8 so blocks stay four times smaller than
  float while they travel through Ray's object store;
- :func:`campar_ray.model.inputs.normalize` last, in torch on the training device: uint8 NHWC
  in, float NCHW out (the network's input convention, so the model owns it).

Train and evaluation share decode + resize + normalise; only training augments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from campar_ray.config import CHOICES

BILINEAR = "bilinear"
"""The default filter: what torchvision's ``Resize`` applies to PIL images, so the pixels match
the reference recipe's input."""
ENCODER = "encoder"
"""``data.interpolation``'s default: the encoder's own filter. Wherever an encoder is known
(training, a run's predictor, ``pack --decode``) :func:`campar_ray.model.resolve_inputs`
replaces it by the encoder's filter first; image code without an encoder (benchmarks of the
input pipeline) reads it as :data:`BILINEAR`, every torchvision encoder's filter."""
FILTERS = {name: Image.Resampling[name.upper()] for name in CHOICES["data.interpolation"][1:]}
"""Pillow's filter for each named interpolation (``data.interpolation`` once resolved)."""


def resample(interpolation: str) -> Image.Resampling:
    """Pillow's filter called ``interpolation`` (:data:`ENCODER`: bilinear)."""
    try:
        return FILTERS[BILINEAR if interpolation == ENCODER else interpolation]
    except KeyError:
        raise ValueError(
            f"data.interpolation {interpolation!r} is not a resize filter; one of: "
            f"{', '.join(CHOICES['data.interpolation'])}"
        ) from None


def resize_image(
    image: Image.Image, size: tuple[int, int], interpolation: str = BILINEAR
) -> Image.Image:
    """Resize a Pillow image to ``size = (H, W)`` with ``interpolation`` (antialiased)."""
    height, width = size
    if image.size == (width, height):
        return image
    return image.resize((width, height), resample(interpolation))


def resize(image: np.ndarray, size: tuple[int, int], interpolation: str = BILINEAR) -> np.ndarray:
    """:func:`resize_image` for an ``H x W x 3`` uint8 array already decoded."""
    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(resize_image(Image.fromarray(image), size, interpolation))


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
