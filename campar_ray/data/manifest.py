"""The manifest: the one Parquet format every converter writes and everything downstream reads.

One row per image: ``image`` (a path relative to the manifest's folder, an absolute path or an
``s3://``/``gs://`` URI), ``labels`` (list<int8>, one 0/1 value per attribute), ``split``
(``train``/``val``/``test``), ``identity`` (person id) and ``source`` (subset or origin). A
*packed* manifest also has a ``binary`` column with the encoded image bytes, so a cluster
reads a few large files instead of many small ones; ``image`` still names each row.
The schema metadata key ``campar`` holds JSON with the dataset name, the ordered attribute
names and the attributes the dataset's protocol evaluates.

Validation is vectorised (``pyarrow.compute``), so a million-row manifest checks in well under a
second, and every error names the row (index and image), the column and the bad value.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from campar_ray import storage

SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = ("image", "labels", "split", "identity", "source")
BINARY_COLUMN = "binary"
METADATA_KEY = b"campar"
ROW_GROUP_SIZE = 16384
PACKED_ROW_GROUP_SIZE = 1024  # rows of encoded images: keeps one row group to tens of MB


class ManifestError(ValueError):
    """A manifest that breaks the format; the message names the row, column or key at fault."""


@dataclass(frozen=True)
class ManifestInfo:
    """What the schema metadata says about a manifest, plus where its relative paths point."""

    dataset: str
    attributes: tuple[str, ...]
    eval_attributes: tuple[str, ...]
    root: str = ""
    """Folder or URI that relative image paths resolve against (set by ``read_manifest``)."""

    def eval_indices(self) -> np.ndarray:
        """Positions of ``eval_attributes`` in ``attributes``, in evaluation order."""
        position = {name: index for index, name in enumerate(self.attributes)}
        return np.array([position[name] for name in self.eval_attributes], dtype=np.int64)

    def to_metadata(self) -> bytes:
        """The ``campar`` schema metadata value (``root`` is where the file is, not stored)."""
        meta = {
            "dataset": self.dataset,
            "attributes": list(self.attributes),
            "eval_attributes": list(self.eval_attributes),
        }
        return json.dumps(meta).encode()

    @staticmethod
    def from_metadata(metadata: dict[bytes, bytes] | None, root: str = "") -> ManifestInfo:
        """Parse and check the ``campar`` metadata of a schema."""
        if not metadata or METADATA_KEY not in metadata:
            raise ManifestError(
                "manifest schema metadata has no 'campar' key (dataset, attributes, "
                "eval_attributes); write manifests with write_manifest"
            )
        try:
            meta = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError as error:
            raise ManifestError(f"manifest metadata 'campar' is not valid JSON: {error}") from None
        if not isinstance(meta, dict):
            raise ManifestError("manifest metadata 'campar' must be a JSON object")
        for key in ("dataset", "attributes", "eval_attributes"):
            if key not in meta:
                raise ManifestError(f"manifest metadata 'campar' has no {key!r} key")
        info = ManifestInfo(
            dataset=meta["dataset"],
            attributes=_names(meta["attributes"], "attributes"),
            eval_attributes=_names(meta["eval_attributes"], "eval_attributes"),
            root=root,
        )
        check_info(info)
        return info


def check_info(info: ManifestInfo) -> None:
    """Metadata rules: a dataset name, unique attributes, evaluated ones among them."""
    if not isinstance(info.dataset, str) or not info.dataset:
        raise ManifestError(
            f"manifest metadata 'dataset' must be a non-empty string, not {info.dataset!r}"
        )
    for key, names in (("attributes", info.attributes), ("eval_attributes", info.eval_attributes)):
        if not names:
            raise ManifestError(f"manifest metadata {key!r} is empty")
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise ManifestError(f"manifest metadata {key!r} lists {name!r} twice")
            seen.add(name)
    unknown = [name for name in info.eval_attributes if name not in set(info.attributes)]
    if unknown:
        raise ManifestError(f"eval_attributes {unknown} are not among the manifest's attributes")


def _names(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ManifestError(f"manifest metadata {key!r} must be a list of non-empty strings")
    return tuple(value)


def manifest_table(
    images: Sequence[str],
    labels: np.ndarray,
    splits: Sequence[str],
    identities: Sequence[str],
    sources: Sequence[str],
) -> pa.Table:
    """The manifest's columns, typed, from plain Python/NumPy values (no validation here)."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[0] != len(images):
        raise ManifestError(
            f"labels must be an N x M array with N = {len(images)} images, got {labels.shape}"
        )
    flat = pa.array(labels.astype(np.int8, copy=False).reshape(-1), pa.int8())
    offsets = pa.array(np.arange(len(images) + 1, dtype=np.int32) * labels.shape[1])
    return pa.table(
        {
            "image": pa.array(list(images), pa.string()),
            "labels": pa.ListArray.from_arrays(offsets, flat),
            "split": pa.array(list(splits), pa.string()),
            "identity": pa.array(list(identities), pa.string()),
            "source": pa.array(list(sources), pa.string()),
        }
    )


