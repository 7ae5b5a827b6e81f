"""Shard folders, packing, and the piece plan the streaming pipeline reads manifests by."""

from __future__ import annotations

import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from ray.data.block import BlockAccessor

from campar_ray.cli import main
from campar_ray.config import DataConfig
from campar_ray.data import generate_synthetic, labels_matrix, read_manifest
from campar_ray.data.images import ImageDecodeError, read_image
from campar_ray.data.manifest import ManifestError, ManifestWriter, subset_rows, write_manifest
from campar_ray.data.pack import pack_manifest
from campar_ray.data.ray_pipeline import (
    BLOCK_ROWS,
    ManifestPieces,
    build_dataset,
    plan_pieces,
    read_piece,
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> str:
    return generate_synthetic(str(tmp_path_factory.mktemp("synthetic")), n=80, size=(32, 16))


@pytest.fixture(scope="module")
def packed(synthetic, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("packed") / "shards")
    report = pack_manifest(synthetic, out, shard_mb=0.02)
    assert len(report.shards) > 1 and report.rows == 80
    return out


def test_packed_bytes_are_stored_plain_for_cheap_row_group_reads(packed):
    """Encoded images are unique: a dictionary page or statistics over them only slow each
    decode task's read of its row group (10x on PETA)."""
    shard = pq.ParquetFile(sorted(pathlib.Path(packed).glob("*.parquet"))[0])
    names = shard.schema_arrow.names
    for group in range(shard.metadata.num_row_groups):
        binary = shard.metadata.row_group(group).column(names.index("binary"))
        assert "RLE_DICTIONARY" not in binary.encodings and binary.statistics is None
        image = shard.metadata.row_group(group).column(names.index("image"))
        assert image.statistics is not None  # the other columns keep theirs


def test_pack_keeps_every_row_and_its_bytes_grouped_by_split(synthetic, packed):
    source, info = read_manifest(synthetic)
    table, packed_info = read_manifest(packed)
    assert packed_info.attributes == info.attributes
    order = {"train": 0, "val": 1, "test": 2}
    splits = table.column("split").to_pylist()
    assert splits == sorted(splits, key=order.__getitem__)
    by_image = {image: row for row, image in enumerate(source.column("image").to_pylist())}
    rows = [by_image[image] for image in table.column("image").to_pylist()]
    assert sorted(rows) == list(range(80))
    np.testing.assert_array_equal(labels_matrix(table), labels_matrix(source)[rows])
    first = table.column("image")[0].as_py()
    with open(f"{info.root}/{first}", "rb") as handle:
        assert table.column("binary")[0].as_py() == handle.read()


def test_packed_row_groups_hold_one_split(packed):
    _, info = read_manifest(packed)
    pieces = plan_pieces(info.path, None, 1)
    for file, group in zip(
        pieces.column("file").to_pylist(), pieces.column("row_group").to_pylist(), strict=True
    ):
        splits = pq.ParquetFile(file).read_row_group(group, columns=["split"]).column("split")
        assert len(pc.unique(splits)) == 1


def test_pieces_cover_a_split_with_manifest_row_numbers(packed):
    table, info = read_manifest(packed)
    pieces = plan_pieces(info.path, "val", 2)
    rows = [read_piece(**piece) for piece in _pieces(pieces)]
    numbers = np.concatenate([r.column("row").to_numpy() for r in rows])
    expected = np.flatnonzero(pc.equal(table.column("split"), "val").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(np.sort(numbers), expected)
    for piece in rows:
        assert piece.num_rows <= BLOCK_ROWS
        index = piece.column("row").to_numpy()
        assert piece.column("image").to_pylist() == table.column("image").take(index).to_pylist()
        assert piece.column("binary").to_pylist() == table.column("binary").take(index).to_pylist()


@pytest.mark.parametrize("split", [None, "val"])
def test_a_subset_plans_the_first_rows_of_each_split_across_shards(packed, split):
    """``data.subset`` (``--subset N``): training, validation and the logits read the same
    first N rows of each split, whichever shard holds them."""
    table, info = read_manifest(packed)
    pieces = plan_pieces(info.path, split, 2, subset=5)
    rows = [read_piece(**piece).column("row").to_numpy() for piece in _pieces(pieces)]
    numbers = np.sort(np.concatenate(rows))
    splits = np.asarray(table.column("split").to_pylist())
    expected = [np.flatnonzero(splits == name)[:5] for name in ("train", "val", "test")]
    if split == "val":
        expected = expected[1:2]
    np.testing.assert_array_equal(numbers, np.sort(np.concatenate(expected)))
    assert subset_rows(splits, 0).all() and subset_rows(splits, 5).sum() == 15


def test_training_pieces_are_dealt_in_a_seeded_order(synthetic):
    _, info = read_manifest(synthetic)
    first, again = (plan_pieces(info.path, "train", 4, seed=3) for _ in range(2))
    assert first.equals(again)
    offsets = np.concatenate(first.column("offsets").to_pylist())
    assert len(first) == 4 and not np.array_equal(offsets, np.sort(offsets))
    assert not plan_pieces(info.path, "train", 4, seed=4).equals(first)


def test_read_tasks_decode_one_piece_each_in_a_new_order_every_training_epoch(packed):
    _, info = read_manifest(packed)
    pieces = plan_pieces(info.path, "train", 8)
    training = ManifestPieces(pieces, root=info.root, size=(16, 8), pad=2)
    epochs = [training.get_read_tasks(len(pieces)) for _ in range(4)]
    orders = [tuple(next(iter(task()))["row"][0].as_py() for task in tasks) for tasks in epochs]
    assert len(set(orders)) > 1 and len({frozenset(order) for order in orders}) == 1
    evaluation = ManifestPieces(pieces, root=info.root, size=(16, 8), pad=None)
    tasks = evaluation.get_read_tasks(len(pieces))
    blocks = [block for task in tasks for block in task()]
    planned = _pieces(pieces)
    assert [task.metadata.num_rows for task in tasks] == [len(p["offsets"]) for p in planned]
    rows = np.concatenate([block["row"].to_numpy() for block in blocks])
    expected = [read_piece(**piece).column("row").to_numpy() for piece in planned]
    np.testing.assert_array_equal(rows, np.concatenate(expected))
    assert all(pc.all(block["valid"]).as_py() for block in blocks)
    batch = BlockAccessor.for_block(blocks[0]).to_batch_format("numpy")
    assert batch["image"].shape == (len(batch["row"]), 16, 8, 3)


def test_unknown_split_is_refused(synthetic):
    with pytest.raises(ValueError, match="valid: train, val, test"):
        plan_pieces(synthetic, "valid", 1)


@pytest.mark.ray
def test_streaming_dataset_reads_packed_shards(ray_cluster, packed):
    table, info = read_manifest(packed)
    data = DataConfig(image_size=(32, 16), decode_concurrency=2, decode_cpus=0.5)
    batches = list(build_dataset(info, "test", data, train=False).iter_batches(batch_size=None))
    rows = np.concatenate([b["row"] for b in batches])
    labels = np.concatenate([b["labels"] for b in batches])
    assert all(b["valid"].all() for b in batches)
    assert sorted(table.column("split").take(rows).to_pylist()) == ["test"] * len(rows)
    assert len(rows) == pc.sum(pc.equal(table.column("split"), "test")).as_py()
    np.testing.assert_array_equal(labels, labels_matrix(table)[rows])


def test_writer_rolls_shards_and_refuses_an_existing_folder(synthetic, tmp_path):
    table, info = read_manifest(synthetic)
    with ManifestWriter(str(tmp_path / "light"), info, shard_mb=1e-4) as writer:
        for start in range(0, table.num_rows, 20):
            writer.write(table.slice(start, 20))
    assert [p.name for p in sorted((tmp_path / "light").iterdir())] == [
        f"part-0000{i}.parquet" for i in range(4)
    ]
    assert read_manifest(str(tmp_path / "light"))[0].equals(table)
    with pytest.raises(ManifestError, match="already holds Parquet files"):
        ManifestWriter(str(tmp_path / "light"), info)


def test_failed_pack_leaves_no_partial_manifest(synthetic, tmp_path):
    """The last test image is missing: train and val shards were written, then removed."""
    table, info = read_manifest(synthetic)
    images = table.column("image").to_pylist()
    last = max(i for i, split in enumerate(table.column("split").to_pylist()) if split == "test")
    images[last] = "images/gone.png"
    broken = f"{info.root}/broken.parquet"
    write_manifest(broken, table.set_column(0, "image", pa.array(images)), info)
    with pytest.raises(FileNotFoundError, match=r"image not found: .*gone\.png"):
        pack_manifest(broken, str(tmp_path / "out"), shard_mb=0.01)
    assert list((tmp_path / "out").iterdir()) == []


def test_pack_command(synthetic, packed, tmp_path, capsys):
    out = str(tmp_path / "p.parquet")
    assert main(["pack", "--manifest", synthetic, "--out", out]) == 0
    assert "80 images packed into 1 shard(s)" in capsys.readouterr().out
    assert main(["pack", "--manifest", packed, "--out", str(tmp_path / "again")]) == 2
    assert capsys.readouterr().err.strip().endswith("is already packed")


def _pieces(pieces) -> list[dict]:
    return [{**p, "offsets": np.asarray(p["offsets"])} for p in pieces.to_pylist()]


@pytest.fixture(scope="module")
def decoded(synthetic, tmp_path_factory) -> str:
    """The synthetic manifest packed as pixels at 16x8, through the CLI."""
    out = str(tmp_path_factory.mktemp("decoded") / "shards")
    size = ["--set", "data.image_size=[16,8]"]
    assert main(["pack", "--manifest", synthetic, "--out", out, "--decode", *size]) == 0
    return out


def test_decoded_pack_stores_the_pixels_the_decoder_would_make(synthetic, decoded, capsys):
    source, info = read_manifest(synthetic)
    table, stored = read_manifest(decoded)
    assert stored.pixels == (16, 8) and info.pixels is None
    images, rows = table.column("image").to_pylist(), table.column("binary").to_pylist()
    by_image = dict(zip(images, rows, strict=True))
    for image in source.column("image").to_pylist()[:12]:
        for mirror in (False, True):
            expected = read_image(image, info.root, size=(16, 8), mirror=mirror)
            found = read_image(by_image[image], stored.root, stored=(16, 8), mirror=mirror)
            np.testing.assert_array_equal(found, expected)


def test_decoded_rows_train_through_the_same_pieces(decoded):
    _, info = read_manifest(decoded)
    pieces = plan_pieces(info.path, "train", 4)
    source = ManifestPieces(pieces, root=info.root, size=(16, 8), pad=2, stored=info.pixels)
    blocks = [block for task in source.get_read_tasks(len(pieces)) for block in task()]
    assert sum(block.num_rows for block in blocks) == len(
        pieces.column("offsets").combine_chunks().values
    )
    assert all(pc.all(block["valid"]).as_py() for block in blocks)
    batch = BlockAccessor.for_block(blocks[0]).to_batch_format("numpy")
    assert batch["image"].shape[1:] == (16, 8, 3) and batch["image"].any()


def test_decoded_manifest_refuses_another_training_size_and_bad_rows(decoded, tmp_path):
    _, info = read_manifest(decoded)
    with pytest.raises(ManifestError, match=r"decoded at 16x8 .* data.image_size is 32x16"):
        build_dataset(info, "train", DataConfig(image_size=(32, 16)), train=True)
    with pytest.raises(ImageDecodeError, match=r"must hold 16x8x3 = 384 bytes, found 383"):
        read_image(bytes(383), "", stored=(16, 8))
    assert main(["pack", "--manifest", decoded, "--out", str(tmp_path / "again"), "--decode"]) == 2
