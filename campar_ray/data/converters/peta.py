"""PETA: ``PETA dataset/<subset>/archive/`` folders, each with images and a ``Label.txt``.

Each ``Label.txt`` line is ``<id> <attribute> <attribute> ...``, listing the attributes that
are present. The manifest holds all 105 attributes: the 61 binary ones of PETA's
``ReadMe.txt`` in its order, then the four colour groups (upper body, lower body, hair,
footwear) x 11 colours. The 35 attributes with a name in ReadMe's second column are
evaluated (the usual PETA protocol). Quirks of the real files handled here:

- an ``<id>`` names every image whose file name starts with it before the first ``_``, with
  any zero padding (``1`` -> ``1_...``, ``0053`` -> ``0053_001.jpg``), or one whole file name
  (``0606.png``); images are BMP, PNG or JPEG;
- label files may have Windows line endings or a byte-order mark;
- ``footwearSneakers`` in the labels is ReadMe's ``footwearSneaker``;
- four attributes that ReadMe says were discarded (fewer than 10 images) are dropped and
  counted, as are repeated attributes on one line;
- some label lines name a person with no image (six in TownCentre): they are counted, or
  refused with ``strict=True``. An image without a label line is always an error.

Identity is ``<subset>/<id>``; the split is seeded and person-disjoint (50/10/40 of the images
by default), or with ``mat`` one of the five partitions papers report on (``--mat PETA.mat
--partition N``, :mod:`~campar_ray.data.converters.peta_mat`).
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections import Counter

import numpy as np

from campar_ray import storage
from campar_ray.data.converters.common import Converted, DatasetError, Option, list_files
from campar_ray.data.converters.peta_mat import PersonImages, convert_partition
from campar_ray.data.manifest import ManifestInfo, manifest_table
from campar_ray.data.split import parse_ratios, split_by_identity

IMAGES_DIR = "PETA dataset"
LABEL_FILE = "Label.txt"
IMAGE_EXTENSIONS = (".bmp", ".png", ".jpg", ".jpeg")

BINARY = (
    "accessoryHeadphone", "personalLess15", "personalLess30", "personalLess45",
    "personalLess60", "personalLarger60", "carryingBabyBuggy", "carryingBackpack", "hairBald",
    "footwearBoots", "lowerBodyCapri", "carryingOther", "carryingShoppingTro",
    "carryingUmbrella", "lowerBodyCasual", "upperBodyCasual", "personalFemale",
    "carryingFolder", "lowerBodyFormal", "upperBodyFormal", "accessoryHairBand",
    "accessoryHat", "lowerBodyHotPants", "upperBodyJacket", "lowerBodyJeans",
    "accessoryKerchief", "footwearLeatherShoes", "upperBodyLogo", "hairLong",
    "lowerBodyLongSkirt", "upperBodyLongSleeve", "lowerBodyPlaid", "lowerBodyThinStripes",
    "carryingLuggageCase", "personalMale", "carryingMessengerBag", "accessoryMuffler",
    "accessoryNothing", "carryingNothing", "upperBodyNoSleeve", "upperBodyPlaid",
    "carryingPlasticBags", "footwearSandals", "footwearShoes", "hairShort", "lowerBodyShorts",
    "upperBodyShortSleeve", "lowerBodyShortSkirt", "footwearSneaker", "footwearStocking",
    "upperBodyThinStripes", "upperBodySuit", "carryingSuitcase", "lowerBodySuits",
    "accessorySunglasses", "upperBodySweater", "upperBodyThickStripes", "lowerBodyTrousers",
    "upperBodyTshirt", "upperBodyOther", "upperBodyVNeck",
)  # fmt: skip
COLOURS = (
    "Black", "Blue", "Brown", "Green", "Grey", "Orange", "Pink", "Purple", "Red", "White", "Yellow",
)  # fmt: skip
COLOURED = ("upperBody", "lowerBody", "hair", "footwear")
ATTRIBUTES = BINARY + tuple(part + colour for part in COLOURED for colour in COLOURS)
EVALUATED = (
    "personalLess30", "personalLess45", "personalLess60", "personalLarger60",
    "carryingBackpack", "carryingOther", "lowerBodyCasual", "upperBodyCasual",
    "lowerBodyFormal", "upperBodyFormal", "accessoryHat", "upperBodyJacket", "lowerBodyJeans",
    "footwearLeatherShoes", "upperBodyLogo", "hairLong", "personalMale",
    "carryingMessengerBag", "accessoryMuffler", "accessoryNothing", "carryingNothing",
    "upperBodyPlaid", "carryingPlasticBags", "footwearSandals", "footwearShoes",
    "lowerBodyShorts", "upperBodyShortSleeve", "lowerBodyShortSkirt", "footwearSneaker",
    "upperBodyThinStripes", "accessorySunglasses", "lowerBodyTrousers", "upperBodyTshirt",
    "upperBodyOther", "upperBodyVNeck",
)  # fmt: skip
ALIASES = {"footwearSneakers": "footwearSneaker"}
DISCARDED = ("accessoryFaceMask", "lowerBodyLogo", "accessoryShawl", "lowerBodyThickStripes")

OPTIONS = (
    Option(
        "ratios",
        (0.5, 0.1, 0.4),
        "train,val,test fractions of the images (by person)",
        parse_ratios,
    ),
    Option(
        "strict",
        False,
        "refuse label lines that name no image",
        lambda s: s.lower() in ("1", "true", "yes"),
    ),
    Option(
        "mat",
        "",
        "peta: a Rethinking_of_PAR PETA.mat (under --root, or a path): its partitions instead "
        "of the person split",
    ),
    Option("partition", 0, "which of the 5 official partitions (0-4)", int),
)


def convert(
    root: str,
    seed: int,
    *,
    ratios: tuple[float, float, float],
    strict: bool,
    mat: str = "",
    partition: int = 0,
) -> Converted:
    """Manifest rows for every subset found under ``<root>/PETA dataset``: split by person
    (``ratios``, ``seed``), or as partition ``partition`` of the ``PETA.mat`` at ``mat``
    (:mod:`~campar_ray.data.converters.peta_mat`)."""
    subsets_dir = storage.join(root, IMAGES_DIR)
    subsets = sorted(
        {name.split("/")[0] for name in list_files(subsets_dir, recursive=True) if "/" in name}
    )
    if not subsets:
        raise DatasetError(f"no PETA subsets (<subset>/archive/{LABEL_FILE}) under {subsets_dir}")
    dropped: Counter[str] = Counter()
    images: list[str] = []
    labels: list[np.ndarray] = []
    identities: list[str] = []
    sources: list[str] = []
    for subset in subsets:
        folder = storage.join(subsets_dir, subset, "archive")
        files, ids, subset_labels = _read_subset(folder, subset, strict, dropped)
        images += [posixpath.join(IMAGES_DIR, subset, "archive", name) for name in files]
        labels.append(subset_labels)
        identities += [f"{subset}/{label_id}" for label_id in ids]
        sources += [subset] * len(files)
    if mat:
        people = _people(images, np.concatenate(labels), identities)
        path = mat if storage.is_uri(mat) or posixpath.isabs(mat) else storage.join(root, mat)
        converted = convert_partition(path, partition, people, aliases=ALIASES)
        return dataclasses.replace(converted, dropped={**dropped, **converted.dropped})
    table = manifest_table(
        images=images,
        labels=np.concatenate(labels),
        splits=split_by_identity(identities, parse_ratios(ratios), seed).tolist(),
        identities=identities,
        sources=sources,
    )
    return Converted(table, ManifestInfo("peta", ATTRIBUTES, EVALUATED), dict(dropped))


def _people(images: list[str], labels: np.ndarray, identities: list[str]) -> PersonImages:
    """The images (in file-name order) and labels of each person, keyed as ``PETA.mat``
    names them: the subset folder and the id without zero padding."""
    grouped: dict[tuple[str, str], list[str]] = {}
    person_labels: dict[tuple[str, str], np.ndarray] = {}
    for image, row, identity in zip(images, labels, identities, strict=True):
        subset, label_id = identity.split("/", 1)
        key = (subset, _id_key(label_id))
        grouped.setdefault(key, []).append(image)
        person_labels[key] = row
    return PersonImages(grouped, person_labels, ATTRIBUTES)


def _read_subset(
    folder: str, subset: str, strict: bool, dropped: Counter[str]
) -> tuple[list[str], list[str], np.ndarray]:
    """(image file names, label id per image, label rows) of one subset, sorted by file name."""
    files = list_files(folder)
    if LABEL_FILE not in files:
        raise DatasetError(f"PETA subset {subset!r} has no {LABEL_FILE} in {folder}")
    images = sorted(name for name in files if name.lower().endswith(IMAGE_EXTENSIONS))
    ignored = len(files) - len(images) - 1
    if ignored:
        dropped[f"{subset}: files that are not images, ignored"] += ignored
    lines = _parse_labels(storage.read_bytes(storage.join(folder, LABEL_FILE)), subset, dropped)
    owner = _match_images(images, [label_id for label_id, _ in lines], subset, strict, dropped)
    rows = np.zeros((len(lines), len(ATTRIBUTES)), dtype=np.int8)
    for line, (_, columns) in enumerate(lines):
        rows[line, columns] = 1
    return images, [lines[i][0] for i in owner], rows[owner]


def _parse_labels(data: bytes, subset: str, dropped: Counter[str]) -> list[tuple[str, list[int]]]:
    """``(id, attribute columns)`` per non-empty line, after aliases and discarded names."""
    column = {name: index for index, name in enumerate(ATTRIBUTES)}
    parsed = []
    for number, line in enumerate(data.decode("utf-8-sig").splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        label_id, names = tokens[0], [ALIASES.get(token, token) for token in tokens[1:]]
        kept = []
        for name in dict.fromkeys(names):
            if name in DISCARDED:
                dropped[f"label lines with {name}, an attribute ReadMe discards"] += 1
            elif name not in column:
                raise DatasetError(
                    f"PETA subset {subset!r}, {LABEL_FILE} line {number} (id {label_id!r}): "
                    f"{name!r} is not a PETA attribute"
                )
            else:
                kept.append(column[name])
        if len(names) != len(set(names)):
            dropped["attributes repeated on one label line"] += len(names) - len(set(names))
        parsed.append((label_id, kept))
    return parsed


def _id_key(name: str) -> str:
    """What an id or a file-name prefix identifies: digits compare without zero padding."""
    stem = (
        name[: -len(name.rsplit(".", 1)[1]) - 1]
        if name.lower().endswith(IMAGE_EXTENSIONS)
        else name
    )
    prefix = stem.split("_")[0]
    return str(int(prefix)) if prefix.isdigit() else prefix


def _match_images(
    images: list[str], ids: list[str], subset: str, strict: bool, dropped: Counter[str]
) -> list[int]:
    """Index of the label line that names each image; every image must have exactly one."""
    by_key: dict[str, list[str]] = {}
    for name in images:
        by_key.setdefault(_id_key(name), []).append(name)
    present = set(images)
    owner: dict[str, int] = {}
    orphans = []
    seen: dict[str, int] = {}
    for line, label_id in enumerate(ids):
        key = _id_key(label_id)
        if key in seen:
            raise DatasetError(
                f"PETA subset {subset!r}: ids {ids[seen[key]]!r} and {label_id!r} in {LABEL_FILE} "
                "name the same person"
            )
        seen[key] = line
        named = [label_id] if label_id in present else by_key.get(key, [])
        if not named:
            orphans.append(label_id)
        for name in named:
            if name in owner:
                raise DatasetError(
                    f"PETA subset {subset!r}: image {name!r} is named by ids "
                    f"{ids[owner[name]]!r} and {label_id!r}"
                )
            owner[name] = line
    unlabelled = [name for name in images if name not in owner]
    if unlabelled:
        shown = ", ".join(unlabelled[:5]) + (", ..." if len(unlabelled) > 5 else "")
        raise DatasetError(
            f"PETA subset {subset!r}: {len(unlabelled)} images have no line in {LABEL_FILE}: "
            + shown
        )
    if orphans:
        message = f"PETA subset {subset!r}: label lines with no image (ids {', '.join(orphans)})"
        if strict:
            raise DatasetError(message + "; strict=True refuses them")
        dropped[message] += len(orphans)
    return [owner[name] for name in images]
