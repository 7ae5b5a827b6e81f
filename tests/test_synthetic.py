"""The synthetic data set: deterministic, person-disjoint, correlated like real data, learnable."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from campar_ray.data import (
    decode_image,
    generate_synthetic,
    labels_matrix,
    load_image_bytes,
    read_manifest,
)
from campar_ray.data.converters import prepare
from campar_ray.data.synthetic import ATTRIBUTES, EVAL_ATTRIBUTES

SIZE = (64, 32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """300 small images: enough for the statistics below, about a second to write."""
    path = generate_synthetic(str(tmp_path_factory.mktemp("syn")), n=300, size=SIZE, seed=0)
    table, info = read_manifest(path)
    return table, info, labels_matrix(table)


def column(table, name):
    return np.array(table.column(name).to_pylist())


def test_same_seed_same_bytes(tmp_path):
    first = generate_synthetic(str(tmp_path / "a"), n=12, size=SIZE, seed=7)
    second = generate_synthetic(str(tmp_path / "b"), n=12, size=SIZE, seed=7)
    generate_synthetic(str(tmp_path / "c"), n=12, size=SIZE, seed=8)
    (a, info_a), (b, _) = (read_manifest(p) for p in (first, second))
    assert a.equals(b)
    images = a.column("image").to_pylist()
    assert all(
        (tmp_path / "a" / i).read_bytes() == (tmp_path / "b" / i).read_bytes() for i in images
    )
    assert any(
        (tmp_path / "a" / i).read_bytes() != (tmp_path / "c" / i).read_bytes() for i in images
    )
    assert info_a.attributes == ATTRIBUTES
    assert info_a.eval_attributes == EVAL_ATTRIBUTES


def test_rows_and_images(dataset):
    table, info, _ = dataset
    assert table.num_rows == 300
    assert 12 <= len(ATTRIBUTES) <= 20
    assert set(EVAL_ATTRIBUTES) < set(ATTRIBUTES)
    pixels = decode_image(load_image_bytes(table.column("image")[0].as_py(), info.root))
    assert pixels.shape == (*SIZE, 3)


def test_people_have_several_images_and_one_split(dataset):
    table, _, labels = dataset
    identity, split = column(table, "identity"), column(table, "split")
    people = np.unique(identity)
    assert 40 <= len(people) <= 100  # 3 to 7 images each
    for person in people:
        rows = identity == person
        assert len(set(split[rows])) == 1
        assert (labels[rows] == labels[rows][0]).all()
    fractions = {s: np.mean(split == s) for s in ("train", "val", "test")}
    assert fractions["train"] == pytest.approx(0.6, abs=0.06)
    assert fractions["val"] == pytest.approx(0.2, abs=0.06)


def test_attributes_correlate_like_real_ones(dataset):
    _, _, labels = dataset
    a = {name: labels[:, index].astype(bool) for index, name in enumerate(ATTRIBUTES)}
    assert labels.mean(0).min() > 0.05 and labels.mean(0).max() < 0.95  # every attribute varies
    assert not (a["lower_skirt"] & ~a["female"]).any()
    assert not (a["upper_formal"] & ~a["upper_long_sleeve"]).any()
    assert (
        a["lower_skirt"].astype(int) + a["lower_jeans"] + a["lower_shorts"] + a["lower_formal"] <= 1
    ).all()
    assert a["long_hair"][a["female"]].mean() > 0.5 > a["long_hair"][~a["female"]].mean()
    assert (
        a["lower_formal"][a["upper_formal"]].mean()
        > 0.6
        > a["lower_formal"][~a["upper_formal"]].mean()
    )
    assert a["backpack"][~a["upper_formal"]].mean() > 3 * a["backpack"][a["upper_formal"]].mean()


def test_attributes_are_visible(dataset):
    """Even a linear model on coarse colour cells finds the body-region attributes in unseen
    people: the labels live in the pixels, not only in the person id."""
    table, info, labels = dataset
    pixels = np.stack(
        [
            decode_image(load_image_bytes(image, info.root))
            for image in table.column("image").to_pylist()
        ]
    ).astype(np.float32)
    cells = (
        pixels.reshape(len(pixels), 16, 4, 8, 4, 3).mean(axis=(2, 4)).reshape(len(pixels), -1) / 255
    )
    split = column(table, "split")
    train, test = split != "test", split == "test"
    for name in ("upper_formal", "lower_jeans", "shoes_white"):
        y = labels[:, ATTRIBUTES.index(name)]
        predicted = (
            LogisticRegression(max_iter=500).fit(cells[train], y[train]).predict(cells[test])
        )
        truth = y[test]
        balanced = ((predicted[truth == 1] == 1).mean() + (predicted[truth == 0] == 0).mean()) / 2
        assert balanced > 0.75, name


def test_prepare_synthetic_elsewhere(tmp_path):
    out = str(tmp_path / "out" / "m.parquet")
    report = prepare("synthetic", str(tmp_path / "data"), out, seed=1, n="10", size="32x16")
    assert report.rows == 10
    table, info = read_manifest(report.path)
    image = table.column("image")[0].as_py()
    assert image.startswith(str(tmp_path / "data" / "images"))
    assert decode_image(load_image_bytes(image, info.root)).shape == (32, 16, 3)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="size 'big' must be HEIGHTxWIDTH"):
        prepare("synthetic", str(tmp_path), str(tmp_path / "m.parquet"), size="big")
    with pytest.raises(
        ValueError, match=r"size=\(8, 8\): give \(height, width\), each at least 16"
    ):
        generate_synthetic(str(tmp_path), n=4, size=(8, 8))


def test_prepare_synthetic_next_to_the_manifest(tmp_path):
    report = prepare("synthetic", "", str(tmp_path / "m.parquet"), n=6, size=(32, 16))
    table, _ = read_manifest(report.path)
    assert table.column("image")[0].as_py() == "images/p00000_0.png"
    assert (tmp_path / "images" / "p00000_0.png").is_file()
