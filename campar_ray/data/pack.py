"""Packed manifests: the encoded image bytes stored in the manifest itself.

A cluster reading 100,000 small files from an object store spends its time on requests;
reading a few large Parquet shards does not. Packing copies each image's encoded bytes (no
re-encoding, so pixels are unchanged) into a ``binary`` column next to ``image``, which keeps
naming the row.

``decode=(H, W)`` (``campar pack --decode``) stores each image decoded and resized instead:
raw RGB bytes, 147 KB an image at 256x192, written once, so training copies pixels instead of
running a codec and a resize on every image of every epoch. That is what a GPU that waits
for the decoder needs; it costs disk (PETA's files average a few KB) and fixes the training
size (``data.image_size`` must be that size).

Rows are streamed one row group (``PACKED_ROW_GROUP_SIZE`` images, read by a thread pool) at a
time into :class:`ManifestWriter` shards, so memory holds one row group whatever the corpus
size. Rows are grouped by split (train, val, test; manifest order within each): no row group
mixes splits, so a reader of one split never fetches another's bytes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from campar_ray import storage
from campar_ray.data.images import (
    MAX_IMAGE_PIXELS,
    STRICT,
    ImageDecodeError,
    ImageLimits,
    decode_image,
    load_image_bytes,
)
from campar_ray.data.manifest import (
    BINARY_COLUMN,
    PACKED_ROW_GROUP_SIZE,
    SPLITS,
    ManifestError,
    ManifestInfo,
    ManifestWriter,
    check_images,
    output_root,
    read_manifest,
)
from campar_ray.data.transforms import BILINEAR

SHARD_MB = 256.0
"""Default shard size: large enough that a cluster makes few requests, small enough that
many decode tasks can read different shards at once."""


@dataclass(frozen=True)
class PackReport:
    """What ``pack_rows`` wrote, and the rows it left out."""

    path: str
    rows: int
    shards: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """``(image, error)`` for each file that does not decode as an image (not stored)."""
    decoded: tuple[int, int] | None = None
    """``(H, W)`` of the stored pixels when packed with ``decode``."""

    def summary(self) -> str:
        what = "images" if self.decoded is None else "images decoded at {}x{}".format(*self.decoded)
        lines = [f"wrote {self.path}: {self.rows} {what} packed into {len(self.shards)} shard(s)"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} that do not decode as images:")
            lines += [f"  {image}: {error}" for image, error in self.skipped]
        return "\n".join(lines)


def pack_rows(
    table: pa.Table,
    info: ManifestInfo,
    root: str,
    out: str,
    *,
    shard_mb: float = SHARD_MB,
    threads: int = 16,
    max_pixels: int = MAX_IMAGE_PIXELS,
    decode: tuple[int, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    interpolation: str = BILINEAR,
) -> PackReport:
    """Write ``table`` with each row's image bytes (decoded pixels at ``decode`` = ``(H, W)``
    when given) as a packed manifest at ``out``.

    ``root`` is the folder relative image paths resolve against (the caller has checked that
    they stay in it); ``out`` is a ``.parquet`` file or a folder of shards of about
    ``shard_mb`` MB. Only bytes that decode as an image of at most ``max_pixels`` are stored:
    any other file's row is left out and reported, so a manifest naming a secret cannot copy
    it into the packed shards. A missing image raises ``FileNotFoundError`` naming it (and
    leaves no partial manifest). ``progress(done, total)`` follows the rows read.
    """
    load = functools.partial(
        _image_bytes, root=root, max_pixels=max_pixels, decode=decode, interpolation=interpolation
    )
    stored = dataclasses.replace(info, pixels=tuple(decode) if decode else None)
    done, written = 0, 0
    skipped: list[tuple[str, str]] = []
    with (
        ThreadPoolExecutor(max_workers=max(1, threads)) as pool,
        ManifestWriter(out, stored, shard_mb=shard_mb) as writer,
    ):
        for chunk in _split_chunks(table):
            images = chunk.column("image").to_pylist()
            loaded = list(pool.map(load, images))
            good = [data is not None for data, _ in loaded]
            skipped += [
                (image, error) for image, (_, error) in zip(images, loaded, strict=True) if error
            ]
            if any(good):
                data = pa.array([data for data, _ in loaded if data is not None], pa.large_binary())
                writer.write(chunk.filter(pa.array(good)).append_column(BINARY_COLUMN, data))
            done, written = done + chunk.num_rows, written + sum(good)
            if progress is not None:
                progress(done, table.num_rows)
    return PackReport(out, written, writer.files, skipped, stored.pixels)


def pack_manifest(
    manifest: str,
    out: str,
    *,
    shard_mb: float = SHARD_MB,
    threads: int = 16,
    limits: ImageLimits = STRICT,
    decode: tuple[int, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    interpolation: str = BILINEAR,
) -> PackReport:
    """``campar pack``: re-write the path manifest ``manifest`` as packed shards at ``out``
    (of decoded ``(H, W)`` pixels with ``decode``, resized with ``interpolation``).

    ``out`` is checked to be writable (bucket, credentials) first, then every image
    reference to stay in the manifest's folder (unless ``limits`` allow otherwise), all
    before any image is read or any row written.
    """
    storage.check_writable(output_root(out))
    table, info = read_manifest(manifest)
    if BINARY_COLUMN in table.column_names:
        raise ManifestError(f"manifest {manifest} is already packed")
    images = table.column("image").to_pylist()
    check_images(images, info.root, allow_outside_root=limits.allow_outside_root)
    return pack_rows(
        table,
        info,
        info.root,
        out,
        shard_mb=shard_mb,
        threads=threads,
        max_pixels=limits.max_pixels,
        decode=decode,
        progress=progress,
        interpolation=interpolation,
    )


def _image_bytes(
    image: str, *, root: str, max_pixels: int, decode: tuple[int, int] | None, interpolation: str
) -> tuple[bytes | None, str | None]:
    """``(bytes to store, None)`` for an image (its encoded file, or its pixels decoded at
    ``decode``), ``(None, why)`` for a file that is none."""
    data = load_image_bytes(image, root)
    try:
        pixels = decode_image(data, max_pixels=max_pixels, size=decode, interpolation=interpolation)
    except ImageDecodeError as error:
        return None, str(error)
    return (data if decode is None else pixels.tobytes()), None


def _split_chunks(table: pa.Table) -> Iterator[pa.Table]:
    """Row groups of at most ``PACKED_ROW_GROUP_SIZE`` rows, one split each, train first."""
    for split in SPLITS:
        rows = table.filter(pc.equal(table.column("split"), split))
        for start in range(0, rows.num_rows, PACKED_ROW_GROUP_SIZE):
            yield rows.slice(start, PACKED_ROW_GROUP_SIZE)
