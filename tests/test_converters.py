"""Converters on small fixtures written in the real files' structure, plus prepare/verify/pack."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import scipy.io
from PIL import Image

from campar_ray.data import ManifestInfo, labels_matrix, read_manifest, verify_manifest
from campar_ray.data.converters import FORMATS, DatasetError, prepare
from campar_ray.data.images import decode_image, load_image_bytes
from campar_ray.data.split import parse_ratios, split_by_identity


def write_images(folder, names, size=(8, 16)):
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        Image.new("RGB", size, (index * 9 % 256, 80, 160)).save(folder / name)


def cells(values) -> np.ndarray:
    """A MATLAB N x 1 cell array of strings."""
    return np.array(list(values), dtype=object).reshape(-1, 1)


def structs(items) -> np.ndarray:
    """A MATLAB N x 1 cell array of structs."""
    array = np.empty((len(items), 1), dtype=object)
    for index, item in enumerate(items):
        array[index, 0] = item
    return array


def row(indices) -> np.ndarray:
    """1-based MATLAB index row vector."""
    return np.asarray(indices, dtype=np.float64).reshape(1, -1) + 1


# --- PA100K ----------------------------------------------------------------------------------


@pytest.fixture
def pa100k_root(tmp_path):
    root = tmp_path / "PA100k"
    names = {"train": ["000001.jpg", "000002.jpg", "000003.jpg"], "val": ["000004.jpg"],
             "test": ["000005.jpg", "000006.jpg"]}  # fmt: skip
    rng = np.random.default_rng(0)
    labels = {split: rng.integers(0, 2, (len(n), 4)).astype(np.uint8) for split, n in names.items()}
    mat = {f"{split}_images_name": cells(n) for split, n in names.items()}
    mat |= {f"{split}_label": labels[split] for split in names}
    mat["attributes"] = cells(["Female", "Hat", "Glasses", "HandBag"])
    root.mkdir()
    scipy.io.savemat(root / "annotation.mat", mat)
    write_images(root / "data", [name for split in names.values() for name in split])
    return root, names, labels


def test_pa100k(pa100k_root, tmp_path):
    root, _, labels = pa100k_root
    report = prepare("pa100k", str(root), str(root / "manifest.parquet"))
    assert report.rows == 6
    assert report.splits == {"train": 3, "val": 1, "test": 2}
    table, info = read_manifest(report.path)
    assert info.attributes == ("Female", "Hat", "Glasses", "HandBag") == info.eval_attributes
    assert table.column("image").to_pylist()[0] == "data/000001.jpg"  # relative: inside root
    expected = np.concatenate([labels["train"], labels["val"], labels["test"]])
    np.testing.assert_array_equal(labels_matrix(table), expected)
    assert table.column("split").to_pylist() == ["train"] * 3 + ["val"] + ["test"] * 2
    elsewhere = prepare("pa100k", str(root), str(tmp_path / "out" / "m.parquet"))
    table, info = read_manifest(elsewhere.path)
    assert table.column("image")[0].as_py() == str(root / "data" / "000001.jpg")
    assert decode_image(load_image_bytes(table.column("image")[0].as_py(), info.root)).shape == (
        16,
        8,
        3,
    )


def test_pa100k_missing_image(pa100k_root, tmp_path):
    root, _, _ = pa100k_root
    (root / "data" / "000004.jpg").unlink()
    with pytest.raises(
        DatasetError, match=r"1 images named in .*annotation.mat are missing .*000004"
    ):
        prepare("pa100k", str(root), str(tmp_path / "m.parquet"))


def test_pa100k_missing_key(pa100k_root, tmp_path):
    root, _, _ = pa100k_root
    mat = scipy.io.loadmat(root / "annotation.mat")
    del mat["val_label"]
    scipy.io.savemat(
        root / "annotation.mat", {k: v for k, v in mat.items() if not k.startswith("__")}
    )
    with pytest.raises(DatasetError, match="has no 'val_label'; it has: attributes"):
        prepare("pa100k", str(root), str(tmp_path / "m.parquet"))


# --- RAP ---------------------------------------------------------------------------------------

N_RAP = 30


def rap_names(n=N_RAP):
    return [f"CAM01_2014-02-15_{index:04d}.png" for index in range(n)]


@pytest.fixture
def rap1_root(tmp_path):
    return write_rap1(tmp_path / "RAP")


def write_rap1(root):
    """A RAP v1 folder at ``root``: ``RAP_annotation.mat`` and its images (also the README
    test's). Returns ``root``, the labels and the five partitions."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, (N_RAP, 55)).astype(np.uint8)
    labels[3, 52] = 2  # one uncertain value
    partitions = []
    for seed in range(5):
        order = np.random.default_rng(seed).permutation(N_RAP)
        partitions.append({"train_index": row(order[:20]), "test_index": row(order[20:])})
    mat = {"RAP_annotation": {
        "imagesname": cells(rap_names()), "label": labels, "partion": structs(partitions),
        "attribute_eng": cells(f"attr{index}" for index in range(55)),
        "position": np.zeros((N_RAP, 8)),
    }}  # fmt: skip
    root.mkdir()
    scipy.io.savemat(root / "RAP_annotation.mat", mat)
    write_images(root / "RAP_dataset", rap_names())
    return root, labels, partitions


def test_rap1(rap1_root, tmp_path):
    root, labels, partitions = rap1_root
    report = prepare("rap1", str(root), str(tmp_path / "rap1.parquet"), seed=3, partition=2)
    assert report.rows == N_RAP
    assert report.dropped == {"uncertain labels (2) read as 0": 1}
    table, info = read_manifest(report.path)
    assert len(info.attributes) == 55
    assert info.eval_attributes == tuple(f"attr{index}" for index in range(51))
    names = [image.rsplit("/", 1)[1] for image in table.column("image").to_pylist()]
    by_name = dict(zip(names, table.column("split").to_pylist(), strict=True))
    train = {rap_names()[i] for i in partitions[2]["train_index"].ravel().astype(int) - 1}
    assert {n for n, s in by_name.items() if s == "test"} == set(rap_names()) - train
    assert {n for n, s in by_name.items() if s in ("train", "val")} == train
    assert report.splits["val"] == 2  # 10% of the 20 training images
    expected = np.where(labels == 2, 0, labels)[[rap_names().index(n) for n in names]]
    np.testing.assert_array_equal(labels_matrix(table), expected)


def test_rap1_val_carve_is_seeded(rap1_root, tmp_path):
    root, _, _ = rap1_root
    splits = [
        read_manifest(prepare("rap1", str(root), str(tmp_path / f"{s}.parquet"), seed=s).path)[0]
        .column("split")
        .to_pylist()
        for s in (0, 0, 1)
    ]
    assert splits[0] == splits[1]
    assert splits[0] != splits[2]


def test_rap1_options_are_checked(rap1_root, tmp_path):
    root, _, _ = rap1_root
    out = str(tmp_path / "m.parquet")
    with pytest.raises(ValueError, match=r"partition=7 is not valid; valid partitions: 0\.\.4"):
        prepare("rap1", str(root), out, partition=7)
    with pytest.raises(DatasetError, match="is 2 \\(uncertain\\)"):
        prepare("rap1", str(root), out, uncertain="error")
    with pytest.raises(ValueError, match="uncertain='drop'; valid values: zero, error"):
        prepare("rap1", str(root), out, uncertain="drop")
    assert prepare("rap1", str(root), out, partition="4").rows == N_RAP  # CLI strings parse


@pytest.fixture
def rap2_root(tmp_path):
    return write_rap2(tmp_path / "RAP2")


def write_rap2(root):
    """A RAP v2 folder at ``root``, as :func:`write_rap1`; returns ``root``, the labels, the
    selected attributes and the five partitions."""
    n = N_RAP
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, (n, 60)).astype(np.uint8)
    selected = np.array([*range(10, 60), 0, 1, 2, 3])  # 54 attributes, the usual kind of reorder
    identities = np.array(
        [index // 3 if index < 24 else -1 for index in range(n)], dtype=np.float64
    )
    partitions = []
    for seed in range(5):
        order = np.random.default_rng(seed).permutation(n - 2)  # two images in no partition
        partitions.append({"train_index": row(order[:16]), "val_index": row(order[16:21]),
                           "test_index": row(order[21:])})  # fmt: skip
    mat = {"RAP_annotation": {
        "name": cells(rap_names(n)), "data": labels, "attribute": cells(f"a{i}" for i in range(60)),
        "selected_attribute": row(selected), "partition_attribute": structs(partitions),
        "person_identity": identities.reshape(-1, 1),
    }}  # fmt: skip
    root.mkdir()
    scipy.io.savemat(root / "RAP_annotation.mat", mat)
    write_images(root / "RAP_dataset", rap_names(n))
    return root, labels, selected, partitions


def test_rap2(rap2_root, tmp_path):
    root, labels, selected, partitions = rap2_root
    report = prepare("rap2", str(root), str(tmp_path / "rap2.parquet"), partition=1)
    assert report.rows == N_RAP - 2
    assert report.dropped == {"images outside the chosen partition": 2}
    assert report.splits == {"train": 16, "val": 5, "test": 7}
    table, info = read_manifest(report.path)
    assert info.eval_attributes == tuple(f"a{i}" for i in selected)
    index = [
        rap_names().index(image.rsplit("/", 1)[1]) for image in table.column("image").to_pylist()
    ]
    np.testing.assert_array_equal(labels_matrix(table), labels[index])
    for split in ("train", "val", "test"):
        chosen = set(partitions[1][f"{split}_index"].ravel().astype(int) - 1)
        rows = [
            i for i, s in zip(index, table.column("split").to_pylist(), strict=True) if s == split
        ]
        assert set(rows) == chosen
    expected = [str(i // 3) if i < 24 else rap_names()[i] for i in index]  # no id: own identity
    assert table.column("identity").to_pylist() == expected


# --- folder + CSV ------------------------------------------------------------------------------


def folder_with_csv(tmp_path, text, images=("a.png", "b.png", "c.png", "d/e.png")):
    root = tmp_path / "folder"
    for index, image in enumerate(images):
        (root / image).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 16), (index * 9, 80, 160)).save(root / image)
    (root / "labels.csv").write_text(text)
    return root


def test_folder_with_split_and_identity(tmp_path):
    text = "image,split,identity,male,hat\na.png,train,p1,1,0\nb.png,train,p1,1,1\n"
    text += "c.png,val,p2,0,0\nd/e.png,test,p3,0,1\n"
    root = folder_with_csv(tmp_path, text)
    report = prepare(
        "folder", str(root), str(root / "m.parquet"), eval_attributes="hat", name="mine"
    )
    table, info = read_manifest(report.path)
    assert info == ManifestInfo("mine", ("male", "hat"), ("hat",), root=str(root))
    assert table.column("image").to_pylist() == ["a.png", "b.png", "c.png", "d/e.png"]
    np.testing.assert_array_equal(labels_matrix(table), [[1, 0], [1, 1], [0, 0], [0, 1]])
    assert table.column("split").to_pylist() == ["train", "train", "val", "test"]
    assert table.column("identity").to_pylist() == ["p1", "p1", "p2", "p3"]


def test_folder_seeded_split(tmp_path):
    names = [f"{i}.png" for i in range(20)]
    text = "image,identity,x\n" + "".join(f"{n},p{i // 2},{i % 2}\n" for i, n in enumerate(names))
    root = folder_with_csv(tmp_path, text, names)
    first = read_manifest(prepare("folder", str(root), str(tmp_path / "1.parquet"), seed=5).path)[0]
    again = read_manifest(prepare("folder", str(root), str(tmp_path / "2.parquet"), seed=5).path)[0]
    assert first.column("split").to_pylist() == again.column("split").to_pylist()
    owner: dict[str, str] = {}
    for identity, split in zip(
        first.column("identity").to_pylist(), first.column("split").to_pylist(), strict=True
    ):
        assert owner.setdefault(identity, split) == split  # person-disjoint
    assert set(owner.values()) == {"train", "val", "test"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("file,x\na.png,1\n", "has no 'image' column"),
        ("image,split\na.png,train\n", "no attribute columns"),
        ("image,x\na.png,1\nb.png,2\n", r"line 3, column 'x': '2' is not 1, 0 or -1"),
        ("image,x\na.png,1\nb.png,\n", r"line 3, column 'x': '' is not 1, 0 or -1"),
        ("image,x\na.png,1\nzz.png,0\n", r"1 images named in .*labels.csv are missing .*zz.png"),
        (
            "image,split,x\na.png,dev,1\n",
            r"line 2, column 'split': 'dev'; valid splits: train, val, test",
        ),
        ("image,x\na.png,1,1\n", "line 2 has 3 fields, the header has 2"),
    ],
)
def test_folder_errors(tmp_path, text, expected):
    root = folder_with_csv(tmp_path, text)
    with pytest.raises(DatasetError, match=expected):
        prepare("folder", str(root), str(tmp_path / "m.parquet"))


