"""Any folder of images plus a CSV: the way to bring a dataset no other converter knows.

The CSV's header is ``image,<attr1>,<attr2>,...``: ``image`` is a path relative to the folder
(or absolute, or a URI; outside the folder only with ``--allow-outside-root``) and each
attribute column holds 1, 0 or -1 (not annotated: left out of training and scoring). Optional
columns: ``split`` (train/val/test; without it the split is seeded and person-disjoint by
``ratios``), ``identity`` (person id; without it each image is its own person) and ``source``.
"""

from __future__ import annotations

import csv
import io
import posixpath

import numpy as np

from campar_ray import storage
from campar_ray.data.converters.common import Converted, DatasetError, Option, require_images
from campar_ray.data.manifest import (
    SPLITS,
    UNKNOWN,
    ManifestInfo,
    is_absolute,
    manifest_table,
    outside_root,
    resolve_image,
)
from campar_ray.data.split import parse_ratios, split_by_identity

RESERVED = ("image", "split", "identity", "source")

OPTIONS = (
    Option("csv", "labels.csv", "the CSV, relative to the folder or absolute"),
    Option(
        "ratios",
        (0.7, 0.1, 0.2),
        "train,val,test fractions when the CSV has no split column",
        parse_ratios,
    ),
    Option("eval_attributes", "", "comma-separated attributes to evaluate (default: all)"),
    Option("name", "folder", "dataset name stored in the manifest"),
)


def convert(
    root: str,
    seed: int,
    *,
    csv: str,
    ratios: tuple[float, float, float],
    eval_attributes: str,
    name: str,
) -> Converted:
    """Manifest rows for the images listed in the CSV ``csv`` of the folder ``root``."""
    path = csv if is_absolute(csv) else storage.join(root, csv)
    header, rows = _read_csv(path)
    attributes = [column for column in header if column not in RESERVED]
    if "image" not in header:
        raise DatasetError(f"{path} has no 'image' column; header: {','.join(header)}")
    if not attributes:
        raise DatasetError(f"{path} has no attribute columns besides {', '.join(RESERVED)}")
    images = [row["image"] for _, row in rows]
    labels = np.zeros((len(rows), len(attributes)), dtype=np.int8)
    for index, (line, row) in enumerate(rows):
        labels[index] = [_binary(row, attribute, path, line) for attribute in attributes]
    _require(images, root, path)
    identities = [row["identity"] for _, row in rows] if "identity" in header else images
    if "split" in header:
        splits = [_split(row, path, line) for line, row in rows]
    else:
        splits = split_by_identity(identities, parse_ratios(ratios), seed).tolist()
    evaluated = _evaluated(eval_attributes, attributes)
    table = manifest_table(
        images=images,
        labels=labels,
        splits=splits,
        identities=identities,
        sources=[row["source"] for _, row in rows] if "source" in header else [name] * len(rows),
    )
    return Converted(table, ManifestInfo(name, tuple(attributes), evaluated))


def _read_csv(path: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header and ``(line number, row)`` of every record (blank lines skipped)."""
    try:
        text = storage.read_bytes(path).decode("utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(f"CSV not found: {path}") from None
    reader = csv.reader(io.StringIO(text))
    header = [column.strip() for column in next(reader, [])]
    rows = []
    for fields in reader:
        if not fields:
            continue
        if len(fields) != len(header):
            raise DatasetError(
                f"{path} line {reader.line_num} has {len(fields)} fields, the header has "
                f"{len(header)}"
            )
        row = dict(zip(header, (field.strip() for field in fields), strict=True))
        rows.append((reader.line_num, row))
    return header, rows


def _binary(row: dict[str, str], attribute: str, path: str, line: int) -> int:
    value = row[attribute]
    if value not in ("0", "1", str(UNKNOWN)):
        raise DatasetError(
            f"{path} line {line}, column {attribute!r}: {value!r} is not 1, 0 or -1 (not annotated)"
        )
    return int(value)


def _split(row: dict[str, str], path: str, line: int) -> str:
    if row["split"] not in SPLITS:
        raise DatasetError(
            f"{path} line {line}, column 'split': {row['split']!r}; "
            f"valid splits: {', '.join(SPLITS)}"
        )
    return row["split"]


def _require(images: list[str], root: str, path: str) -> None:
    """Every listed image must exist: one folder listing for those under ``root``, a lookup
    each for the others (which ``prepare`` then refuses unless told to allow them)."""
    inside = [image for image in images if not is_absolute(image) and not outside_root(image, root)]
    require_images([posixpath.normpath(image) for image in inside], root, path)
    listed = set(inside)
    for image in images:
        if image not in listed and not storage.exists(resolve_image(image, root)):
            raise DatasetError(f"image listed in {path} is missing: {image}")


def _evaluated(names: str, attributes: list[str]) -> tuple[str, ...]:
    if not names.strip():
        return tuple(attributes)
    chosen = tuple(name.strip() for name in names.split(",") if name.strip())
    unknown = [name for name in chosen if name not in attributes]
    if unknown:
        raise ValueError(
            f"eval_attributes {unknown} are not CSV columns; attributes: {', '.join(attributes)}"
        )
    return chosen
