"""The manifest: the one Parquet format every converter writes and everything downstream reads.

One row per image: ``image`` (a path relative to the manifest's folder, an absolute path or an
``s3://``/``gs://`` URI), ``labels`` (list<int8>, one value per attribute: 1 present, 0 absent,
-1 not annotated), ``split`` (``train``/``val``/``test``), ``identity`` (person id) and
``source`` (subset or origin). A *packed* manifest also has a ``binary`` column with the
encoded image bytes, so a cluster reads a few large files instead of many small ones; ``image``
still names each row. A manifest is one ``.parquet`` file or a folder of Parquet shards (read
in file-name order); :class:`ManifestWriter` writes either form chunk by chunk, so memory holds
one chunk whatever the corpus size. The schema metadata key ``campar`` holds JSON with the
dataset name, the ordered attribute names and the attributes the dataset's protocol evaluates.

Validation is vectorised (``pyarrow.compute``), so a million-row manifest checks in well under a
second, and every error names the row (index and image), the column and the bad value.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from campar_ray import storage
from campar_ray.bounded import BoundedError, load_json, shorten

SPLITS = ("train", "val", "test")
UNKNOWN = -1
"""The label value of an attribute nobody annotated on that image: training, stage 2 and the
metrics leave such an entry out, instead of reading it as a negative."""
LABEL_VALUES = (UNKNOWN, 0, 1)
REQUIRED_COLUMNS = ("image", "labels", "split", "identity", "source")
BINARY_COLUMN = "binary"
METADATA_KEY = b"campar"
ROW_GROUP_SIZE = 4096
"""Rows per row group of a path manifest. A decode task reads the ``image`` and ``labels``
columns of one whole row group to take its piece's rows, so this bounds that read (about 1 %
of the piece's decode time at 4096 rows, 7 % at 16384); training pieces are dealt from a
random order within each row group."""
PACKED_ROW_GROUP_SIZE = 256
"""Rows of encoded images per row group, and so one Ray Data decode block
(``ray_pipeline.BLOCK_ROWS`` is this value): a decode task reads exactly one row group (a few
MB) of a packed manifest."""
SHARD_NAME = "part-{:05d}.parquet"


class ManifestError(ValueError):
    """A manifest that breaks the format; the message names the row, column or key at fault."""


class OutsideRootError(ManifestError):
    """An image reference that leaves the manifest's folder (see :func:`outside_root`)."""


def eval_positions(attributes: Sequence[str], evaluated: Sequence[str]) -> np.ndarray:
    """Positions of the evaluated attributes among all, in evaluation order; all of them when
    none are named. The one rule for training's validation metrics, stage 2 and evaluation."""
    if not evaluated:
        return np.arange(len(attributes), dtype=np.int64)
    unknown = sorted(set(evaluated) - set(attributes))
    if unknown:
        raise ValueError(f"evaluated attributes {unknown} are not among {tuple(attributes)}")
    position = {name: index for index, name in enumerate(attributes)}
    return np.array([position[name] for name in evaluated], dtype=np.int64)


@dataclass(frozen=True)
class ManifestInfo:
    """What the schema metadata says about a manifest, plus where its relative paths point."""

    dataset: str
    attributes: tuple[str, ...]
    eval_attributes: tuple[str, ...]
    root: str = ""
    """Folder or URI that relative image paths resolve against (set by ``read_manifest``)."""
    path: str = field(default="", compare=False)
    """The file or shard folder this was read from (set by ``read_manifest``): streaming
    readers go back to it instead of holding the rows."""
    pixels: tuple[int, int] | None = None
    """``(height, width)`` when the ``binary`` column holds decoded RGB pixels of that size
    (``campar pack --decode``) instead of encoded image files: a reader then copies each image
    instead of decoding and resizing it."""

    def eval_indices(self) -> np.ndarray:
        """Positions of ``eval_attributes`` in ``attributes`` (:func:`eval_positions`)."""
        return eval_positions(self.attributes, self.eval_attributes)

    def to_metadata(self) -> bytes:
        """The ``campar`` schema metadata value (``root`` is where the file is, not stored)."""
        meta = {
            "dataset": self.dataset,
            "attributes": list(self.attributes),
            "eval_attributes": list(self.eval_attributes),
        }
        if self.pixels is not None:
            meta["pixels"] = list(self.pixels)
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
            meta = load_json(metadata[METADATA_KEY], "manifest metadata 'campar'")
        except BoundedError as error:
            raise ManifestError(str(error)) from None
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
            pixels=_pixels(meta.get("pixels")),
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