def test_folder_unknown_eval_attribute(tmp_path):
    root = folder_with_csv(tmp_path, "image,x\na.png,1\n")
    with pytest.raises(
        ValueError, match=r"eval_attributes \['y'\] are not CSV columns; attributes: x"
    ):
        prepare(
            "folder", str(root), str(tmp_path / "m.parquet"), eval_attributes="y", ratios="1,0,0"
        )


# --- prepare, verify, pack ---------------------------------------------------------------------


def test_unknown_format_and_option(tmp_path):
    with pytest.raises(
        ValueError, match="unknown dataset format 'coco'; valid formats: pa100k, rap1, rap2, peta"
    ):
        prepare("coco", str(tmp_path), str(tmp_path / "m.parquet"))
    with pytest.raises(
        ValueError, match="format 'pa100k' has no option 'partition'; valid options: none"
    ):
        prepare("pa100k", str(tmp_path), str(tmp_path / "m.parquet"), partition=1)
    with pytest.raises(ValueError, match="has no option 'sizes'; valid options: n, size, ratios"):
        prepare("synthetic", str(tmp_path), str(tmp_path / "m.parquet"), sizes="1x1")


def test_every_format_declares_exactly_its_converter_options():
    assert set(FORMATS) == {"pa100k", "rap1", "rap2", "peta", "folder", "synthetic", "merge"}
    for spec in FORMATS.values():
        parameters = list(inspect.signature(spec.convert).parameters.values())
        assert [p.name for p in parameters[:2]] == ["root", "seed"]
        keyword = [p.name for p in parameters[2:] if p.kind is inspect.Parameter.KEYWORD_ONLY]
        assert keyword == [option.name for option in spec.options], spec.name
        for option in spec.options:
            assert option.help


