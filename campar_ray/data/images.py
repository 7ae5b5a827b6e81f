"""Image bytes in, RGB arrays out: the only place that touches image files and codecs.

The Ray Data pipeline, verification and prediction all decode through :func:`decode_image`,
so every consumer sees the same pixels (grey, palette and RGBA images become RGB) and the
same error for a corrupt or truncated file.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from campar_ray import storage
from campar_ray.data.manifest import resolve_image


class ImageDecodeError(ValueError):
    """Bytes that are not a complete image in a format Pillow reads."""


def load_image_bytes(image: str | bytes, root: str) -> bytes:
    """Encoded bytes of a manifest image: bytes (a packed row) pass through, references are read.

    ``image`` is resolved against ``root`` (the manifest's folder) when relative; local paths
    and ``s3://``/``gs://`` URIs go through :mod:`campar_ray.storage`. A missing file raises
    ``FileNotFoundError`` naming the resolved path.
    """
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    path = resolve_image(image, root)
    try:
        return storage.read_bytes(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None


def decode_image(data: bytes) -> np.ndarray:
    """Decode PNG/JPEG/BMP/... bytes to an H x W x 3 uint8 RGB array.

    The whole image is decoded here (``Image.load``), so a truncated file fails now with
    :class:`ImageDecodeError` instead of yielding a half-grey image later.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageDecodeError(f"cannot decode image ({len(data)} bytes): {error}") from None
    array = np.array(rgb, dtype=np.uint8)  # a writable copy: torch.from_numpy needs one
    if array.size == 0:
        raise ImageDecodeError("image has no pixels")
    return array