def _pixels(value: object) -> tuple[int, int] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ManifestError(
            f"manifest metadata 'pixels' must be [height, width] (positive integers), not {value!r}"
        )
    return value[0], value[1]


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


def known_entries(labels: np.ndarray) -> np.ndarray | None:
    """Which entries of an N x M label array are annotated (N x M bool), or None when all
    are: callers then run the arithmetic they ran before unknown labels existed, bit for bit."""
    known = np.asarray(labels) != UNKNOWN
    return None if known.all() else known


def unknown_counts(labels: np.ndarray, attributes: Sequence[str]) -> dict[str, int]:
    """How many images leave each attribute unannotated (:data:`UNKNOWN`), for every attribute
    with at least one; empty when every label is known."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return {}
    counts = (labels == UNKNOWN).sum(axis=0)
    return {name: int(n) for name, n in zip(attributes, counts, strict=True) if n}


def subset_rows(splits: np.ndarray, per_split: int) -> np.ndarray:
    """Which rows a quick check on ``per_split`` images of each split uses (``data.subset``),
    given each row's split: the first ones of each split in manifest order, so training, its
    logits and a resume all take the same ones. ``0``: every row."""
    values = np.asarray(splits, dtype=object)
    if per_split <= 0:
        return np.ones(len(values), dtype=bool)
    chosen = np.zeros(len(values), dtype=bool)
    for split in SPLITS:
        chosen[np.flatnonzero(values == split)[:per_split]] = True
    return chosen


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


def outside_root(image: str, root: str) -> bool:
    """True when the reference ``image`` of a manifest whose folder is ``root`` leaves it,
    read lexically (no I/O; :func:`guard_image` also resolves symlinks).

    The one rule of what a manifest may name: a relative path that stays under ``root`` once
    ``..`` is collapsed, or an absolute path / URI of ``root``'s own scheme (and bucket)
    under it. A manifest from a shared bucket is someone else's input; without this rule
    ``../secret.txt`` or ``/home/me/.aws/credentials`` would be read, and packed. An empty
    root (files a user named on the command line) constrains nothing.
    """
    if not root:
        return False
    if not is_absolute(image):
        relative = posixpath.normpath(image)
        return relative == ".." or relative.startswith("../")
    scheme, path = _scheme_path(image)
    root_scheme, root_path = _scheme_path(root)
    if scheme != root_scheme:
        return True
    clean = posixpath.normpath if scheme else os.path.normpath
    path, root_path = clean(path), clean(root_path).rstrip("/")
    return path != root_path and not path.startswith(root_path + "/")


def guard_image(
    image: str, root: str, *, allow_outside_root: bool = False, row: int | None = None
) -> str:
    """The path or URI to open for the reference ``image`` of a manifest whose folder is
    ``root``, or :class:`OutsideRootError` (naming ``row`` if given).

    The one guard every reader of manifest rows goes through (training, ``pack``,
    ``verify``, ``predict``, the bundle's samples, the report's probes):

    - a URI with a query is refused always, ``allow_outside_root`` or not: pyarrow reads
      ``?endpoint_override=...`` as filesystem options and would send the request, signed
      with the user's credentials, wherever the row says;
    - unless ``allow_outside_root``, the reference must stay in ``root`` (:func:`outside_root`),
      and on a local disk so must the file it names once every symlink is resolved: a
      symlink inside ``root`` may point only inside ``root``.
    """
    where = "" if row is None else f"row {row}: "
    path = resolve_image(image, root)
    if storage.has_options(path):
        raise OutsideRootError(
            f"{where}image {shorten(image)} is a URI with options ('?...'), which would "
            f"redirect the request; {storage.OPTIONS_HINT}"
        )
    if allow_outside_root or not root:
        return path
    if outside_root(image, root) or _links_outside(path, root):
        how = " through a symlink" if not outside_root(image, root) else ""
        raise OutsideRootError(
            f"{where}image {shorten(image)} is outside {root}{how}; pass "
            "--allow-outside-root (or --set data.allow_outside_root=true) to read it anyway"
        )
    return path


def _links_outside(path: str, root: str) -> bool:
    """True when the local file ``path`` (under ``root`` as written) resolves outside the
    resolved ``root``: a symlink out of the manifest's folder."""
    if storage.is_uri(path) or storage.is_uri(root):
        return False  # object stores have no symlinks
    real = os.path.realpath(path.removeprefix("file://"))
    real_root = os.path.realpath(root.removeprefix("file://"))
    return real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep)


