"""``prepare``: turn a raw dataset layout into a validated manifest, one registry of formats.

Each format is a converter function plus the keyword options it takes, described by
:class:`Option` (name, default, help, string parser) so the CLI can expose them as flags:

========== ===================================================== ============================
format     raw layout under ``root``                             options
========== ===================================================== ============================
pa100k     ``annotation.mat``, ``data/``                         (none; official split)
rap1       ``RAP_annotation.mat``, ``RAP_dataset/``              partition, val_fraction,
                                                                 uncertain
rap2       ``RAP_annotation.mat``, ``RAP_dataset/``              partition, uncertain
peta       ``PETA dataset/<subset>/archive/`` + ``Label.txt``    ratios, strict, mat,
           (+ Rethinking_of_PAR's ``PETA.mat`` with ``mat``)     partition
folder     images + a CSV ``image,<attr>,...``                   csv, ratios,
                                                                 eval_attributes, name
synthetic  (written here) ``images/``                            n, size, ratios
merge      manifests to merge into one attribute space           manifests, attribute_map,
                                                                 name
========== ===================================================== ============================
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from campar_ray import storage
from campar_ray.data.converters import folder, merge, pa100k, peta, rap, synthetic
from campar_ray.data.converters.common import Converted, DatasetError, Option
from campar_ray.data.images import STRICT, ImageLimits
from campar_ray.data.manifest import (
    SPLITS,
    check_images,
    output_root,
    outside_root,
    rebase_images,
    write_manifest,
)
from campar_ray.data.pack import SHARD_MB, pack_rows
from campar_ray.data.verify import VerifyReport, verify_manifest

__all__ = [
    "FORMATS",
    "Converted",
    "DatasetError",
    "Format",
    "Option",
    "PrepareReport",
    "get_format",
    "prepare",
    "resolve_options",
]


@dataclass(frozen=True)
class Format:
    """A raw dataset layout: its converter and the options that converter takes."""

    name: str
    help: str
    convert: Callable[..., Converted]
    """``convert(root, seed, **options)`` with every option given."""
    options: tuple[Option, ...] = ()


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("pa100k", "PA100K: annotation.mat and data/", pa100k.convert, pa100k.OPTIONS),
        Format(
            "rap1", "RAPv1: RAP_annotation.mat and RAP_dataset/", rap.convert_rap1, rap.RAP1_OPTIONS
        ),
        Format(
            "rap2", "RAPv2: RAP_annotation.mat and RAP_dataset/", rap.convert_rap2, rap.RAP2_OPTIONS
        ),
        Format(
            "peta",
            "PETA: PETA dataset/<subset>/archive/ with Label.txt",
            peta.convert,
            peta.OPTIONS,
        ),
        Format(
            "folder", "a folder of images plus a CSV of 0/1 labels", folder.convert, folder.OPTIONS
        ),
        Format(
            "synthetic",
            "procedural pedestrians, generated into root (default: the manifest's folder)",
            synthetic.convert,
            synthetic.OPTIONS,
        ),
        Format(
            "merge",
            "several manifests in one attribute space (unannotated attributes unknown)",
            merge.convert,
            merge.OPTIONS,
        ),
    )
}


@dataclass(frozen=True)
class PrepareReport:
    """What ``prepare`` wrote, and everything it left out."""

    path: str
    dataset: str
    rows: int
    splits: dict[str, int]
    attributes: int
    eval_attributes: int
    dropped: dict[str, int] = field(default_factory=dict)
    packed: bool = False
    images_outside: bool = False
    """The images lie outside the manifest's folder: readers refuse them unless allowed."""
    verify: VerifyReport | None = None

    def summary(self) -> str:
        counts = ", ".join(f"{split} {self.splits.get(split, 0)}" for split in SPLITS)
        lines = [
            f"wrote {self.path}: {self.dataset}, {self.rows} images ({counts}), "
            f"{self.attributes} attributes ({self.eval_attributes} evaluated)"
            + (", images packed" if self.packed else "")
        ]
        lines += [f"  dropped: {reason}: {count}" for reason, count in self.dropped.items()]
        if self.images_outside:
            lines.append(
                "  note: the images lie outside the manifest's folder: `campar train` (tune, "
                "demo, pack) reads them only with --allow-outside-root "
                f"(campar train --manifest {self.path} --allow-outside-root ...); "
                "--pack here stores them inside instead"
            )
        if self.verify is not None:
            lines.append(self.verify.summary())
        return "\n".join(lines)


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"unknown dataset format {name!r}; valid formats: {', '.join(FORMATS)}")
    return FORMATS[name]


