"""Ray Data input pipeline: manifest rows -> decoded, resized (augmented) uint8 batches.

``read -> decode + resize (deterministic) -> augment (train only, random)`` streams block by
block: images are decoded by ``data.decode_concurrency`` parallel tasks while training
consumes earlier blocks, and nothing decoded is ever materialised, so memory stays bounded
by a few blocks whatever the dataset size.

A row whose image is missing or corrupt is not dropped here but kept with ``valid = False``
and a black image: the consumer drops it and counts it, which puts the skipped-image count
into the epoch metrics without a side channel (a count carried by the dropped rows
themselves would vanish with them).
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import ExecutionOptions, ExecutionResources, TaskPoolStrategy

from campar_ray.config import DataConfig
from campar_ray.data.images import ImageDecodeError, decode_image, load_image_bytes
from campar_ray.data.manifest import BINARY_COLUMN, SPLITS, ManifestInfo
from campar_ray.data.transforms import augment, resize

logger = logging.getLogger(__name__)

BLOCK_ROWS = 256
"""Manifest rows per source block: one decode task's unit of work (fewer for small splits).

Large on purpose: Ray Data's executor notices finished tasks on a 0.1 s polling cycle, so a
task must carry well over 0.1 s of decoding for its CPU not to sit idle between tasks
(on PETA, 64-row blocks ran at ~0.6x a DataLoader's throughput, 256-row blocks at parity;
see ``bench/results/data_throughput.md``).
"""


def split_rows(table: pa.Table, split: str | None) -> pa.Table:
    """The rows of one split (all rows for ``None``) with their manifest row index ``row``."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    indexed = table.append_column("row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    if split is not None:
        indexed = indexed.filter(pc.equal(indexed.column("split"), split))
    packed = BINARY_COLUMN in table.column_names
    return indexed.select(["row", "image", "labels", *([BINARY_COLUMN] if packed else [])])


def decode_batch(
    batch: dict[str, np.ndarray], *, root: str, size: tuple[int, int]
) -> dict[str, np.ndarray]:
    """Load, decode and resize every image of a batch; flag the ones that fail.

    Output columns: ``row``, ``image`` (uint8 ``N x H x W x 3``), ``labels`` (int8
    ``N x M``), ``valid`` (bool). Encoded bytes and paths are not passed on: downstream
    needs pixels, and ``row`` leads back to the manifest.
    """
    sources = batch[BINARY_COLUMN] if BINARY_COLUMN in batch else batch["image"]
    count = len(sources)
    images = np.zeros((count, *size, 3), dtype=np.uint8)
    valid = np.zeros(count, dtype=bool)
    for index, source in enumerate(sources):
        try:
            images[index] = resize(decode_image(load_image_bytes(source, root)), size)
            valid[index] = True
        except (ImageDecodeError, OSError) as error:
            logger.warning("skipping image %s: %s", batch["image"][index], error)
    return {
        "row": np.asarray(batch["row"], dtype=np.int64),
        "image": images,
        "labels": np.stack(list(batch["labels"])).astype(np.int8),
        "valid": valid,
    }


def augment_batch(batch: dict[str, np.ndarray], *, pad: int) -> dict[str, np.ndarray]:
    """Random pad + crop and flip of a decoded batch (fresh randomness every epoch)."""
    return {**batch, "image": augment(batch["image"], pad=pad, rng=np.random.default_rng())}


def build_dataset(
    table: pa.Table,
    info: ManifestInfo,
    split: str | None,
    data: DataConfig,
    *,
    train: bool,
    seed: int = 0,
) -> ray.data.Dataset:
    """A streaming dataset of one split (or all rows): decoded, resized, augmented if ``train``.

    The validated manifest table goes into the object store in blocks of ``BLOCK_ROWS``
    rows (paths and labels, or encoded bytes for a packed manifest); decoding happens in
    ``data.decode_concurrency`` tasks of ``data.decode_cpus`` CPUs each. Training rows are
    dealt into blocks in a seeded random order (manifests list a person's images together,
    and a batch of one person teaches little), and the blocks are visited in a new random
    order every epoch.
    """
    rows = split_rows(table, split)
    if rows.num_rows == 0:
        raise ValueError(f"manifest has no {split or 'image'!r} rows to build a dataset from")
    if train:
        rows = rows.take(np.random.default_rng(seed).permutation(rows.num_rows))
    size = min(BLOCK_ROWS, -(-rows.num_rows // data.decode_concurrency))  # keep every task busy
    blocks = [rows.slice(start, size) for start in range(0, rows.num_rows, size)]
    dataset = ray.data.from_arrow(blocks)
    if train:
        dataset = dataset.randomize_block_order()
    dataset = dataset.map_batches(
        decode_batch,
        fn_kwargs={"root": info.root, "size": tuple(data.image_size)},
        batch_format="numpy",
        batch_size=None,
        compute=TaskPoolStrategy(size=data.decode_concurrency),
        num_cpus=data.decode_cpus,
        udf_modifying_row_count=False,
    )
    if train:
        dataset = dataset.map_batches(
            augment_batch,
            fn_kwargs={"pad": data.pad},
            batch_format="numpy",
            batch_size=None,
            compute=TaskPoolStrategy(size=data.decode_concurrency),
            num_cpus=data.decode_cpus,
            udf_modifying_row_count=False,
        )
    return dataset


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
