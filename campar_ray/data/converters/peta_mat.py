"""PETA's partitions as the field uses them: Rethinking_of_PAR's ``PETA.mat``.

Papers report PETA on five fixed random partitions of the 19,000 images (train 9,500, val
1,900, test 7,600 each), kept in one MATLAB file with one struct, ``peta``:

- ``data``: 19,000 x 109 numbers per image: its image number (1-based), a global person id,
  the subset number (1-10, :data:`SUBSETS` order), the person id within the subset, then
  the 105 labels in ``attribute``'s order;
- ``attribute``: the 105 attribute names; ``selected_attribute``: the 35 evaluated (1-based);
- ``partion_attribute`` (sic): five structs of 1-based image numbers, ``train``/``val``/``test``.

The file names no image: a row is mapped onto the raw subsets' files by subset and person
(the person's images in file-name order, one per row in image-number order; a person's rows
share the labels of its one ``Label.txt`` line, so any order gives the same labels). Every
row's labels are checked against that line: a subset whose rows mostly disagree is refused
(its numbering or ids do not match these folders), single disagreements are counted. Rows
whose subset or person is absent (a partial copy of PETA) are counted per split and subset.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from campar_ray.data.converters.common import (
    Converted,
    DatasetError,
    entry,
    indices,
    load_mat,
    strings,
)
from campar_ray.data.manifest import SPLITS, ManifestInfo, manifest_table

SUBSETS = (
    "3DPeS", "CAVIAR4REID", "CUHK", "GRID", "i-LID", "MIT", "PRID", "SARC3D", "TownCentre",
    "VIPeR",
)  # fmt: skip
"""Folder of each subset number of ``peta.data`` (1-based), in the order PETA lists them."""
ID_COLUMNS = 4
"""Image number, global person id, subset number, person id within the subset."""


@dataclass(frozen=True)
class PersonImages:
    """What the raw folders hold: per ``(subset folder, person key)``, the image paths in
    file-name order and the person's labels (in ``attributes`` order)."""

    images: dict[tuple[str, str], list[str]]
    labels: dict[tuple[str, str], np.ndarray]
    attributes: tuple[str, ...]


def convert_partition(
    path: str,
    partition: int,
    people: PersonImages,
    *,
    aliases: dict[str, str],
    dataset: str = "peta",
) -> Converted:
    """The manifest rows of ``partition`` (0-4) of the ``PETA.mat`` at ``path``, for the
    images present in ``people``; the absent ones are counted in ``dropped``."""
    where = f"{path}: peta"
    peta = entry(load_mat(path), "peta", path)
    attributes = tuple(
        aliases.get(name, name) for name in strings(entry(peta, "attribute", where), where)
    )
    data = np.asarray(entry(peta, "data", where))
    if data.ndim != 2 or data.shape[1] != ID_COLUMNS + len(attributes) or not len(data):
        raise DatasetError(
            f"{where}.data must have {ID_COLUMNS} id columns and {len(attributes)} label "
            f"columns, got shape {data.shape}"
        )
    selected = indices(
        entry(peta, "selected_attribute", where), len(attributes), f"{where}.selected_attribute"
    )
    splits = _partition_splits(entry(peta, "partion_attribute", where), partition, data, where)
    dropped: Counter[str] = Counter()
    columns = _label_columns(attributes, people.attributes, where)
    rows, images = _match_rows(data, people, dropped)
    labels = data[:, ID_COLUMNS:].astype(np.int8)
    _check_labels(labels, rows, people, columns, dropped)
    for split in SPLITS:
        absent = int(np.sum((splits == split) & (images == "")))
        if absent:
            dropped[f"partition {partition} {split}: images listed but absent"] = absent
    keep = np.flatnonzero((images != "") & (splits != ""))
    subsets = [SUBSETS[int(data[row, 2]) - 1] for row in keep]
    table = manifest_table(
        images=images[keep].tolist(),
        labels=labels[keep],
        splits=splits[keep].tolist(),
        identities=[
            f"{subset}/{int(data[row, 3])}" for subset, row in zip(subsets, keep, strict=True)
        ],
        sources=subsets,
    )
    info = ManifestInfo(dataset, attributes, tuple(attributes[i] for i in selected))
    return Converted(table, info, dict(dropped))


