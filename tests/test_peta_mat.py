"""PETA's field partitions: a ``PETA.mat`` in Rethinking_of_PAR's layout over the real PETA
folders (7 of the 10 subsets are present in ../shared; the file is built here with
``scipy.io.savemat``, since the original is not redistributed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io

from campar_ray.data import labels_matrix, read_manifest
from campar_ray.data.converters import DatasetError, prepare
from campar_ray.data.converters.peta import ATTRIBUTES, EVALUATED
from campar_ray.data.converters.peta_mat import SUBSETS

pytestmark = pytest.mark.peta

ABSENT = {"CUHK": 4563, "PRID": 1134, "VIPeR": 1264}
"""The subsets ../shared lacks, with their image counts in the full PETA."""
SIZES = (9500, 1900, 7600)


def label_line(root: Path, subset: str, person: int) -> np.ndarray:
    """The person's labels (ATTRIBUTES order) read straight from the subset's Label.txt."""
    text = (root / "PETA dataset" / subset / "archive" / "Label.txt").read_text("utf-8-sig")
    for line in text.splitlines():
        label_id, *names = line.split() or [""]
        if label_id and int(label_id) == person:
            row = np.zeros(len(ATTRIBUTES), dtype=np.int8)
            for name in names:
                name = name.replace("footwearSneakers", "footwearSneaker")
                if name in ATTRIBUTES:
                    row[ATTRIBUTES.index(name)] = 1
            return row
    raise KeyError(person)


def write_peta_mat(path: Path, people: list[tuple[str, int, np.ndarray]], partitions) -> None:
    """``people``: one (subset, person id, labels) per image, numbered 1.. in this order;
    ``partitions``: (train, val, test) image numbers, 1-based."""
    data = np.array(
        [
            [number, number, SUBSETS.index(subset) + 1, person, *labels]
            for number, (subset, person, labels) in enumerate(people, start=1)
        ],
        dtype=np.float64,
    )
    cells = np.empty(len(partitions), dtype=object)
    for index, (train, val, test) in enumerate(partitions):
        cells[index] = {
            "train": np.asarray(train, float).reshape(-1, 1),
            "val": np.asarray(val, float).reshape(-1, 1),
            "test": np.asarray(test, float).reshape(-1, 1),
        }
    peta = {
        "data": data,
        "attribute": np.array(ATTRIBUTES, dtype=object).reshape(-1, 1),
        "selected_attribute": np.array([ATTRIBUTES.index(a) + 1 for a in EVALUATED], float),
        "partion_attribute": cells.reshape(-1, 1),
    }
    scipy.io.savemat(path, {"peta": peta})


def test_rows_map_onto_the_subsets_files_and_the_absent_are_counted(peta_root, tmp_path):
    three = label_line(peta_root, "SARC3D", 30)
    people = [
        ("SARC3D", 30, three),  # SARC3D person 030: 4 images, two of them listed
        ("3DPeS", 1, label_line(peta_root, "3DPeS", 1)),
        ("SARC3D", 30, three),
        ("CUHK", 5, three),  # an absent subset
        ("GRID", 1, label_line(peta_root, "GRID", 1)),
    ]
    mat = tmp_path / "PETA.mat"
    write_peta_mat(mat, people, [([1, 2], [3], [4, 5])] * 5)
    out = tmp_path / "peta.parquet"
    report = prepare("peta", str(peta_root), str(out), mat=str(mat), partition="3")
    table, info = read_manifest(str(out))
    assert info.attributes == ATTRIBUTES and info.eval_attributes == EVALUATED
    images = table.column("image").to_pylist()
    sarc = sorted(p.name for p in (peta_root / "PETA dataset/SARC3D/archive").glob("030_*"))
    assert [Path(image).name for image in images[:3:2]] == sarc[:2]  # file-name order
    assert images[1].endswith("PETA dataset/3DPeS/archive/" + _first(peta_root, "3DPeS", "1_"))
    assert table.column("split").to_pylist() == ["train", "train", "val", "test"]
    assert table.column("identity").to_pylist()[:2] == ["SARC3D/30", "3DPeS/1"]
    np.testing.assert_array_equal(
        labels_matrix(table), np.array([p[2] for p in people if p[0] != "CUHK"])
    )
    assert report.dropped["images of absent subset CUHK"] == 1
    assert report.dropped["partition 3 test: images listed but absent"] == 1
    assert report.dropped["images in the folders that PETA.mat does not list"] == 12039 - 4


def _first(root: Path, subset: str, prefix: str) -> str:
    return sorted(p.name for p in (root / "PETA dataset" / subset / "archive").glob(prefix + "*"))[
        0
    ]


def test_labels_that_disagree_with_label_txt_are_counted_or_refused(peta_root, tmp_path):
    right, wrong = label_line(peta_root, "3DPeS", 1), label_line(peta_root, "3DPeS", 2)
    mat = tmp_path / "PETA.mat"
    people = [("3DPeS", 1, right), ("3DPeS", 1, wrong), ("3DPeS", 1, right)]
    write_peta_mat(mat, people, [([1, 2, 3], [], [])])
    report = prepare("peta", str(peta_root), str(tmp_path / "a.parquet"), mat=str(mat))
    assert report.dropped["3DPeS: rows whose labels differ from Label.txt (PETA.mat's kept)"] == 1
    write_peta_mat(mat, [("3DPeS", 1, wrong), ("3DPeS", 1, wrong)], [([1, 2], [], [])])
    with pytest.raises(DatasetError, match="2 of the 2 rows of subset 3DPeS disagree"):
        prepare("peta", str(peta_root), str(tmp_path / "b.parquet"), mat=str(mat))
    with pytest.raises(ValueError, match=r"partition=5 is not valid; valid partitions: 0..0"):
        prepare("peta", str(peta_root), str(tmp_path / "c.parquet"), mat=str(mat), partition="5")


def test_partition_0_has_the_fields_proportions_over_the_present_images(peta_root, tmp_path):
    """A full-size file: one row per real image of the 7 present subsets (persons and labels
    from the person-split manifest), the 6,961 images of the absent three, five random
    9,500 / 1,900 / 7,600 partitions."""
    source = tmp_path / "source.parquet"
    prepare("peta", str(peta_root), str(source))
    table, _ = read_manifest(str(source))
    people = [
        (identity.split("/")[0], int(identity.split("/")[1]), labels)
        for identity, labels in zip(
            table.column("identity").to_pylist(), labels_matrix(table), strict=True
        )
    ]
    blank = np.zeros(len(ATTRIBUTES), dtype=np.int8)
    people += [(subset, k // 2, blank) for subset, count in ABSENT.items() for k in range(count)]
    assert len(people) == 19000
    rng = np.random.default_rng(0)
    partitions = []
    for _ in range(5):
        order = rng.permutation(19000) + 1
        partitions.append(np.split(order, np.cumsum(SIZES)[:2]))
    mat = tmp_path / "PETA.mat"
    write_peta_mat(mat, people, partitions)
    out = tmp_path / "partition0.parquet"
    report = prepare("peta", str(peta_root), str(out), mat=str(mat))
    present = np.array([subset not in ABSENT for subset, _, _ in people])
    for split, listed in zip(("train", "val", "test"), partitions[0], strict=True):
        kept = int(present[listed - 1].sum())
        assert report.splits[split] == kept
        assert (
            report.dropped[f"partition 0 {split}: images listed but absent"] == len(listed) - kept
        )
    assert sum(report.splits.values()) == 12039
    assert {
        split: report.splits[split]
        + report.dropped[f"partition 0 {split}: images listed but absent"]
        for split in report.splits
    } == dict(zip(("train", "val", "test"), SIZES, strict=True))
    assert "images in the folders that PETA.mat does not list" not in report.dropped
