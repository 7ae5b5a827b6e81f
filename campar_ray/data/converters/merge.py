"""The ``merge`` format: several manifests in one attribute space, unknown where unannotated.

Teams train one model over their own data and the public sets, whose attribute lists only
partly overlap. ``campar prepare merge --manifests a.parquet,b/ --attribute-map map.yaml``
reads each manifest, renames its attributes to the unified names the map gives, and writes
one manifest in which a unified attribute a dataset does not annotate is unknown (-1), so
that training, stage 2 and the metrics leave it out instead of reading it as absent.

The attribute map is a small YAML file::

    attributes: [female, hat, backpack]    # optional: the unified attributes, in order
    eval_attributes: [female, backpack]    # optional: those evaluated
    datasets:                              # per dataset name (a manifest's ``dataset``)
      peta: {personalFemale: female, accessoryHat: hat, carryingBackpack: backpack}
      pa100k: {Female: female, Hat: hat, Backpack: backpack}

A dataset attribute the map does not rename keeps its own name; one mapped to ``null`` is
left out. Without ``attributes`` the unified space is every resulting name, in the order the
manifests list them; with it, names outside it are left out (and counted). Without
``eval_attributes``, an attribute is evaluated when some input dataset evaluates it. Rows keep
their split, their ``source``, and their identity prefixed by the dataset name (``peta:3``),
so persons of different datasets never share an id. Images are referenced relative to the
dataset root (by default the merged manifest's folder) when they lie under it; ``prepare``
refuses the others unless outside images are allowed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import yaml

from campar_ray import storage
from campar_ray.data.converters.common import Converted, DatasetError, Option
from campar_ray.data.manifest import (
    BINARY_COLUMN,
    UNKNOWN,
    ManifestInfo,
    labels_matrix,
    manifest_root,
    manifest_table,
    read_manifest,
    rebase_images,
)

OPTIONS = (
    Option(
        "manifests",
        (),
        "merge: the manifests to merge, comma-separated (files, shard folders or URIs)",
        lambda text: tuple(item.strip() for item in text.split(",") if item.strip()),
    ),
    Option(
        "attribute_map",
        "",
        "merge: YAML mapping each dataset's attribute names to the unified ones "
        "(none: names are kept as they are)",
    ),
    Option("name", "merged", "dataset name of the written manifest"),
)


@dataclass(frozen=True)
class AttributeMap:
    """A parsed attribute map: the unified space (None: what the datasets give) and, per
    dataset, its attribute names renamed (``None``: left out)."""

    attributes: tuple[str, ...] | None
    eval_attributes: tuple[str, ...] | None
    datasets: dict[str, dict[str, str | None]]

    def rename(self, info: ManifestInfo, where: str) -> list[str | None]:
        """Each attribute of ``info`` under its unified name (None: left out)."""
        renames = self.datasets.get(info.dataset, {})
        unknown = sorted(set(renames) - set(info.attributes))
        if unknown:
            raise DatasetError(
                f"attribute map: dataset {info.dataset!r} has no attribute {unknown[0]!r} "
                f"({where}); its attributes: {', '.join(info.attributes)}"
            )
        names = [renames.get(name, name) for name in info.attributes]
        repeated = [
            n for n, count in Counter(n for n in names if n is not None).items() if count > 1
        ]
        if repeated:
            raise DatasetError(
                f"attribute map: two attributes of dataset {info.dataset!r} ({where}) map to "
                f"{repeated[0]!r}; map one of them to another name or to null"
            )
        return names


def read_attribute_map(path: str) -> AttributeMap:
    """Parse and check an attribute map (module doc); an empty path maps nothing."""
    if not path:
        return AttributeMap(None, None, {})
    try:
        raw = yaml.safe_load(storage.read_bytes(path))
    except FileNotFoundError:
        raise DatasetError(f"attribute map not found: {path}") from None
    except yaml.YAMLError as error:
        raise DatasetError(f"attribute map {path} is not valid YAML: {error}") from None
    raw = raw or {}
    if not isinstance(raw, dict) or set(raw) - {"attributes", "eval_attributes", "datasets"}:
        raise DatasetError(
            f"attribute map {path} must be a mapping with the keys attributes, "
            "eval_attributes and datasets"
        )
    datasets = raw.get("datasets") or {}
    if not isinstance(datasets, dict) or not all(
        isinstance(names, dict)
        and all(isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in names.items())
        for names in datasets.values()
    ):
        raise DatasetError(
            f"attribute map {path}: 'datasets' must map each dataset name to "
            "{attribute: unified name or null}"
        )
    attributes = _names(raw.get("attributes"), "attributes", path)
    evaluated = _names(raw.get("eval_attributes"), "eval_attributes", path)
    if attributes is not None and evaluated is not None:
        outside = [name for name in evaluated if name not in attributes]
        if outside:
            raise DatasetError(
                f"attribute map {path}: eval_attributes names {outside[0]!r}, which is not "
                "among its attributes"
            )
    return AttributeMap(attributes, evaluated, {str(k): v for k, v in datasets.items()})


def _names(value: Any, key: str, path: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DatasetError(f"attribute map {path}: {key!r} must be a list of names")
    if len(set(value)) != len(value):
        raise DatasetError(f"attribute map {path}: {key!r} names an attribute twice")
    return tuple(value)


def convert(
    root: str,
    seed: int,
    *,
    manifests: tuple[str, ...],
    attribute_map: str,
    name: str,
) -> Converted:
    """One manifest from ``manifests`` in the space of ``attribute_map`` (module doc); the
    seed is not used (every row keeps its split)."""
    if len(manifests) < 2:
        raise DatasetError("merge takes two or more manifests: --manifests a.parquet,b.parquet")
    mapping = read_attribute_map(attribute_map)
    parts = []
    for path in manifests:
        table, info = read_manifest(path, with_bytes=False)
        if BINARY_COLUMN in table.column_names:
            raise DatasetError(
                f"{path} is packed; merge the manifests it was packed from, then `campar pack` "
                "the merged one"
            )
        parts.append((path, table, info, mapping.rename(info, path)))
    attributes = mapping.attributes or tuple(
        dict.fromkeys(n for *_, names in parts for n in names if n is not None)
    )
    evaluated = mapping.eval_attributes or tuple(
        a
        for a in attributes
        if any(
            a == unified
            for _, _, info, names in parts
            for original, unified in zip(info.attributes, names, strict=True)
            if original in info.eval_attributes
        )
    )
    column = {a: j for j, a in enumerate(attributes)}
    dropped: Counter[str] = Counter()
    tables = []
    for path, table, info, names in parts:
        labels = np.full((table.num_rows, len(attributes)), UNKNOWN, dtype=np.int8)
        source = labels_matrix(table)
        for j, unified in enumerate(names):
            if unified in column:
                labels[:, column[unified]] = source[:, j]
            else:
                dropped[f"attributes of {info.dataset} outside the unified space"] += 1
        rows = manifest_table(
            images=table.column("image").to_pylist(),
            labels=labels,
            splits=table.column("split").to_pylist(),
            identities=[f"{info.dataset}:{i}" for i in table.column("identity").to_pylist()],
            sources=table.column("source").to_pylist(),
        )
        tables.append(rebase_images(rows, manifest_root(path), root))
    return Converted(
        pa.concat_tables(tables), ManifestInfo(name, attributes, evaluated), dict(dropped)
    )