def check_images(images: Sequence[str], root: str, *, allow_outside_root: bool = False) -> None:
    """:func:`guard_image` for every row of a manifest, before any image is read."""
    for row, image in enumerate(images):
        guard_image(image, root, allow_outside_root=allow_outside_root, row=row)


def _scheme_path(reference: str) -> tuple[str, str]:
    """``("s3", "bucket/key")`` for a URI, ``("", path)`` for a local path."""
    scheme, sep, rest = reference.partition("://")
    return (scheme.lower(), rest) if sep else ("", reference)


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


def manifest_files(path: str) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem and Parquet files of a manifest: the file itself, or the folder's shards
    in file-name order (the order of the manifest's rows)."""
    if not path:
        raise ManifestError("no manifest given (set data.manifest, or pass --manifest)")
    filesystem, inner = storage.resolve(path)
    kind = filesystem.get_file_info(inner).type
    if kind == pafs.FileType.NotFound:
        raise ManifestError(f"manifest not found: {path}")
    if kind != pafs.FileType.Directory:
        return filesystem, [inner]
    files = sorted(pads.dataset(inner, filesystem=filesystem, format="parquet").files)
    if not files:
        raise ManifestError(f"manifest folder {path} holds no Parquet files")
    return filesystem, files


def is_single_file(out: str) -> bool:
    """True when a manifest written to ``out`` is one file, False for a folder of shards."""
    return out.rstrip("/").endswith(".parquet")


def output_root(out: str) -> str:
    """The folder a manifest written to ``out`` lives in (what ``manifest_root`` will say once
    it exists): the shard folder itself, or the ``.parquet`` file's folder."""
    out = out.rstrip("/")
    if storage.is_uri(out):
        return posixpath.dirname(out) if is_single_file(out) else out
    out = os.path.abspath(out)
    return os.path.dirname(out) if is_single_file(out) else out


def read_info(path: str) -> ManifestInfo:
    """A manifest's metadata, read from its first file's footer: a streaming reader's view,
    which never holds the rows."""
    filesystem, files = manifest_files(path)
    schema = pq.read_schema(files[0], filesystem=filesystem)
    info = ManifestInfo.from_metadata(schema.metadata, root=manifest_root(path))
    return dataclasses.replace(info, path=path)


def is_packed(path: str) -> bool:
    """Whether the manifest carries its images' bytes (then no reference is ever opened)."""
    filesystem, files = manifest_files(path)
    return BINARY_COLUMN in pq.read_schema(files[0], filesystem=filesystem).names


def read_manifest(path: str, *, with_bytes: bool = True) -> tuple[pa.Table, ManifestInfo]:
    """Read and validate a manifest: a ``.parquet`` file, a folder of shards, or a URI.

    Shards must carry identical ``campar`` metadata. ``with_bytes=False`` leaves out the
    encoded images of a packed manifest: a training driver needs references and labels, and
    its decode tasks stream the bytes from ``info.path`` themselves.
    """
    filesystem, files = manifest_files(path)
    try:
        schemas = [pq.read_schema(f, filesystem=filesystem) for f in files]
    except pa.ArrowInvalid as error:  # not Parquet at all, or cut off before its footer
        raise ManifestError(f"cannot read manifest {path}: {error}") from None
    for file, schema in zip(files[1:], schemas[1:], strict=True):
        if (schema.metadata or {}).get(METADATA_KEY) != (schemas[0].metadata or {}).get(
            METADATA_KEY
        ):
            raise ManifestError(
                f"manifest shard {file} has different 'campar' metadata than {files[0]}"
            )
    info = ManifestInfo.from_metadata(schemas[0].metadata, root=manifest_root(path))
    info = dataclasses.replace(info, path=path)
    columns = [n for n in schemas[0].names if with_bytes or n != BINARY_COLUMN]
    if len(files) == 1:
        table = pq.read_table(files[0], filesystem=filesystem, columns=columns)
    else:
        dataset = pads.dataset(files, filesystem=filesystem, format="parquet")
        table = dataset.to_table(columns=columns)
    return validate(table, info), info


def write_manifest(
    path: str, table: pa.Table, info: ManifestInfo, *, shard_mb: float | None = None
) -> None:
    """Validate ``table`` against ``info`` and write it: one ``.parquet`` file, or a folder of
    shards of about ``shard_mb`` MB when ``path`` does not end in ``.parquet``."""
    table = validate(table, info)
    rows = PACKED_ROW_GROUP_SIZE if BINARY_COLUMN in table.column_names else ROW_GROUP_SIZE
    with ManifestWriter(path, info, shard_mb=shard_mb) as writer:
        for start in range(0, max(table.num_rows, 1), rows):
            writer.write(table.slice(start, rows))


class ManifestWriter:
    """Writes a manifest chunk by chunk; each :meth:`write` becomes one row group.

    ``out`` ending in ``.parquet`` gets one file; any other path is a folder that receives
    shards ``part-00000.parquet``, ``part-00001.parquet``, ... each closed once it holds
    ``shard_mb`` MB (on disk), so neither memory nor any one object grows with the corpus.
    Local files appear atomically (written under a temporary name, then renamed); an
    existing manifest folder is refused rather than mixed with.
    """

    def __init__(self, out: str, info: ManifestInfo, *, shard_mb: float | None = None):
        check_info(info)
        self.out, self.info = out, info
        self.single = is_single_file(out)
        self.shard_bytes = None if self.single or not shard_mb else int(shard_mb * 2**20)
        self.filesystem, self.inner = storage.resolve(out)
        if not self.single:
            found = self.filesystem.get_file_info(
                pafs.FileSelector(self.inner, allow_not_found=True)
            )
            if any(f.path.endswith(".parquet") for f in found):
                raise ManifestError(
                    f"{out} already holds Parquet files; write a manifest folder to a new path"
                )
        self.files: list[str] = []
        self.rows = 0
        self._schema: pa.Schema | None = None
        self._stream: pa.NativeFile | None = None
        self._writer: pq.ParquetWriter | None = None

    def write(self, chunk: pa.Table) -> None:
        """Validate one chunk of rows and append it (a new shard starts when one is full)."""
        chunk = validate(chunk, self.info)
        if self._schema is None:
            self._schema = chunk.schema.with_metadata({METADATA_KEY: self.info.to_metadata()})
        chunk = chunk.cast(self._schema)
        if self._writer is None:
            self._open()
        self._writer.write_table(chunk, row_group_size=max(chunk.num_rows, 1))
        self.rows += chunk.num_rows
        if self.shard_bytes is not None and self._stream.tell() >= self.shard_bytes:
            self._close_shard()

    def close(self) -> list[str]:
        """Finish the last file; return every file written."""
        if self._writer is None and not self.files:
            raise ManifestError(f"no rows were written to {self.out}")
        if self._writer is not None:
            self._close_shard()
        return self.files

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if kind is None:
            self.close()
            return
        if self._writer is not None:  # a failed run leaves no partial manifest behind
            self._writer.close()
            self._stream.close()
            self.files.append(self._open_name)
        for name in self.files:
            self.filesystem.delete_file(name)

    @property
    def _local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    @property
    def _target(self) -> str:
        if self.single:
            return self.inner
        return posixpath.join(self.inner, SHARD_NAME.format(len(self.files)))

    @property
    def _open_name(self) -> str:
        """Where the open file is being written: a temporary name on local disks."""
        return self._target + ".tmp" if self._local else self._target

    def _open(self) -> None:
        if self._local:  # object stores have no folders to create
            self.filesystem.create_dir(posixpath.dirname(self._target), recursive=True)
        self._stream = self.filesystem.open_output_stream(self._open_name)
        # Encoded images are unique and already compressed: a dictionary page over them makes
        # every decode task's read of its row group 10x slower (14 ms against 1.5 ms for 256
        # PETA images), and statistics over them only bloat the footer.
        plain = [name for name in self._schema.names if name != BINARY_COLUMN]
        self._writer = pq.ParquetWriter(
            self._stream, self._schema, use_dictionary=plain, write_statistics=plain
        )

    def _close_shard(self) -> None:
        self._writer.close()
        self._stream.close()
        if self._local:
            self.filesystem.move(self._open_name, self._target)
        self.files.append(self._target)
        self._writer = self._stream = None


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
        else np.flatnonzero((numbers < UNKNOWN) | (numbers > 1))
    )
    if bad.size:
        row, attribute = divmod(int(bad[0]), m)
        raise ManifestError(
            f"{_row(images, row)}: column 'labels' holds {values[int(bad[0])].as_py()} for "
            f"attribute {attributes[attribute]!r}; labels must be 1, 0 or -1 (not annotated)"
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