def test_verify_finds_corrupt_and_missing_images(tmp_path):
    names = [f"{i}.png" for i in range(6)]
    root = folder_with_csv(tmp_path, "image,x\n" + "".join(f"{n},1\n" for n in names), names)
    data = (root / "2.png").read_bytes()
    (root / "2.png").write_bytes(data[: len(data) // 2])  # truncated
    (root / "4.png").write_bytes(b"\x89PNG garbage")
    calls = []
    report = prepare("folder", str(root), str(root / "m.parquet"), ratios="1,0,0", verify=True,
                     progress=lambda done, total: calls.append((done, total)))  # fmt: skip
    assert report.verify.total == 6
    assert [image for image, _ in report.verify.bad] == ["2.png", "4.png"]
    assert all("cannot decode image" in error for _, error in report.verify.bad)
    assert calls[-1] == (6, 6)
    (root / "5.png").unlink()
    missing = verify_manifest(report.path)
    assert [image for image, _ in missing.bad] == ["2.png", "4.png", "5.png"]
    assert "image not found" in missing.bad[2][1]
    assert not missing.ok
    assert "3 unreadable or corrupt" in missing.summary()


def test_packed_manifest(tmp_path):
    names = [f"{i}.png" for i in range(4)]
    root = folder_with_csv(tmp_path, "image,x\n" + "".join(f"{n},0\n" for n in names), names)
    report = prepare("folder", str(root), str(tmp_path / "packed" / "m.parquet"), ratios="1,0,0",
                     pack=True, verify=True)  # fmt: skip
    assert report.packed and report.verify.ok
    for name in names:
        (root / name).unlink()  # the manifest no longer needs the files
    table, info = read_manifest(report.path)
    pixels = decode_image(load_image_bytes(table.column("binary")[1].as_py(), info.root))
    assert pixels.shape == (16, 8, 3)
    assert tuple(pixels[0, 0]) == (9, 80, 160)
    assert verify_manifest(report.path).ok


# --- the shared person-disjoint splitter -------------------------------------------------------


def test_split_by_identity_follows_image_ratios_and_ignores_row_order():
    rng = np.random.default_rng(0)
    identities = [f"p{i}" for i in rng.integers(0, 300, 3000)]
    splits = split_by_identity(identities, (0.5, 0.1, 0.4), seed=4)
    owner: dict[str, str] = {}
    for identity, split in zip(identities, splits, strict=True):
        assert owner.setdefault(identity, split) == split
    assert np.mean(splits == "train") == pytest.approx(0.5, abs=0.03)
    assert np.mean(splits == "val") == pytest.approx(0.1, abs=0.03)
    order = rng.permutation(len(identities))
    shuffled = split_by_identity([identities[i] for i in order], (0.5, 0.1, 0.4), seed=4)
    np.testing.assert_array_equal(shuffled, splits[order])
    assert not np.array_equal(split_by_identity(identities, (0.5, 0.1, 0.4), seed=5), splits)


def test_split_by_identity_fills_every_split_when_it_can():
    splits = split_by_identity(["a", "b", "c"], (0.8, 0.1, 0.1), seed=0)
    assert sorted(splits) == ["test", "train", "val"]
    assert set(split_by_identity(["a", "b"], (1, 0, 1), seed=0)) == {"train", "test"}
    with pytest.raises(ValueError, match="2 identities are too few to fill split"):
        split_by_identity(["a", "b"], (0.6, 0.2, 0.2), seed=0)


@pytest.mark.parametrize("value", ["0.5,0.5", "a,b,c", "-1,1,1", "0,0,0"])
def test_bad_ratios(value):
    with pytest.raises(ValueError, match="split ratios"):
        parse_ratios(value)
