"""Ray Data input pipeline: manifest rows -> decoded, resized (augmented) uint8 batches.

``plan -> read + decode + resize (deterministic) + augment (train only, random)`` streams
block by block, each block made by one task. The driver only plans: from the Parquet
metadata and the ``split`` column it lists *pieces* (a row group of one manifest file and
the offsets of up to ``BLOCK_ROWS`` of its rows). Each piece is one read task of a Ray Data
:class:`ManifestPieces` datasource, which reads its rows straight from the manifest (local
or ``s3://``/``gs://``; paths and labels, or the encoded bytes of a packed manifest), then
loads and decodes the images, while training consumes earlier blocks. Neither the driver
nor any task ever holds the manifest's rows or the decoded data set, so memory stays bounded
by a few blocks whatever the corpus size.

A row whose image is missing, corrupt, too large (``data.max_image_pixels``) or outside the
manifest's folder (unless ``data.allow_outside_root``) is not dropped here but kept with
``valid = False`` and a black image: the consumer drops it and counts it, which puts the
skipped-image count into the epoch metrics without a side channel (a count carried by the
dropped rows themselves would vanish with them).
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data import ExecutionOptions, ExecutionResources, TaskPoolStrategy
from ray.data.block import Block, BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from campar_ray import storage
from campar_ray.config import DataConfig
from campar_ray.data.images import STRICT, UNREADABLE, ImageLimits, read_image
from campar_ray.data.manifest import (
    BINARY_COLUMN,
    PACKED_ROW_GROUP_SIZE,
    SPLITS,
    ManifestError,
    ManifestInfo,
    manifest_files,
    subset_rows,
)
from campar_ray.data.transforms import BILINEAR, Shift, shift_into

logger = logging.getLogger(__name__)

BLOCK_ROWS = PACKED_ROW_GROUP_SIZE
"""Manifest rows per source block: one decode task's unit of work (fewer for small splits),
one row group of a packed manifest, so that a task reads exactly one.

