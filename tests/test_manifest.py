"""The manifest format: validation names the bad row, round trips, shards, paths, decoding."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from campar_ray.data import (
    ImageDecodeError,
    ManifestError,
    ManifestInfo,
    decode_image,
    labels_matrix,
    load_image_bytes,
    manifest_table,
    read_manifest,
    resolve_image,
    write_manifest,
)
from campar_ray.data.manifest import rebase_images

INFO = ManifestInfo("toy", ("female", "hat", "bag"), ("female", "bag"))
LABELS = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=np.int8)


def toy_table(**changes) -> pa.Table:
    columns = {
        "images": ["a.png", "b.png", "sub/c.png", "d.png"],
        "labels": LABELS,
        "splits": ["train", "train", "val", "test"],
        "identities": ["p1", "p1", "p2", "p3"],
        "sources": ["cam1"] * 4,
    }
    columns.update(changes)
    return manifest_table(**columns)


def raw_parquet(path, table: pa.Table, info: ManifestInfo | None = INFO) -> str:
    """Write without validation, as a foreign tool would."""
    if info is not None:
        table = table.replace_schema_metadata({b"campar": info.to_metadata()})
    pq.write_table(table, path)
    return str(path)


def test_round_trip(tmp_path):
    path = str(tmp_path / "m.parquet")
    write_manifest(path, toy_table(), INFO)
    table, info = read_manifest(path)
    assert info == ManifestInfo("toy", INFO.attributes, INFO.eval_attributes, root=str(tmp_path))
    assert table.column("image").to_pylist() == ["a.png", "b.png", "sub/c.png", "d.png"]
    assert table.schema.field("labels").type == pa.list_(pa.int8())
    np.testing.assert_array_equal(labels_matrix(table), LABELS)
    assert labels_matrix(table).dtype == np.int8
    np.testing.assert_array_equal(info.eval_indices(), [0, 2])
    assert not (tmp_path / "m.parquet.tmp").exists()


def test_wider_label_types_are_accepted_and_made_int8(tmp_path):
    table = toy_table().set_column(1, "labels", pa.array(LABELS.tolist(), pa.list_(pa.int64())))
    table, _ = read_manifest(raw_parquet(tmp_path / "m.parquet", table))
    assert table.schema.field("labels").type == pa.list_(pa.int8())
    np.testing.assert_array_equal(labels_matrix(table), LABELS)


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (toy_table().set_column(
            1, "labels", pa.array([[1, 0, 1], [0, 0], [1, 1, 0], [0, 1, 1]], pa.list_(pa.int8()))
        ), r"row 1 \(image 'b.png'\): column 'labels' has 2 values, expected 3"),
        (toy_table(splits=["train", "validation", "val", "test"]),
         r"row 1 \(image 'b.png'\): column 'split' is 'validation'; valid splits: train, val"),
        (toy_table(images=["a.png", "b.png", "c.png", "a.png"]),
         r"rows 0 and 3 have the same image 'a.png'"),
        (toy_table(labels=np.array([[1, 0, 1], [0, 0, 0], [1, 2, 0], [0, 1, 1]])),
         r"row 2 \(image 'sub/c.png'\): column 'labels' holds 2 for attribute 'hat'"),
        (toy_table(labels=np.array([[1, 0, 1], [0, 0, 0], [1, 0, 0], [0, 1, -2]])),
         r"row 3 \(image 'd.png'\): column 'labels' holds -2 for attribute 'bag'; labels must "
         r"be 1, 0 or -1 \(not annotated\)"),
        (toy_table().drop_columns(["identity"]), r"no column 'identity'; required columns"),
        (toy_table().set_column(3, "identity", pa.array([1, 2, 3, 4])),
         r"column 'identity' must hold strings"),
        (toy_table().set_column(4, "source", pa.array(["x", None, "y", "z"])),
         r"row 1 \(image 'b.png'\): column 'source' is null"),
    ],
    ids=["label-length", "split", "duplicate", "label-2", "label-negative", "missing-column",
         "identity-type", "null"],
)  # fmt: skip
def test_bad_rows_are_named(tmp_path, table, expected):
    with pytest.raises(ManifestError, match=expected):
        read_manifest(raw_parquet(tmp_path / "m.parquet", table))
    with pytest.raises(ManifestError, match=expected):
        write_manifest(str(tmp_path / "w.parquet"), table, INFO)
    assert not (tmp_path / "w.parquet").exists()


def test_missing_metadata(tmp_path):
    with pytest.raises(ManifestError, match="no 'campar' key"):
        read_manifest(raw_parquet(tmp_path / "m.parquet", toy_table(), info=None))


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        (b'{"dataset": "toy", "attributes": ["a"]}', "no 'eval_attributes' key"),
        (
            b'{"dataset": "t", "attributes": ["a", "a"], "eval_attributes": ["a"]}',
            "lists 'a' twice",
        ),
        (
            b'{"dataset": "t", "attributes": ["a"], "eval_attributes": ["b"]}',
            r"\['b'\] are not among",
        ),
        (b"{not json", "not valid JSON"),
    ],
)
def test_invalid_metadata(tmp_path, meta, expected):
    table = toy_table().replace_schema_metadata({b"campar": meta})
    path = tmp_path / "m.parquet"
    pq.write_table(table, path)
    with pytest.raises(ManifestError, match=expected):
        read_manifest(str(path))


def test_shard_directory(tmp_path):
    shards = tmp_path / "shards"
    write_manifest(str(shards / "part-0.parquet"), toy_table().slice(0, 2), INFO)
    write_manifest(str(shards / "part-1.parquet"), toy_table().slice(2, 2), INFO)
    table, info = read_manifest(str(shards))
    assert info.root == str(shards)
    assert table.column("image").to_pylist() == ["a.png", "b.png", "sub/c.png", "d.png"]
    np.testing.assert_array_equal(labels_matrix(table), LABELS)


def test_shards_must_agree(tmp_path):
    shards = tmp_path / "shards"
    write_manifest(str(shards / "part-0.parquet"), toy_table().slice(0, 2), INFO)
    other = ManifestInfo("other", INFO.attributes, INFO.eval_attributes)
    write_manifest(str(shards / "part-1.parquet"), toy_table().slice(2, 2), other)
    with pytest.raises(ManifestError, match="different 'campar' metadata"):
        read_manifest(str(shards))


def test_duplicates_across_shards_are_caught(tmp_path):
    shards = tmp_path / "shards"
    write_manifest(str(shards / "part-0.parquet"), toy_table(), INFO)
    write_manifest(str(shards / "part-1.parquet"), toy_table().slice(1, 1), INFO)
    with pytest.raises(ManifestError, match=r"rows 1 and 4 have the same image 'b\.png'"):
        read_manifest(str(shards))


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(str(tmp_path / "nope.parquet"))


def test_resolve_image():
    assert resolve_image("sub/a.png", "/data/m") == os.path.join("/data/m", "sub/a.png")
    assert resolve_image("/abs/a.png", "/data/m") == "/abs/a.png"
    assert resolve_image("s3://bucket/a.png", "/data/m") == "s3://bucket/a.png"
    assert resolve_image("a.png", "s3://bucket/m") == "s3://bucket/m/a.png"


def test_rebase_images_keeps_pairs_portable(tmp_path):
    table = toy_table(images=["x/a.png", "/abs/b.png", "s3://b/c.png", "d.png"])
    inside = rebase_images(table, str(tmp_path / "data"), str(tmp_path))
    assert inside.column("image").to_pylist() == [
        "data/x/a.png",
        "/abs/b.png",
        "s3://b/c.png",
        "data/d.png",
    ]
    outside = rebase_images(table, str(tmp_path / "data"), str(tmp_path / "elsewhere"))
    assert outside.column("image")[0].as_py() == str(tmp_path / "data" / "x" / "a.png")
    assert rebase_images(table, str(tmp_path), str(tmp_path)) is table


def encoded(mode: str, fmt: str, size=(6, 4)) -> bytes:
    colour = {"L": 120, "RGBA": (10, 20, 30, 0), "P": 3, "RGB": (200, 100, 50)}[mode]
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


CODECS = [
    ("RGB", "PNG"),
    ("L", "PNG"),
    ("RGBA", "PNG"),
    ("P", "PNG"),
    ("RGB", "JPEG"),
    ("L", "JPEG"),
]


@pytest.mark.parametrize(("mode", "fmt"), [*CODECS, ("RGB", "BMP")])
def test_decode_gives_rgb(mode, fmt):
    pixels = decode_image(encoded(mode, fmt))
    assert pixels.shape == (4, 6, 3)
    assert pixels.dtype == np.uint8
    assert pixels.flags.writeable
    if mode == "RGB" and fmt != "JPEG":
        assert tuple(pixels[0, 0]) == (200, 100, 50)
    if mode == "L" and fmt == "PNG":
        assert tuple(pixels[0, 0]) == (120, 120, 120)


@pytest.mark.parametrize("data", [b"", b"not an image at all", encoded("RGB", "PNG", (64, 64))[:60],
                                  encoded("RGB", "JPEG", (64, 64))[:200]], ids=["empty", "garbage",
                                  "truncated-png", "truncated-jpeg"])  # fmt: skip
def test_decode_refuses_corrupt_data(data):
    with pytest.raises(ImageDecodeError, match="cannot decode image"):
        decode_image(data)


def test_load_image_bytes(tmp_path):
    data = encoded("RGB", "PNG")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(data)
    assert load_image_bytes("sub/a.png", str(tmp_path)) == data
    assert load_image_bytes(str(tmp_path / "sub" / "a.png"), "/elsewhere") == data
    assert load_image_bytes(data, "") == data
    with pytest.raises(FileNotFoundError, match=r"image not found: .*missing\.png"):
        load_image_bytes("missing.png", str(tmp_path))