def labels_matrix(table: pa.Table) -> np.ndarray:
    """The ``labels`` column as an N x M int8 array (M from the metadata when there is one)."""
    column = table.column("labels")
    m = None
    if table.schema.metadata and METADATA_KEY in table.schema.metadata:
        m = len(json.loads(table.schema.metadata[METADATA_KEY])["attributes"])
    if table.num_rows == 0:
        return np.zeros((0, m or 0), dtype=np.int8)
    array = column.combine_chunks()
    values = array.flatten().to_numpy(zero_copy_only=False).astype(np.int8, copy=False)
    if m is None:
        m = len(array[0])
    return values.reshape(table.num_rows, m)


def is_absolute(image: str) -> bool:
    """True for URIs and absolute local paths: references that ignore the manifest's folder."""
    return storage.is_uri(image) or image.startswith("file://") or os.path.isabs(image)


def resolve_image(image: str, root: str) -> str:
    """Absolute path or URI of an image reference found in a manifest whose folder is ``root``."""
    if is_absolute(image) or not root:
        return image
    return storage.join(root, image)


def rebase_images(table: pa.Table, from_root: str, to_root: str) -> pa.Table:
    """Re-express relative ``image`` references made against ``from_root`` for ``to_root``.

    Converters name images relative to the dataset folder; the manifest stores them relative to
    its own folder when the images lie under it (so the pair can move together), otherwise as
    absolute paths or URIs.
    """
    prefix = _prefix(from_root, to_root)
    if prefix == "":
        return table
    images = table.column("image").to_pylist()
    rebased = [img if is_absolute(img) else storage.join(prefix, img) for img in images]
    index = table.schema.get_field_index("image")
    return table.set_column(index, "image", pa.array(rebased, pa.string()))


def _prefix(from_root: str, to_root: str) -> str:
    """``from_root`` relative to ``to_root`` when inside it, else absolute; '' when equal."""
    if storage.is_uri(from_root) or storage.is_uri(to_root):
        src, dst = from_root.rstrip("/"), to_root.rstrip("/")
        if src == dst:
            return ""
        return src[len(dst) + 1 :] if src.startswith(dst + "/") else src
    src, dst = os.path.abspath(from_root), os.path.abspath(to_root)
    if src == dst:
        return ""
    if os.path.commonpath([src, dst]) == dst:
        return os.path.relpath(src, dst).replace(os.sep, "/")
    return src


def manifest_root(path: str) -> str:
    """The folder relative image paths resolve against: a file's folder, or the shard folder."""
    filesystem, inner = storage.resolve(path)
    is_dir = filesystem.get_file_info(inner).type == pafs.FileType.Directory
    if storage.is_uri(path):
        return path.rstrip("/") if is_dir else posixpath.dirname(path.rstrip("/"))
    return inner if is_dir else os.path.dirname(inner)


def read_manifest(path: str) -> tuple[pa.Table, ManifestInfo]:
    """Read and validate a manifest: a ``.parquet`` file, a folder of shards, or a URI.

    Shards are read in file-name order and must carry identical ``campar`` metadata.
    """
    filesystem, inner = storage.resolve(path)
    kind = filesystem.get_file_info(inner).type
    if kind == pafs.FileType.NotFound:
        raise ManifestError(f"manifest not found: {path}")
    if kind == pafs.FileType.Directory:
        files = sorted(pads.dataset(inner, filesystem=filesystem, format="parquet").files)
        if not files:
            raise ManifestError(f"manifest folder {path} holds no Parquet files")
    else:
        files = [inner]
    metadata = [pq.read_schema(f, filesystem=filesystem).metadata for f in files]
    for file, meta in zip(files[1:], metadata[1:], strict=True):
        if (meta or {}).get(METADATA_KEY) != (metadata[0] or {}).get(METADATA_KEY):
            raise ManifestError(
                f"manifest shard {file} has different 'campar' metadata than {files[0]}"
            )
    info = ManifestInfo.from_metadata(metadata[0], root=manifest_root(path))
    if len(files) == 1:
        table = pq.read_table(files[0], filesystem=filesystem)
    else:
        table = pads.dataset(files, filesystem=filesystem, format="parquet").to_table()
    table = validate(table, info)
    return table, info


def write_manifest(path: str, table: pa.Table, info: ManifestInfo) -> None:
    """Validate ``table`` against ``info`` and write it as one Parquet file (atomic locally)."""
    check_info(info)
    table = validate(table, info)
    table = table.replace_schema_metadata({METADATA_KEY: info.to_metadata()})
    packed = BINARY_COLUMN in table.column_names
    buffer = io.BytesIO()
    pq.write_table(
        table, buffer, row_group_size=PACKED_ROW_GROUP_SIZE if packed else ROW_GROUP_SIZE
    )
    storage.write_bytes(path, buffer.getvalue())


