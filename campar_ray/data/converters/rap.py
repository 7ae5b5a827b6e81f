"""RAPv1 and RAPv2: ``RAP_annotation.mat`` next to a ``RAP_dataset/`` folder of images.

Both files hold one struct, ``RAP_annotation``, with five random partitions (1-based indices)
and labels where 2 marks an uncertain value (see ``uncertain``). All attributes go into the
manifest; the protocol's subset is evaluated.

- RAPv1: ``imagesname``, ``label`` (N x 92), ``attribute_eng`` and ``partion`` (sic; each
  with ``train_index``/``test_index``). The first 51 attributes are evaluated. RAPv1 has no
  validation set, so a seeded ``val_fraction`` of each partition's training images becomes
  ``val``. It has no person ids either: each image is its own identity.
- RAPv2: ``name``, ``data`` (N x 152), ``attribute``, ``selected_attribute`` (the 54
  evaluated, 1-based), ``partition_attribute`` (each with ``train_index``/``val_index``/
  ``test_index``) and ``person_identity`` (negative where a person has no id; such an image
  is its own identity).
"""

from __future__ import annotations

import numpy as np

from campar_ray import storage
from campar_ray.data.converters.common import (
    UNCERTAIN_POLICIES,
    Converted,
    DatasetError,
    Option,
    binary_labels,
    entry,
    indices,
    load_mat,
    matrix,
    require_images,
    strings,
)
from campar_ray.data.manifest import ManifestInfo, manifest_table
from campar_ray.data.split import split_by_identity

RAP1_EVALUATED = 51
UNCERTAIN_HELP = f"how to read label 2 (uncertain): {' or '.join(UNCERTAIN_POLICIES)} (zero: as 0)"

RAP1_OPTIONS = (
    Option("partition", 0, "which of the 5 official partitions (0-4)", int),
    Option("val_fraction", 0.1, "fraction of the training images held out as val", float),
    Option("uncertain", "zero", UNCERTAIN_HELP),
)
RAP2_OPTIONS = (
    Option("partition", 0, "which of the 5 official partitions (0-4)", int),
    Option("uncertain", "zero", UNCERTAIN_HELP),
)


def convert_rap1(
    root: str, seed: int, *, partition: int, val_fraction: float, uncertain: str
) -> Converted:
    """Manifest rows for RAPv1 at ``root``, split by one official partition plus a val carve."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must lie in [0, 1)")
    path = storage.join(root, "RAP_annotation.mat")
    rap = entry(load_mat(path), "RAP_annotation", path)
    where = f"{path}: RAP_annotation"
    names = strings(entry(rap, "imagesname", where), f"{where}.imagesname")
    attributes = strings(entry(rap, "attribute_eng", where), f"{where}.attribute_eng")
    dropped: dict[str, int] = {}
    labels = _labels(rap, "label", names, attributes, where, uncertain, dropped)
    part = _partition(entry(rap, "partion", where), partition, f"{where}.partion")
    train = indices(entry(part, "train_index", where), len(names), f"{where}.partion train_index")
    test = indices(entry(part, "test_index", where), len(names), f"{where}.partion test_index")
    carved = split_by_identity([names[i] for i in train], (1 - val_fraction, val_fraction, 0), seed)
    splits = _splits(
        len(names),
        {"train": train[carved == "train"], "val": train[carved == "val"], "test": test},
        where,
    )
    info = ManifestInfo("rap1", tuple(attributes), tuple(attributes[:RAP1_EVALUATED]))
    return _converted(info, names, labels, splits, names, root, where, dropped)


def convert_rap2(root: str, seed: int, *, partition: int, uncertain: str) -> Converted:
    """Manifest rows for RAPv2 at ``root``, split by one official partition."""
    del seed  # the official partitions are fixed
    path = storage.join(root, "RAP_annotation.mat")
    rap = entry(load_mat(path), "RAP_annotation", path)
    where = f"{path}: RAP_annotation"
    names = strings(entry(rap, "name", where), f"{where}.name")
    attributes = strings(entry(rap, "attribute", where), f"{where}.attribute")
    dropped: dict[str, int] = {}
    labels = _labels(rap, "data", names, attributes, where, uncertain, dropped)
    selected = indices(
        entry(rap, "selected_attribute", where), len(attributes), f"{where}.selected_attribute"
    )
    part = _partition(
        entry(rap, "partition_attribute", where), partition, f"{where}.partition_attribute"
    )
    sets = {
        split: indices(
            entry(part, f"{split}_index", where), len(names), f"{where}.partition {split}_index"
        )
        for split in ("train", "val", "test")
    }
    splits = _splits(len(names), sets, where)
    pids = np.atleast_1d(np.asarray(entry(rap, "person_identity", where))).reshape(-1)
    if len(pids) != len(names):
        raise DatasetError(
            f"{where}.person_identity has {len(pids)} entries for {len(names)} images"
        )
    identities = [
        str(int(pid)) if pid >= 0 else name for pid, name in zip(pids, names, strict=True)
    ]
    info = ManifestInfo("rap2", tuple(attributes), tuple(attributes[i] for i in selected))
    return _converted(info, names, labels, splits, identities, root, where, dropped)


def _labels(
    rap: dict,
    key: str,
    names: list[str],
    attributes: list[str],
    where: str,
    uncertain: str,
    dropped: dict[str, int],
) -> np.ndarray:
    raw = matrix(entry(rap, key, where), len(names), f"{where}.{key}")
    if raw.shape[1] != len(attributes):
        raise DatasetError(
            f"{where}.{key} has {raw.shape[1]} columns for {len(attributes)} attributes"
        )
    return binary_labels(raw, uncertain, f"{where}.{key}", dropped)


def _partition(partitions: object, index: int, where: str) -> dict:
    """One partition struct out of the cell (or struct array) of five."""
    items = list(np.atleast_1d(np.asarray(partitions, dtype=object)).reshape(-1))
    if not 0 <= index < len(items):
        raise ValueError(f"partition={index} is not valid; valid partitions: 0..{len(items) - 1}")
    if not isinstance(items[index], dict):
        raise DatasetError(f"{where}[{index}] is not a struct")
    return items[index]


def _splits(n: int, sets: dict[str, np.ndarray], where: str) -> np.ndarray:
    """Split name per image ('' for images outside the partition); overlaps are errors."""
    splits = np.full(n, "", dtype=object)
    for split, rows in sets.items():
        taken = rows[splits[rows] != ""]
        if taken.size:
            raise DatasetError(
                f"{where}: image index {taken[0] + 1} is in {split} and {splits[taken[0]]}"
            )
        splits[rows] = split
    return splits


def _converted(
    info: ManifestInfo,
    names: list[str],
    labels: np.ndarray,
    splits: np.ndarray,
    identities: list[str],
    root: str,
    where: str,
    dropped: dict[str, int],
) -> Converted:
    """Rows of the images inside the partition, which must all exist under RAP_dataset/."""
    keep = np.flatnonzero(splits != "")
    if len(keep) < len(names):
        dropped["images outside the chosen partition"] = len(names) - len(keep)
    kept = [names[i] for i in keep]
    require_images(kept, storage.join(root, "RAP_dataset"), where)
    table = manifest_table(
        images=[f"RAP_dataset/{name}" for name in kept],
        labels=labels[keep],
        splits=splits[keep].tolist(),
        identities=[identities[i] for i in keep],
        sources=[info.dataset] * len(keep),
    )
    return Converted(table, info, dropped)
