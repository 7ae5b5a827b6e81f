"""What every converter shares: its result type, its option type and raw-file helpers.

A converter reads one raw dataset layout and returns a :class:`Converted`: the manifest table
with image paths relative to the dataset folder, its metadata, and a count of everything it
left out and why. Writing, path rebasing and verification are done once, by ``prepare``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import scipy.io

from campar_ray import storage
from campar_ray.data.manifest import ManifestInfo


class DatasetError(ValueError):
    """A raw dataset that does not have the structure its format expects (names file and entry)."""


@dataclass(frozen=True)
class Converted:
    """A converter's result, before it is written."""

    table: pa.Table
    """Manifest rows; relative ``image`` paths are relative to the dataset root."""
    info: ManifestInfo
    dropped: dict[str, int] = field(default_factory=dict)
    """What was left out or changed, as ``reason -> count``."""


@dataclass(frozen=True)
class Option:
    """One keyword option of a format, described so a CLI can expose it as ``--name``."""

    name: str
    default: Any
    help: str
    parse: Callable[[str], Any] = str
    """Turns the command-line string into the value the converter takes."""


def load_mat(path: str) -> dict[str, Any]:
    """A MATLAB v5 file as nested dicts/lists/arrays (structs -> dicts, cells -> lists)."""
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise DatasetError(f"annotation file not found: {path}") from None
    try:
        return scipy.io.loadmat(io.BytesIO(data), simplify_cells=True)
    except NotImplementedError:
        raise DatasetError(
            f"{path} is a MATLAB v7.3 (HDF5) file; save it with -v7 to read it"
        ) from None
    except ValueError as error:
        raise DatasetError(f"{path} is not a readable MATLAB file: {error}") from None


def entry(mapping: dict[str, Any], key: str, where: str) -> Any:
    """``mapping[key]`` or an error naming the file/struct and the keys it does have."""
    if not isinstance(mapping, dict) or key not in mapping:
        have = (
            sorted(k for k in mapping if not k.startswith("__"))
            if isinstance(mapping, dict)
            else []
        )
        raise DatasetError(f"{where} has no {key!r}; it has: {', '.join(have) or 'nothing'}")
    return mapping[key]


def strings(value: Any, where: str) -> list[str]:
    """A MATLAB cell array of strings (squeezed to a str, array or list) as a list."""
    items = np.atleast_1d(np.asarray(value, dtype=object)).reshape(-1)
    if not all(isinstance(item, str) for item in items):
        raise DatasetError(f"{where} must be a cell array of strings")
    return [item.strip() for item in items]


def matrix(value: Any, rows: int, where: str) -> np.ndarray:
    """A numeric N x M MATLAB matrix, restored to 2-D after squeezing."""
    array = np.asarray(value)
    if array.size % max(rows, 1) or not np.issubdtype(array.dtype, np.number):
        raise DatasetError(f"{where} must be a numeric matrix with {rows} rows, got {array.shape}")
    return array.reshape(rows, -1) if rows else array.reshape(0, 0)


def indices(value: Any, n: int, where: str) -> np.ndarray:
    """1-based MATLAB indices as 0-based int64, each checked to lie in ``[1, n]``."""
    array = np.atleast_1d(np.asarray(value)).reshape(-1).astype(np.int64)
    bad = array[(array < 1) | (array > n)]
    if bad.size:
        raise DatasetError(f"{where} holds index {bad[0]}, outside 1..{n} (1-based)")
    return array - 1


UNCERTAIN_POLICIES = ("zero", "error")


def binary_labels(
    labels: np.ndarray, uncertain: str, where: str, dropped: dict[str, int]
) -> np.ndarray:
    """0/1 labels from an annotation that marks uncertain values with 2.

    ``uncertain="zero"`` sets them to 0 (the field's usual reading) and counts them in
    ``dropped``; ``"error"`` refuses them. Any other value is always an error.
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain={uncertain!r}; valid values: {', '.join(UNCERTAIN_POLICIES)}")
    labels = np.asarray(labels)
    invalid = ~np.isin(labels, (0, 1, 2))
    if invalid.any():
        row, col = np.argwhere(invalid)[0]
        raise DatasetError(
            f"{where}: row {row}, attribute {col} has label {labels[row, col]}; expected 0, 1 or 2"
        )
    unsure = labels == 2
    if unsure.any():
        if uncertain == "error":
            row, col = np.argwhere(unsure)[0]
            raise DatasetError(
                f"{where}: row {row}, attribute {col} is 2 (uncertain); "
                "pass uncertain='zero' to read it as 0"
            )
        dropped["uncertain labels (2) read as 0"] = int(unsure.sum())
    return np.where(unsure, 0, labels).astype(np.int8)


def list_files(folder: str, recursive: bool = False) -> set[str]:
    """Names of the files under ``folder`` (relative, ``/``-separated), local or URI."""
    filesystem, inner = storage.resolve(folder)
    selector = pafs.FileSelector(inner, recursive=recursive)
    try:
        infos = filesystem.get_file_info(selector)
    except FileNotFoundError:
        raise DatasetError(f"image folder not found: {folder}") from None
    prefix = inner.rstrip("/") + "/"
    return {
        info.path[len(prefix) :] if info.path.startswith(prefix) else info.base_name
        for info in infos
        if info.type == pafs.FileType.File
    }


def require_images(names: list[str], folder: str, where: str) -> None:
    """Every name must be a file in ``folder``; otherwise say how many are missing and which."""
    present = list_files(folder, recursive=any("/" in name for name in names))
    missing = [name for name in names if name not in present]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DatasetError(
            f"{len(missing)} images named in {where} are missing from {folder}: {shown}"
        )
