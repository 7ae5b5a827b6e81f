"""PETA: the real files (12,039 images) and a small fixture with every id/format quirk."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from campar_ray.data import labels_matrix, read_manifest
from campar_ray.data.converters import DatasetError, prepare
from campar_ray.data.converters.peta import ATTRIBUTES, EVALUATED

SUBSETS = {"3DPeS": 1012, "CAVIAR4REID": 1220, "GRID": 1275, "MIT": 888, "SARC3D": 200,
           "TownCentre": 6967, "i-LID": 477}  # fmt: skip


def readme_attributes(root: Path) -> tuple[list[str], list[str]]:
    """The 61 binary attribute names of ReadMe.txt, in order, and those with a paper name."""
    text = (root / "ReadMe.txt").read_text(encoding="latin-1")
    rows = re.findall(r"^\s+\d+\t(\w+)\t*([^\r\n]*)$", text, flags=re.MULTILINE)
    return [name for name, _ in rows], [name for name, paper in rows if paper.strip()]


def expected_counts(root: Path) -> tuple[int, Counter]:
    """Images and positive counts per attribute, straight from the label files: an id names
    the images whose file name starts with it (as a number) before the first '_'."""
    images, positives = 0, Counter()
    for folder in sorted((root / "PETA dataset").iterdir()):
        archive = folder / "archive"
        prefixes = Counter(
            int(p.name.split("_")[0]) for p in archive.iterdir() if p.name != "Label.txt"
        )
        images += sum(prefixes.values())
        for line in (archive / "Label.txt").read_text().splitlines():
            label_id, *names = line.split()
            for name in set(names):
                positives[name.replace("footwearSneakers", "footwearSneaker")] += prefixes[
                    int(label_id)
                ]
    return images, positives


@pytest.mark.peta
def test_real_peta(peta_root, tmp_path):
    report = prepare("peta", str(peta_root), str(tmp_path / "peta.parquet"))
    table, info = read_manifest(report.path)
    images, positives = expected_counts(peta_root)
    assert table.num_rows == report.rows == images == 12039

    binary, evaluated = readme_attributes(peta_root)
    assert len(binary) == 61 and len(evaluated) == 35
    assert list(info.attributes[:61]) == binary
    assert len(info.attributes) == 105
    assert sorted(info.eval_attributes) == sorted(evaluated)

    counts = labels_matrix(table).sum(axis=0)
    for index, name in enumerate(info.attributes):
        assert counts[index] == positives[name], name
    assert positives["lowerBodyLogo"] > 0 and "lowerBodyLogo" not in info.attributes
    assert report.dropped["label lines with accessoryShawl, an attribute ReadMe discards"] == 3
    assert report.dropped["label lines with lowerBodyLogo, an attribute ReadMe discards"] == 4
    assert sum(v for k, v in report.dropped.items() if "no image" in k) == 6  # TownCentre

    sources = Counter(table.column("source").to_pylist())
    assert sources == SUBSETS
    owner: dict[str, str] = {}
    for identity, split in zip(
        table.column("identity").to_pylist(), table.column("split").to_pylist(), strict=True
    ):
        assert owner.setdefault(identity, split) == split, identity
    assert report.splits["train"] / images == pytest.approx(0.5, abs=0.03)
    assert report.splits["test"] / images == pytest.approx(0.4, abs=0.03)


# --- a fixture with every quirk ---------------------------------------------------------------


def peta_fixture(
    tmp_path: Path, label_lines: dict[str, str], files: dict[str, list[str]], crlf=False
) -> Path:
    root = tmp_path / "peta"
    for subset, names in files.items():
        archive = root / "PETA dataset" / subset / "archive"
        archive.mkdir(parents=True)
        for name in names:
            fmt = {"bmp": "BMP", "png": "PNG"}.get(name.rsplit(".", 1)[1].lower(), "JPEG")
            Image.new("RGB", (8, 16), (30, 60, 90)).save(archive / name, format=fmt)
        text = label_lines[subset].replace("\n", "\r\n") if crlf else label_lines[subset]
        (archive / "Label.txt").write_bytes(text.encode())
    return root


QUIRKS = {
    "padded": "1 personalMale hairShort upperBodyBlack\n0053 personalFemale footwearSneakers\n"
              "7 personalMale accessoryShawl lowerBodyLogo hairLong hairLong\n",
    "whole": "0606.png personalFemale upperBodyRed\n0607.png personalMale\n",
}  # fmt: skip
QUIRK_FILES = {
    "padded": ["1_a.bmp", "1_b.jpeg", "0053_001.jpg", "0053_002.JPG", "07_x.png", "007_y.png"],
    "whole": ["0606.png", "0607.png"],
}


@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
def test_ids_padding_whole_names_and_quirks(tmp_path, crlf):
    root = peta_fixture(tmp_path, QUIRKS, QUIRK_FILES, crlf=crlf)
    report = prepare("peta", str(root), str(root / "m.parquet"), ratios="1,0,0")
    table, info = read_manifest(report.path)
    assert report.rows == 8
    labels = dict(zip(table.column("image").to_pylist(), labels_matrix(table), strict=True))
    identity = dict(
        zip(table.column("image").to_pylist(), table.column("identity").to_pylist(), strict=True)
    )

    def present(image):
        return {info.attributes[i] for i in np.flatnonzero(labels[f"PETA dataset/{image}"])}

    assert present("padded/archive/1_b.jpeg") == {"personalMale", "hairShort", "upperBodyBlack"}
    assert present("padded/archive/0053_002.JPG") == {"personalFemale", "footwearSneaker"}
    assert present("padded/archive/007_y.png") == {"personalMale", "hairLong"}
    assert present("whole/archive/0606.png") == {"personalFemale", "upperBodyRed"}
    assert present("whole/archive/0607.png") == {"personalMale"}
    assert identity["PETA dataset/padded/archive/07_x.png"] == "padded/7"
    assert identity["PETA dataset/whole/archive/0606.png"] == "whole/0606.png"
    assert report.dropped == {
        "label lines with accessoryShawl, an attribute ReadMe discards": 1,
        "label lines with lowerBodyLogo, an attribute ReadMe discards": 1,
        "attributes repeated on one label line": 1,
    }
    assert set(EVALUATED) <= set(ATTRIBUTES)


def test_label_line_without_image(tmp_path):
    lines = {"s": "1 personalMale\n2 personalFemale\n"}
    root = peta_fixture(tmp_path, lines, {"s": ["1_a.jpg", "1_b.jpg"]})
    report = prepare("peta", str(root), str(root / "m.parquet"), ratios="1,0,0")
    assert report.rows == 2
    assert report.dropped == {"PETA subset 's': label lines with no image (ids 2)": 1}
    with pytest.raises(
        DatasetError, match=r"subset 's': label lines with no image \(ids 2\); strict"
    ):
        prepare("peta", str(root), str(root / "m.parquet"), strict="true")


LABEL_ERRORS = {
    "image-without-label": ("1 personalMale\n", ["1_a.jpg", "2_b.jpg"],
                            r"subset 's': 1 images have no line in Label.txt: 2_b.jpg"),
    "unknown-attribute": ("1 personalMale flying\n", ["1_a.jpg"],
                          r"subset 's', Label.txt line 1 \(id '1'\): 'flying' is not"),
    "same-person-twice": ("1 personalMale\n01 personalFemale\n", ["1_a.jpg"],
                          r"ids '1' and '01' in Label.txt name the same"),
}  # fmt: skip


@pytest.mark.parametrize(("lines", "files", "expected"), LABEL_ERRORS.values(), ids=LABEL_ERRORS)
def test_label_errors(tmp_path, lines, files, expected):
    root = peta_fixture(tmp_path, {"s": lines}, {"s": files})
    with pytest.raises(DatasetError, match=expected):
        prepare("peta", str(root), str(root / "m.parquet"), ratios="1,0,0")


def test_missing_label_file(tmp_path):
    root = peta_fixture(tmp_path, {"s": ""}, {"s": ["1_a.jpg"]})
    (root / "PETA dataset" / "s" / "archive" / "Label.txt").unlink()
    with pytest.raises(DatasetError, match=r"PETA subset 's' has no Label\.txt"):
        prepare("peta", str(root), str(root / "m.parquet"))