Large on purpose: Ray Data's executor notices finished tasks on a 0.1 s polling cycle, so a
task must carry well over 0.1 s of decoding for its CPU not to sit idle between tasks
(on PETA, 64-row blocks ran at ~0.6x a DataLoader's throughput, 256-row blocks at parity;
see the input-pipeline section of ``bench/RESULTS.md``). Packed manifests are written with
row groups of this size, so a piece of a packed manifest is exactly one row group.
"""


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    root: str,
    size: tuple[int, int],
    limits: ImageLimits = STRICT,
    pad: int | None = None,
    stored: tuple[int, int] | None = None,
    reasons: bool = False,
    interpolation: str = BILINEAR,
) -> dict[str, np.ndarray]:
    """Load, decode and resize every image of a batch (and augment it, given ``pad``); flag
    the ones that fail. ``stored``: the manifest holds pixels decoded at that size
    (``ManifestInfo.pixels``), copied instead of decoded.

    The one decode step of training, validation, stage 1's logits and batch prediction.
    Missing, corrupt and oversized images and references outside ``root`` (see
    :class:`ImageLimits`) all fail the same way: flagged and logged, never fatal to the
    batch. With ``pad`` (training), each image gets its own random :class:`Shift` (fresh
    randomness every call, so every epoch) as it is written into the block: augmenting in
    the decode task costs one copy of each image, where a separate stage would move every
    block through the object store twice.

    Output columns: ``row``, ``image`` (uint8 ``N x H x W x 3``), ``labels`` (int8 ``N x M``,
    when the batch has labels), ``valid`` (bool) and, with ``reasons``, ``error``
    (why each image failed, ``""`` for the ones read: prediction writes it out; training
    batches stay all-tensor). Encoded bytes and paths are not passed on: downstream needs
    pixels, and ``row`` leads back to the input.
    """
    sources = batch[BINARY_COLUMN] if BINARY_COLUMN in batch else batch["image"]
    count = len(sources)
    images = np.zeros((count, *size, 3), dtype=np.uint8)
    valid = np.zeros(count, dtype=bool)
    errors = [""] * count
    shifts = [None] * count if pad is None else Shift.draw(count, pad, np.random.default_rng())
    for index, (source, shift) in enumerate(zip(sources, shifts, strict=True)):
        try:
            mirror = bool(shift and shift.flip)
            pixels = read_image(
                source, root, limits, size=size, mirror=mirror, stored=stored,
                interpolation=interpolation,
            )  # fmt: skip
        except UNREADABLE as error:
            logger.warning("skipping image %s: %s", batch["image"][index], error)
            errors[index] = f"{type(error).__name__}: {error}"
            continue
        if shift is None:
            images[index] = pixels
        else:
            shift_into(images[index], pixels, *shift.offset())
        valid[index] = True
    out = {"row": np.asarray(batch["row"], dtype=np.int64), "image": images}
    if "labels" in batch:
        out["labels"] = np.stack(list(batch["labels"])).astype(np.int8)
    out["valid"] = valid
    if reasons:
        out["error"] = np.array(errors, dtype=str)
    return out


def build_dataset(
    info: ManifestInfo,
    split: str | None,
    data: DataConfig,
    *,
    train: bool,
    seed: int = 0,
) -> ray.data.Dataset:
    """A streaming dataset of one split (or all rows): decoded, resized, augmented if ``train``,
    all in one read task per piece.

    ``info`` comes from ``read_manifest``; its ``path`` (a file, shard folder or URI) is read
    by the decode tasks themselves, ``data.decode_concurrency`` tasks of ``data.decode_cpus``
    CPUs each. Training rows are dealt into pieces in a seeded random order within each row
    group (manifests list a person's images together, and a batch of one person teaches
    little), and the pieces are visited in a new random order every epoch.
    """
    if not info.path:
        raise ValueError("build_dataset needs the ManifestInfo of read_manifest (it has no path)")
    if info.pixels is not None and tuple(info.pixels) != tuple(data.image_size):
        height, width = info.pixels
        raise ManifestError(
            f"manifest {info.path} stores images decoded at {height}x{width} (campar pack "
            f"--decode) but data.image_size is {data.image_size[0]}x{data.image_size[1]}: set "
            f"data.image_size=[{height},{width}] or pack again at this size (campar pack "
            f"--decode --set data.image_size=[{data.image_size[0]},{data.image_size[1]}])"
        )
    pieces = plan_pieces(
        info.path, split, data.decode_concurrency, seed if train else None, subset=data.subset
    )
    if pieces.num_rows == 0:
        raise ValueError(f"manifest has no {split or 'image'!r} rows to build a dataset from")
    source = ManifestPieces(
        pieces,
        root=info.root,
        size=tuple(data.image_size),
        pad=data.pad if train else None,
        limits=ImageLimits.of(data),
        stored=info.pixels,
        interpolation=data.interpolation,
    )
    return ray.data.read_datasource(
        source,
        override_num_blocks=pieces.num_rows,
        compute=TaskPoolStrategy(size=data.decode_concurrency),
        num_cpus=data.decode_cpus,
    )


def plan_pieces(
    manifest: str,
    split: str | None,
    concurrency: int,
    seed: int | None = None,
    *,
    subset: int = 0,
) -> pa.Table:
    """The pieces of one split: columns ``file`` (path or URI), ``row_group``, ``first`` (the
    manifest row number of the row group's first row) and ``offsets`` (rows within it).

    Reads only Parquet footers and, for one split or a ``subset`` (``data.subset``), the
    ``split`` column. A piece holds at most ``BLOCK_ROWS`` rows, fewer for small splits so
    that all ``concurrency`` decode tasks get work. With a ``seed``, rows are dealt into
    pieces in a seeded random order.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    filesystem, files = manifest_files(manifest)
    scheme = manifest.split("://", 1)[0] + "://" if storage.is_uri(manifest) else ""
    parquets = [pq.ParquetFile(file, filesystem=filesystem) for file in files]
    wanted = _wanted_rows(parquets, split, subset)
    groups: list[tuple[str, int, int, np.ndarray]] = []
    first = 0
    for file, parquet in zip(files, parquets, strict=True):
        picked = None
        if wanted is not None:
            picked = np.flatnonzero(wanted[first : first + parquet.metadata.num_rows])
        start = 0
        for index in range(parquet.metadata.num_row_groups):
            count = parquet.metadata.row_group(index).num_rows
            if picked is None:
                rows = np.arange(count)
            else:
                lo, hi = np.searchsorted(picked, [start, start + count])
                rows = picked[lo:hi] - start
            if len(rows):
                groups.append((scheme + file, index, first + start, rows.astype(np.int32)))
            start += count
        first += start
    total = sum(len(rows) for *_, rows in groups)
    size = min(BLOCK_ROWS, max(1, -(-total // concurrency)))
    rng = np.random.default_rng(seed) if seed is not None else None
    pieces: dict[str, list] = {"file": [], "row_group": [], "first": [], "offsets": []}
    for file, index, start, rows in groups:
        if rng is not None:
            rows = rng.permutation(rows)
        for chunk in range(0, len(rows), size):
            pieces["file"].append(file)
            pieces["row_group"].append(index)
            pieces["first"].append(start)
            pieces["offsets"].append(rows[chunk : chunk + size])
    return _pieces_table(pieces)


def _wanted_rows(
    parquets: list[pq.ParquetFile], split: str | None, subset: int
) -> np.ndarray | None:
    """The manifest's rows to plan (a mask over all files), or None for every row."""
    if split is None and subset <= 0:
        return None
    splits = [parquet.read(columns=["split"]).column("split") for parquet in parquets]
    values = np.concatenate([column.to_numpy(zero_copy_only=False) for column in splits])
    wanted = subset_rows(values, subset)
    if split is not None:
        wanted &= values == split
    return wanted


def _pieces_table(pieces: dict[str, list]) -> pa.Table:
    return pa.table(
        {
            "file": pa.array(pieces["file"], pa.string()),
            "row_group": pa.array(pieces["row_group"], pa.int32()),
            "first": pa.array(pieces["first"], pa.int64()),
            "offsets": pa.array(pieces["offsets"], pa.list_(pa.int32())),
        }
    )


def read_piece(file: str, row_group: int, first: int, offsets: np.ndarray) -> pa.Table:
    """The rows of one piece: ``row`` (manifest row number), ``image``, ``labels`` and, for a
    packed manifest, ``binary``; only these columns of the one row group are fetched."""
    filesystem, inner = storage.resolve(file)
    parquet = pq.ParquetFile(inner, filesystem=filesystem)
    columns = ["image", "labels"]
    if BINARY_COLUMN in parquet.schema_arrow.names:
        columns.append(BINARY_COLUMN)
    rows = parquet.read_row_group(row_group, columns=columns).take(offsets)
    return rows.add_column(0, "row", pa.array(first + offsets.astype(np.int64)))


def decode_piece(
    file: str,
    row_group: int,
    first: int,
    offsets: np.ndarray,
    *,
    root: str,
    size: tuple[int, int],
    limits: ImageLimits = STRICT,
    pad: int | None = None,
    stored: tuple[int, int] | None = None,
    interpolation: str = BILINEAR,
) -> list[Block]:
    """Read and decode (and augment, given ``pad``) one piece: a read task's output, one block
    of :func:`decode_batch`'s columns."""
    rows = read_piece(file, row_group, first, offsets)
    batch = {name: rows.column(name).to_numpy(zero_copy_only=False) for name in rows.column_names}
    decoded = decode_batch(
        batch, root=root, size=size, limits=limits, pad=pad, stored=stored,
        interpolation=interpolation,
    )  # fmt: skip
    return [BlockAccessor.batch_to_block(decoded)]


class ManifestPieces(Datasource):
    """The pieces of a plan as Ray Data read tasks, each reading and decoding one piece.

    A datasource rather than ``from_arrow(pieces)``: blocks put up front stay referenced,
    with their metadata, by the executor for the whole run (about 50 KB a block, +180 MiB
    of driver memory for a 1M-row manifest), while a read task costs about a quarter of
    that and its decoded block is freed once consumed. Read tasks are made again for every
    epoch; for training (``pad`` given) in a new random order, and augmented.
    """

    def __init__(
        self,
        pieces: pa.Table,
        *,
        root: str,
        size: tuple[int, int],
        pad: int | None,
        limits: ImageLimits = STRICT,
        stored: tuple[int, int] | None = None,
        interpolation: str = BILINEAR,
    ) -> None:
        super().__init__()
        self._interpolation = interpolation
        self._pieces = pieces
        self._root = root
        self._size = size
        self._pad = pad
        self._limits = limits
        self._stored = stored

    def get_name(self) -> str:
        return "ReadDecodeManifest"

    def estimate_inmemory_data_size(self) -> int:
        return self._decoded_bytes(len(self._pieces.column("offsets").combine_chunks().values))

    def _decoded_bytes(self, rows: int) -> int:
        height, width = self._size
        return rows * height * width * 3

    def get_read_tasks(self, parallelism: int, **_: object) -> list[ReadTask]:
        offsets = self._pieces.column("offsets").combine_chunks()
        bounds = offsets.offsets.to_numpy()
        values = offsets.values.to_numpy()
        files = self._pieces.column("file").to_pylist()
        groups = self._pieces.column("row_group").to_pylist()
        firsts = self._pieces.column("first").to_pylist()
        count = len(files)
        training = self._pad is not None
        order = np.random.default_rng().permutation(count) if training else range(count)
        tasks = []
        for index in order:
            rows = values[bounds[index] : bounds[index + 1]].copy()
            read = functools.partial(
                decode_piece,
                files[index],
                groups[index],
                firsts[index],
                rows,
                root=self._root,
                size=self._size,
                limits=self._limits,
                pad=self._pad,
                stored=self._stored,
                interpolation=self._interpolation,
            )
            metadata = BlockMetadata(
                num_rows=len(rows),
                size_bytes=self._decoded_bytes(len(rows)),
                input_files=None,
                exec_stats=None,
            )
            tasks.append(ReadTask(read, metadata))
        return tasks


def data_execution_options(reserved_cpus: float, reserved_gpus: float = 0.0) -> ExecutionOptions:
    """Ray Data limits that leave the training workers' CPUs and GPUs alone.

    Ray Data otherwise plans with the whole cluster, asks for CPUs the training workers
    hold, and on a small machine waits for them forever. Raises ``ValueError`` when the
    workers leave no CPU at all for decoding.
    """
    total = ray.cluster_resources()
    cpus = total.get("CPU", 0.0) - reserved_cpus
    if cpus <= 0:
        raise ValueError(
            f"training workers reserve {reserved_cpus:g} of the cluster's {total.get('CPU', 0):g} "
            "CPUs, leaving none for Ray Data decoding; lower train.num_workers or "
            "train.cpus_per_worker, or start Ray with more CPUs"
        )
    gpus = max(total.get("GPU", 0.0) - reserved_gpus, 0.0)
    return ExecutionOptions(resource_limits=ExecutionResources(cpu=cpus, gpu=gpus))
