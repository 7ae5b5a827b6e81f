"""The stage-1 logits files: the hand-off from stage 1 to stage 2 (and to evaluation).

One Parquet file per split (:meth:`.layout.RunDir.logits`), one row per image:
``image`` (the manifest's image reference), ``labels`` (M x int8), ``l_shared`` (M x float32)
and, for the CAM-PAR head, ``l_specific`` (M x float32). The schema metadata key ``campar``
holds the attribute names. Rows are written in row groups so that a reader (an ALS actor)
can load only its own shard of rows.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from campar_ray import storage
from campar_ray.run.layout import RunDir

ROW_GROUP_SIZE = 8192


@dataclass(frozen=True)
class SplitLogits:
    """Stage-1 outputs for the images of one split (or one shard of it)."""

    images: list[str]
    labels: np.ndarray
    shared: np.ndarray
    specific: np.ndarray | None
    attributes: tuple[str, ...]
    eval_attributes: tuple[str, ...]


def write_split_logits(path: str, logits: SplitLogits) -> None:
    """Write one split's logits (atomically on local disks)."""
    m = len(logits.attributes)
    columns = {
        "image": pa.array(logits.images, pa.string()),
        "labels": _matrix(logits.labels, pa.int8(), m),
        "l_shared": _matrix(logits.shared, pa.float32(), m),
    }
    if logits.specific is not None:
        columns["l_specific"] = _matrix(logits.specific, pa.float32(), m)
    meta = {"attributes": list(logits.attributes), "eval_attributes": list(logits.eval_attributes)}
    table = pa.table(columns).replace_schema_metadata({"campar": json.dumps(meta)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=ROW_GROUP_SIZE)
    storage.write_bytes(path, buffer.getvalue())


def read_split_logits(path: str, start: int = 0, stop: int | None = None) -> SplitLogits:
    """Read rows ``[start, stop)``, touching only the row groups that hold them."""
    with _open(path) as handle:
        parquet = pq.ParquetFile(handle)
        stop = parquet.metadata.num_rows if stop is None else stop
        groups, first_row, offset = [], None, 0
        for index in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(index).num_rows
            if offset < stop and offset + rows > start:
                groups.append(index)
                first_row = offset if first_row is None else first_row
            offset += rows
        table = parquet.read_row_groups(groups) if groups else parquet.schema_arrow.empty_table()
        meta = json.loads(parquet.schema_arrow.metadata[b"campar"])
    table = table.slice(start - (first_row or 0), stop - start)
    m = len(meta["attributes"])
    return SplitLogits(
        images=table.column("image").to_pylist(),
        labels=_numpy(table, "labels", m, np.int8),
        shared=_numpy(table, "l_shared", m, np.float32),
        specific=_numpy(table, "l_specific", m, np.float32)
        if "l_specific" in table.column_names
        else None,
        attributes=tuple(meta["attributes"]),
        eval_attributes=tuple(meta["eval_attributes"]),
    )


def count_rows(path: str) -> int:
    with _open(path) as handle:
        return pq.ParquetFile(handle).metadata.num_rows


def require_logits(run_dir: str, splits: tuple[str, ...]) -> None:
    """Raise :func:`read_split_logits`'s error for the first split without logits, so a
    command that needs them can stop before it starts anything."""
    for split in splits:
        path = RunDir(run_dir).logits(split)
        if not storage.exists(path):
            raise _missing(path)


def _open(path: str) -> pa.NativeFile:
    filesystem, inner = storage.resolve(path)
    try:
        return filesystem.open_input_file(inner)
    except FileNotFoundError:
        raise _missing(path) from None


def _missing(path: str) -> FileNotFoundError:
    """Which command writes a logits file, instead of pyarrow's "Failed to open"."""
    return FileNotFoundError(
        f"{path} not found: stage 1 writes it when `campar train` finishes (re-run `campar "
        "train` with the same --run-dir to finish or resume it)"
    )


def _matrix(values: np.ndarray, kind: pa.DataType, width: int) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), kind)
    return pa.FixedSizeListArray.from_arrays(flat, width)


def _numpy(table: pa.Table, name: str, width: int, dtype: type) -> np.ndarray:
    column = table.column(name).combine_chunks()
    return column.values.to_numpy(zero_copy_only=False).astype(dtype).reshape(-1, width)
