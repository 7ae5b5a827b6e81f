"""PA100K: ``annotation.mat`` next to a ``data/`` folder of images.

``annotation.mat`` holds the official split as ``{train,val,test}_images_name`` (cell arrays
of file names) with ``{train,val,test}_label`` (N x 26, 0/1) and ``attributes`` (26 names).
All 26 attributes are evaluated. The split is fixed, so the seed is not used. PA100K has no
person ids: each image is its own identity.
"""

from __future__ import annotations

import numpy as np

from campar_ray import storage
from campar_ray.data.converters.common import (
    Converted,
    DatasetError,
    Option,
    entry,
    load_mat,
    matrix,
    require_images,
    strings,
)
from campar_ray.data.manifest import SPLITS, ManifestInfo, manifest_table

OPTIONS: tuple[Option, ...] = ()


def convert(root: str, seed: int) -> Converted:
    """Manifest rows for PA100K at ``root`` in its official train/val/test split."""
    del seed  # the official split is fixed
    path = storage.join(root, "annotation.mat")
    mat = load_mat(path)
    attributes = strings(entry(mat, "attributes", path), f"{path}: attributes")
    names: list[str] = []
    labels: list[np.ndarray] = []
    splits: list[str] = []
    for split in SPLITS:
        split_names = strings(
            entry(mat, f"{split}_images_name", path), f"{path}: {split}_images_name"
        )
        where = f"{path}: {split}_label"
        split_labels = matrix(entry(mat, f"{split}_label", path), len(split_names), where)
        if split_labels.shape[1] != len(attributes):
            raise DatasetError(
                f"{where} has {split_labels.shape[1]} columns for {len(attributes)} attributes"
            )
        names += split_names
        labels.append(split_labels)
        splits += [split] * len(split_names)
    require_images(names, storage.join(root, "data"), path)
    table = manifest_table(
        images=[f"data/{name}" for name in names],
        labels=np.concatenate(labels),
        splits=splits,
        identities=names,
        sources=["pa100k"] * len(names),
    )
    info = ManifestInfo("pa100k", tuple(attributes), tuple(attributes))
    return Converted(table, info)
