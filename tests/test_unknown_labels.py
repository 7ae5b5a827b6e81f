"""Unknown labels (-1, "not annotated"): kept by every manifest path, counted by verify."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from test_converters import folder_with_csv

from campar_ray.data import generate_synthetic, labels_matrix, read_manifest, verify_manifest
from campar_ray.data.converters import prepare
from campar_ray.data.manifest import UNKNOWN, write_manifest
from campar_ray.data.pack import pack_manifest


def hide(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """``labels`` with a seeded ``fraction`` of its entries made unknown."""
    hidden = np.random.default_rng(seed).random(labels.shape) < fraction
    return np.where(hidden, UNKNOWN, labels).astype(np.int8)


@pytest.fixture(scope="module")
def partial(tmp_path_factory) -> str:
    """A synthetic manifest with a third of its labels unknown."""
    root = tmp_path_factory.mktemp("partial")
    table, info = read_manifest(generate_synthetic(str(root), n=40, size=(32, 16)))
    labels = hide(labels_matrix(table), 1 / 3)
    table = table.set_column(1, "labels", pa.array(labels.tolist(), pa.list_(pa.int8())))
    path = str(root / "partial.parquet")
    write_manifest(path, table, info)
    return path


def test_unknown_labels_round_trip_through_write_read_and_pack(partial, tmp_path):
    table, _ = read_manifest(partial)
    labels = labels_matrix(table)
    assert (labels == UNKNOWN).any() and set(np.unique(labels)) == {UNKNOWN, 0, 1}
    packed = str(tmp_path / "packed")
    pack_manifest(partial, packed, shard_mb=0.02)
    packed_table, _ = read_manifest(packed)
    by_image = dict(zip(table.column("image").to_pylist(), labels.tolist(), strict=True))
    for image, row in zip(packed_table.column("image").to_pylist(),
                          labels_matrix(packed_table).tolist(), strict=True):  # fmt: skip
        assert by_image[image] == row


def test_verify_counts_unknown_labels_per_attribute(partial):
    table, info = read_manifest(partial)
    report = verify_manifest(partial)
    expected = (labels_matrix(table) == UNKNOWN).sum(0)
    assert report.ok
    assert report.unknown == {
        name: int(n) for name, n in zip(info.attributes, expected, strict=True) if n
    }
    first = info.attributes[int(np.flatnonzero(expected)[0])]
    assert f"{first} {report.unknown[first]}" in report.summary()


def test_folder_csv_with_unknowns_is_counted_by_prepare_verify(tmp_path):
    text = "image,split,x,y\na.png,train,1,-1\nb.png,train,-1,-1\nc.png,val,0,1\nd/e.png,test,1,0\n"
    root = folder_with_csv(tmp_path, text)
    report = prepare("folder", str(root), str(root / "m.parquet"), verify=True)
    assert report.verify.unknown == {"x": 1, "y": 2}
    assert "unknown labels (-1) per attribute, of 4 images: x 1, y 2" in report.summary()
    table, _ = read_manifest(report.path)
    np.testing.assert_array_equal(labels_matrix(table), [[1, -1], [-1, -1], [0, 1], [1, 0]])


def test_unknown_labels_round_trip_through_object_storage(partial, s3_server):
    table, info = read_manifest(partial)
    uri = f"{s3_server}/unknown/manifest"
    write_manifest(uri, table, info, shard_mb=0.001)
    again, _ = read_manifest(uri)
    np.testing.assert_array_equal(labels_matrix(again), labels_matrix(table))
