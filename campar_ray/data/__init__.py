"""The data layer: the manifest format, image decoding, verification and the synthetic set.

Converters from raw dataset layouts live in :mod:`campar_ray.data.converters`.
"""

from campar_ray.data.images import ImageDecodeError, decode_image, load_image_bytes
from campar_ray.data.manifest import (
    ManifestError,
    ManifestInfo,
    labels_matrix,
    manifest_table,
    read_manifest,
    resolve_image,
    write_manifest,
)
from campar_ray.data.synthetic import generate_synthetic
from campar_ray.data.verify import VerifyReport, verify_manifest

__all__ = [
    "ImageDecodeError",
    "ManifestError",
    "ManifestInfo",
    "VerifyReport",
    "decode_image",
    "generate_synthetic",
    "labels_matrix",
    "load_image_bytes",
    "manifest_table",
    "read_manifest",
    "resolve_image",
    "verify_manifest",
    "write_manifest",
]
