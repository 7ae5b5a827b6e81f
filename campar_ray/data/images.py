"""Image bytes in, RGB arrays out: the only place that touches image files and codecs.

The Ray Data pipeline, verification, packing and prediction all decode through
:func:`decode_image`, so every consumer sees the same pixels (grey, palette and RGBA images
become RGB, resized the same way when a size is asked for) and the same error for a corrupt,
truncated or oversized file. Manifests are
untrusted input: :func:`read_image` applies :class:`ImageLimits` (where an image may live,
how many pixels it may claim) before any byte is decoded.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from campar_ray import storage
from campar_ray.config import DataConfig
from campar_ray.data.manifest import OutsideRootError, guard_image, resolve_image
from campar_ray.data.transforms import BILINEAR, resize_image

MAX_IMAGE_PIXELS = DataConfig.max_image_pixels


class ImageDecodeError(ValueError):
    """Bytes that are not a complete image in a format Pillow reads, or one that is too large."""


UNREADABLE = (ImageDecodeError, OutsideRootError, OSError)
"""What one bad manifest image raises: its reader skips and counts it, never stops on it."""


@dataclass(frozen=True)
class ImageLimits:
    """What a manifest may make a reader open and decode (``data.allow_outside_root`` and
    ``data.max_image_pixels``): strict unless the user says otherwise."""

    allow_outside_root: bool = False
    max_pixels: int = MAX_IMAGE_PIXELS

    @classmethod
    def of(cls, data: DataConfig) -> ImageLimits:
        return cls(allow_outside_root=data.allow_outside_root, max_pixels=data.max_image_pixels)


STRICT = ImageLimits()


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


def read_image(
    image: str | bytes,
    root: str,
    limits: ImageLimits = STRICT,
    *,
    size: tuple[int, int] | None = None,
    mirror: bool = False,
    stored: tuple[int, int] | None = None,
    interpolation: str = BILINEAR,
) -> np.ndarray:
    """Load and decode one manifest image within ``limits`` (resized, mirrored: see
    :func:`decode_image`); raises one of :data:`UNREADABLE`.

    A reference goes through :func:`~campar_ray.data.manifest.guard_image` before it is
    read (outside ``root``, through a symlink or not, unless allowed; URI options always);
    bytes of a packed row need no such check. ``stored`` is the ``(H, W)`` of a decoded
    manifest's rows (``ManifestInfo.pixels``): ``image`` then holds raw pixels, see
    :func:`stored_pixels`.
    """
    if stored is not None:
        return stored_pixels(image, stored, size=size, mirror=mirror)
    if isinstance(image, str):
        image, root = guard_image(image, root, allow_outside_root=limits.allow_outside_root), ""
    data = load_image_bytes(image, root)
    return decode_image(
        data, max_pixels=limits.max_pixels, size=size, mirror=mirror, interpolation=interpolation
    )


def stored_pixels(
    data: str | bytes,
    stored: tuple[int, int],
    *,
    size: tuple[int, int] | None = None,
    mirror: bool = False,
) -> np.ndarray:
    """The ``stored`` = ``(H, W)`` RGB image a decoded manifest row holds, mirrored when asked.

    ``campar pack --decode`` stored it already resized, so reading it costs nothing: the
    result is a read-only view of ``data`` (a reader copies it into its batch once), no
    codec, no resize. It is not resized again (a second resize would blur what training sees), so
    ``size`` must be ``stored``. Mirroring after the resize gives the pixels
    :func:`decode_image` gives by mirroring before it (the filter is symmetric).
    """
    height, width = stored
    if size is not None and tuple(size) != (height, width):
        raise ImageDecodeError(
            f"the manifest stores pixels decoded at {height}x{width}, not {size[0]}x{size[1]}"
        )
    if not isinstance(data, bytes) or len(data) != height * width * 3:
        found = f"{len(data)} bytes" if isinstance(data, bytes) else repr(data)
        raise ImageDecodeError(
            f"a decoded row must hold {height}x{width}x3 = {height * width * 3} bytes, "
            f"found {found}"
        )
    pixels = np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
    return pixels[:, ::-1] if mirror else pixels


def image_pixels(
    image: Image.Image,
    *,
    size: tuple[int, int] | None = None,
    mirror: bool = False,
    interpolation: str = BILINEAR,
) -> np.ndarray:
    """A decoded Pillow image as :func:`decode_image` returns it: RGB (grey, palette and RGBA
    converted), mirrored when asked, resized to ``size`` ``(H, W)`` when given, as a writable
    H x W x 3 uint8 array (``torch.from_numpy`` needs one). Also what a caller's own Pillow
    image goes through (``ParPredictor.predict_proba``), so it gets its file's pixels."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    if mirror:
        rgb = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if size is not None:
        rgb = resize_image(rgb, size, interpolation)
    return np.array(rgb, dtype=np.uint8)


def decode_image(
    data: bytes,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    size: tuple[int, int] | None = None,
    mirror: bool = False,
    interpolation: str = BILINEAR,
) -> np.ndarray:
    """Decode PNG/JPEG/BMP/... bytes to an H x W x 3 uint8 RGB array, resized to ``size``
    ``(H, W)`` when given and mirrored left-right when ``mirror``.

    The size in the header is checked against ``max_pixels`` before any pixel is decoded: a
    175 KB PNG can claim 180 megapixels (Pillow's ``DecompressionBombError`` too becomes an
    :class:`ImageDecodeError`). The whole image is then decoded here (``Image.load``), so a
    truncated file fails now instead of yielding a half-grey image later. Resizing happens on
    the decoded Pillow image (:func:`~campar_ray.data.transforms.resize_image`), so the
    pixels cross from Pillow to NumPy once: this function is the decoder's inner loop. Mirroring
    happens before resizing, on the (usually smaller) source image: the same pixels as
    mirroring after, since the filter is symmetric (checked on PETA in the tests).
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image is {width} x {height} pixels, more than data.max_image_pixels "
                    f"({max_pixels})"
                )
            img.load()
            array = image_pixels(img, size=size, mirror=mirror, interpolation=interpolation)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:  # its message names a BytesIO object, nothing useful
        raise ImageDecodeError("cannot decode image: not in any format Pillow reads") from None
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        # Neither the file's size nor its bytes: a refused file may be someone's secret.
        raise ImageDecodeError(f"cannot decode image: {error}") from None
    if array.size == 0:
        raise ImageDecodeError("image has no pixels")
    return array
