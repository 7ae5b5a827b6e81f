"""Packed manifests: the encoded image bytes stored in the manifest itself.

A cluster reading 100,000 small files from an object store spends its time on requests;
reading a few large Parquet shards does not. Packing copies each image's encoded bytes (no
re-encoding, so pixels are unchanged) into a ``binary`` column next to ``image``, which keeps
naming the row.

Rows are streamed one row group (``PACKED_ROW_GROUP_SIZE`` images, read by a thread pool) at a
time into :class:`ManifestWriter` shards, so memory holds one row group whatever the corpus
size. Rows are grouped by split (train, val, test; manifest order within each): no row group
mixes splits, so a reader of one split never fetches another's bytes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from campar_ray import storage
from campar_ray.data.images import load_image_bytes
from campar_ray.data.manifest import (
    BINARY_COLUMN,
    PACKED_ROW_GROUP_SIZE,
    SPLITS,
    ManifestError,
    ManifestInfo,
    ManifestWriter,
    output_root,
    read_manifest,
)

SHARD_MB = 256.0
"""Default shard size: large enough that a cluster makes few requests, small enough that
many decode tasks can read different shards at once."""


@dataclass(frozen=True)
class PackReport:
    """What ``pack_manifest`` wrote."""

    path: str
    rows: int
    shards: list[str]

    def summary(self) -> str:
        return f"wrote {self.path}: {self.rows} images packed into {len(self.shards)} shard(s)"


def pack_rows(
    table: pa.Table,
    info: ManifestInfo,
    root: str,
    out: str,
    *,
    shard_mb: float = SHARD_MB,
    threads: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Write ``table`` with each row's image bytes as a packed manifest at ``out``.

    ``root`` is the folder relative image paths resolve against; ``out`` is a ``.parquet``
    file or a folder of shards of about ``shard_mb`` MB. A missing image raises
    ``FileNotFoundError`` naming it (and leaves no partial manifest). ``progress(done,
    total)`` follows the rows written. Returns the files written.
    """
    load = functools.partial(load_image_bytes, root=root)
    done = 0
    with (
        ThreadPoolExecutor(max_workers=max(1, threads)) as pool,
        ManifestWriter(out, info, shard_mb=shard_mb) as writer,
    ):
        for chunk in _split_chunks(table):
            data = pa.array(pool.map(load, chunk.column("image").to_pylist()), pa.large_binary())
            writer.write(chunk.append_column(BINARY_COLUMN, data))
            done += chunk.num_rows
            if progress is not None:
                progress(done, table.num_rows)
    return writer.files


def pack_manifest(
    manifest: str,
    out: str,
    *,
    shard_mb: float = SHARD_MB,
    threads: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> PackReport:
    """``campar pack``: re-write the path manifest ``manifest`` as packed shards at ``out``.

    ``out`` is checked to be writable (bucket, credentials) before any image is read.
    """
    storage.check_writable(output_root(out))
    table, info = read_manifest(manifest)
    if BINARY_COLUMN in table.column_names:
        raise ManifestError(f"manifest {manifest} is already packed")
    files = pack_rows(
        table, info, info.root, out, shard_mb=shard_mb, threads=threads, progress=progress
    )
    return PackReport(path=out, rows=table.num_rows, shards=files)


def _split_chunks(table: pa.Table) -> Iterator[pa.Table]:
    """Row groups of at most ``PACKED_ROW_GROUP_SIZE`` rows, one split each, train first."""
    for split in SPLITS:
        rows = table.filter(pc.equal(table.column("split"), split))
        for start in range(0, rows.num_rows, PACKED_ROW_GROUP_SIZE):
            yield rows.slice(start, PACKED_ROW_GROUP_SIZE)