def _partition_splits(partitions: object, index: int, data: np.ndarray, where: str) -> np.ndarray:
    """The split of every row of ``data`` under partition ``index`` ('' outside it)."""
    items = list(np.atleast_1d(np.asarray(partitions, dtype=object)).reshape(-1))
    if not 0 <= index < len(items):
        raise ValueError(f"partition={index} is not valid; valid partitions: 0..{len(items) - 1}")
    part = items[index]
    if not isinstance(part, dict):
        raise DatasetError(f"{where}.partion_attribute[{index}] is not a struct")
    row_of = {int(number): row for row, number in enumerate(data[:, 0])}
    if len(row_of) != len(data):
        raise DatasetError(f"{where}.data repeats an image number")
    splits = np.full(len(data), "", dtype=object)
    for split in SPLITS:
        numbers = indices(
            entry(part, split, f"{where}.partion_attribute[{index}]"),
            int(data[:, 0].max()),
            f"{where}.partion_attribute[{index}].{split}",
        )
        rows = [row_of.get(int(number) + 1) for number in numbers]
        if None in rows:
            missing = int(numbers[rows.index(None)]) + 1
            raise DatasetError(
                f"{where}.partion_attribute[{index}].{split} lists image {missing}, which "
                "data has no row for"
            )
        taken = [row for row in rows if splits[row]]
        if taken:
            raise DatasetError(
                f"{where}.partion_attribute[{index}]: image {int(data[taken[0], 0])} is in "
                f"{split} and {splits[taken[0]]}"
            )
        splits[rows] = split
    return splits


def _label_columns(attributes: tuple[str, ...], raw: tuple[str, ...], where: str) -> np.ndarray:
    """For each ``PETA.mat`` attribute, its column among the raw ``Label.txt`` attributes."""
    position = {name: index for index, name in enumerate(raw)}
    unknown = [name for name in attributes if name not in position]
    if unknown:
        raise DatasetError(f"{where}.attribute names {', '.join(unknown)}, not PETA attributes")
    return np.array([position[name] for name in attributes])


def _match_rows(
    data: np.ndarray, people: PersonImages, dropped: Counter[str]
) -> tuple[list[tuple[str, str] | None], np.ndarray]:
    """Each row's person (None when absent) and image path ('' when absent)."""
    persons: list[tuple[str, str] | None] = [None] * len(data)
    images = np.full(len(data), "", dtype=object)
    used: defaultdict[tuple[str, str], int] = defaultdict(int)
    subsets_seen = {subset for subset, _ in people.images}
    for row in np.argsort(data[:, 0], kind="stable"):
        number = int(data[row, 2])
        if not 1 <= number <= len(SUBSETS):
            raise DatasetError(
                f"PETA.mat row of image {int(data[row, 0])}: subset {number} is not 1-10"
            )
        subset = SUBSETS[number - 1]
        person = (subset, str(int(data[row, 3])))
        files = people.images.get(person, [])
        if used[person] < len(files):
            images[row] = files[used[person]]
            used[person] += 1
            persons[row] = person
        elif subset not in subsets_seen:
            dropped[f"images of absent subset {subset}"] += 1
        else:
            dropped[f"{subset}: images listed in PETA.mat beyond the person's files"] += 1
    unused = sum(len(files) - used[person] for person, files in people.images.items())
    if unused:
        dropped["images in the folders that PETA.mat does not list"] = unused
    return persons, images


def _check_labels(
    labels: np.ndarray,
    persons: list[tuple[str, str] | None],
    people: PersonImages,
    columns: np.ndarray,
    dropped: Counter[str],
) -> None:
    """Every present row against its person's ``Label.txt`` line; refuse a subset whose rows
    mostly disagree (a wrong subset numbering or person ids), count the rest."""
    checked: Counter[str] = Counter()
    differ: Counter[str] = Counter()
    for row, person in enumerate(persons):
        if person is None:
            continue
        checked[person[0]] += 1
        if not np.array_equal(labels[row], people.labels[person][columns]):
            differ[person[0]] += 1
    for subset, count in differ.items():
        if 2 * count > checked[subset]:
            raise DatasetError(
                f"PETA.mat: {count} of the {checked[subset]} rows of subset {subset} disagree "
                "with its Label.txt: the file's subset numbers or person ids do not match "
                "these folders"
            )
        dropped[f"{subset}: rows whose labels differ from Label.txt (PETA.mat's kept)"] = count