def validate(table: pa.Table, info: ManifestInfo) -> pa.Table:
    """Check every rule of the format; return the table with canonical column types.

    Raises :class:`ManifestError` naming the first offending row (index and image).
    """
    missing = [name for name in REQUIRED_COLUMNS if name not in table.column_names]
    if missing:
        raise ManifestError(
            f"manifest has no column {missing[0]!r}; required columns: "
            f"{', '.join(REQUIRED_COLUMNS)}; found: {', '.join(table.column_names)}"
        )
    for name in ("image", "split", "identity", "source"):
        table = _as_strings(table, name)
    images = table.column("image")
    for name in (
        *REQUIRED_COLUMNS,
        *([BINARY_COLUMN] if BINARY_COLUMN in table.column_names else []),
    ):
        nulls = table.column(name).null_count
        if nulls:
            row = _first(pc.is_null(table.column(name)))
            raise ManifestError(f"{_row(images, row)}: column {name!r} is null")
    table = _check_labels(table, info.attributes)
    _check_splits(table)
    _check_unique_images(images)
    if BINARY_COLUMN in table.column_names:
        kind = table.schema.field(BINARY_COLUMN).type
        if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
            raise ManifestError(f"column 'binary' must hold encoded image bytes, not {kind}")
    return table


def _as_strings(table: pa.Table, name: str) -> pa.Table:
    kind = table.schema.field(name).type
    base = kind.value_type if pa.types.is_dictionary(kind) else kind
    if not (pa.types.is_string(base) or pa.types.is_large_string(base)):
        raise ManifestError(f"column {name!r} must hold strings, not {kind}")
    index = table.schema.get_field_index(name)
    return table.set_column(index, name, table.column(name).cast(pa.string()))


def _check_labels(table: pa.Table, attributes: tuple[str, ...]) -> pa.Table:
    m = len(attributes)
    column = table.column("labels")
    kind = column.type
    if not (
        pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    ) or not pa.types.is_integer(kind.value_type):
        raise ManifestError(f"column 'labels' must be a list of integers, not {kind}")
    images = table.column("image")
    lengths = pc.list_value_length(column)
    wrong = pc.not_equal(lengths, m)
    if pc.any(wrong).as_py():
        row = _first(wrong)
        raise ManifestError(
            f"{_row(images, row)}: column 'labels' has {lengths[row].as_py()} values, "
            f"expected {m} (one per attribute)"
        )
    array = column.combine_chunks()
    values = array.flatten()  # exactly m values per row now, so value k belongs to row k // m
    numbers = values.to_numpy(zero_copy_only=False)
    bad = (
        np.flatnonzero(pc.is_null(values).to_numpy(zero_copy_only=False))
        if values.null_count
        else np.flatnonzero((numbers < 0) | (numbers > 1))
    )
    if bad.size:
        row, attribute = divmod(int(bad[0]), m)
        raise ManifestError(
            f"{_row(images, row)}: column 'labels' holds {values[int(bad[0])].as_py()} for "
            f"attribute {attributes[attribute]!r}; labels must be 0 or 1"
        )
    if pa.types.is_list(kind) and kind.value_type == pa.int8():
        return table
    offsets = pa.array(np.arange(0, m * table.num_rows + 1, m, dtype=np.int32))
    canonical = pa.ListArray.from_arrays(offsets, values.cast(pa.int8()))
    return table.set_column(table.schema.get_field_index("labels"), "labels", canonical)


def _check_splits(table: pa.Table) -> None:
    splits = table.column("split")
    unknown = pc.invert(pc.is_in(splits, pa.array(SPLITS)))
    if pc.any(unknown).as_py():
        row = _first(unknown)
        raise ManifestError(
            f"{_row(table.column('image'), row)}: column 'split' is {splits[row].as_py()!r}; "
            f"valid splits: {', '.join(SPLITS)}"
        )


def _check_unique_images(images: pa.ChunkedArray) -> None:
    if pc.count_distinct(images).as_py() == len(images):
        return
    counts = pc.value_counts(images)
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(repeated):
        value = repeated[0].as_py()
        rows = pc.indices_nonzero(pc.equal(images, value)).to_pylist()
        raise ManifestError(
            f"rows {rows[0]} and {rows[1]} have the same image {value!r}; "
            "column 'image' must name each image once"
        )


def _first(mask: pa.ChunkedArray | pa.Array) -> int:
    return pc.indices_nonzero(pc.fill_null(mask, False))[0].as_py()


def _row(images: pa.ChunkedArray, row: int) -> str:
    return f"row {row} (image {images[row].as_py()!r})"