def resolve_options(spec: Format, options: dict[str, Any]) -> dict[str, Any]:
    """Every option of ``spec``: given ones (strings parsed), the rest at their defaults."""
    valid = {option.name: option for option in spec.options}
    unknown = [name for name in options if name not in valid]
    if unknown:
        raise ValueError(
            f"format {spec.name!r} has no option {unknown[0]!r}; "
            f"valid options: {', '.join(valid) or 'none'}"
        )
    resolved = {}
    for name, option in valid.items():
        value = options.get(name, option.default)
        resolved[name] = option.parse(value) if isinstance(value, str) else value
    return resolved


def prepare(
    fmt: str,
    root: str,
    out: str,
    seed: int = 0,
    *,
    pack: bool = False,
    shard_mb: float = SHARD_MB,
    verify: bool = False,
    limits: ImageLimits = STRICT,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> PrepareReport:
    """Convert the dataset at ``root`` in format ``fmt`` into the manifest ``out``.

    ``out`` is a ``.parquet`` file, or a folder (any other path) that receives Parquet shards
    of about ``shard_mb`` MB, written one row group at a time. An empty ``root`` means the
    manifest's folder (where ``synthetic`` then writes its images). ``out`` is checked to be
    writable before any conversion starts.

    ``options`` are the format's own (see ``FORMATS[fmt].options``); the seed drives any
    split the format does not fix. Images the converter names outside ``root`` are refused
    before anything is written, unless ``limits`` allow them. ``pack`` streams the encoded
    images into the manifest (files that do not decode as images are left out and counted);
    ``verify`` then decodes every image (``progress(done, total)`` reports on it).
    """
    spec = get_format(fmt)
    resolved = resolve_options(spec, options)
    if not storage.is_uri(out):
        out = os.path.abspath(out)
    folder_of_out = output_root(out)
    storage.check_writable(folder_of_out)
    if not root:
        root = folder_of_out
    elif not storage.is_uri(root):
        root = os.path.abspath(root)
    converted = spec.convert(root, seed, **resolved)
    images = converted.table.column("image").to_pylist()
    check_images(images, root, allow_outside_root=limits.allow_outside_root)
    table = rebase_images(converted.table, root, folder_of_out)
    dropped = dict(converted.dropped)
    if pack:
        packed = pack_rows(
            table,
            converted.info,
            folder_of_out,
            out,
            shard_mb=shard_mb,
            max_pixels=limits.max_pixels,
        )
        table = _without(table, [image for image, _ in packed.skipped])
        if packed.skipped:
            dropped["files that do not decode as images (not packed)"] = len(packed.skipped)
    else:
        write_manifest(out, table, converted.info, shard_mb=shard_mb)
    counts = pc.value_counts(table.column("split")).to_pylist()
    # Checked against the dataset folder above; rows rebased to absolute paths now lie
    # outside the manifest's folder, which verify must not hold against them.
    checked = dataclasses.replace(limits, allow_outside_root=True)
    return PrepareReport(
        path=out,
        dataset=converted.info.dataset,
        rows=table.num_rows,
        splits={item["values"]: item["counts"] for item in counts},
        attributes=len(converted.info.attributes),
        eval_attributes=len(converted.info.eval_attributes),
        dropped=dropped,
        packed=pack,
        images_outside=not pack and outside_root(root, folder_of_out),
        verify=verify_manifest(out, progress, limits=checked) if verify else None,
    )


def _without(table: pa.Table, images: list[str]) -> pa.Table:
    """``table`` less the rows naming ``images``."""
    return table.filter(pc.invert(pc.is_in(table.column("image"), pa.array(images, pa.string()))))
