"""Object storage end to end, against a real S3-compatible server (moto) on 127.0.0.1.

A user's corpus sits in a bucket; every step reads and writes ``s3://`` URIs: prepare (a
shard folder) -> pack -> train (2 workers, checkpoints in the bucket) -> resume from the
bucket -> fit-cfar (Ray actors) -> evaluate. Bad buckets and credentials fail before work.
"""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest

from campar_ray import storage
from campar_ray.cli import main
from campar_ray.data import generate_synthetic, labels_matrix, read_manifest

TINY = {
    "model.backbone": "timm:mobilenetv3_small_050",  # checkpoints of ~2 MB keep S3 I/O small
    "model.fusion": "false",
    "data.image_size": "[32, 16]",
    "data.pad": "2",
    "train.batch_size": "16",
    "train.cpus_per_worker": "0.5",
    "cfar.actors": "1",
    "cfar.keys": "8",
    "cfar.fc2_epochs": "20",
}


def _tiny() -> list[str]:
    return [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]


def _list(uri: str) -> list[str]:
    """Paths of every object under ``uri``, relative to it."""
    filesystem, inner = storage.resolve(uri)
    infos = filesystem.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    return sorted(i.path[len(inner) + 1 :] for i in infos if i.type == pafs.FileType.File)


@pytest.fixture(scope="module")
def corpus(s3_server, tmp_path_factory) -> str:
    """96 synthetic 32 x 16 pedestrians uploaded as a user keeps them: images + labels.csv."""
    local = tmp_path_factory.mktemp("corpus")
    manifest = generate_synthetic(str(local), n=96, size=(32, 16))
    table, info = read_manifest(manifest)
    lines = ["image,split,identity," + ",".join(info.attributes)]
    for image, split, identity, labels in zip(
        table.column("image").to_pylist(),
        table.column("split").to_pylist(),
        table.column("identity").to_pylist(),
        labels_matrix(table),
        strict=True,
    ):
        lines.append(f"{image},{split},{identity}," + ",".join(map(str, labels)))
    (local / "labels.csv").write_text("\n".join(lines) + "\n")
    (local / "manifest.parquet").unlink()
    pafs.copy_files(str(local), f"{s3_server}/corpus")
    return f"{s3_server}/corpus"


@pytest.mark.ray
def test_prepare_pack_train_resume_cfar_evaluate_all_in_the_bucket(
    ray_cluster, s3_server, corpus, capsys
):
    paths, packed, run = (f"{s3_server}/{p}" for p in ("manifests/paths", "packed", "runs/r"))
    assert main(["prepare", "folder", "--root", corpus, "--out", paths]) == 0
    assert _list(paths) == ["part-00000.parquet"]
    # A shard folder's images lie outside it, in the corpus: packing them is opted into.
    pack = ["pack", "--manifest", paths, "--out", packed, "--allow-outside-root"]
    assert main([*pack, "--shard-size-mb", "0.05"]) == 0
    assert len(_list(packed)) > 1  # several shards, each with the images inside
    table, _ = read_manifest(packed)
    assert table.num_rows == 96 and table.column("binary").null_count == 0

    train = ["train", "--manifest", packed, "--run-dir", run, "--num-workers", "2", *_tiny()]
    assert main([*train, "--epochs", "1"]) == 0
    checkpoints = [p for p in _list(f"{run}/ray/stage1") if p.endswith("meta.json")]
    assert len(checkpoints) == 1
    first = json.loads(storage.read_bytes(f"{run}/ray/stage1/{checkpoints[0]}"))

    assert main([*train, "--epochs", "2"]) == 0  # resumes from the bucket's checkpoint
    metas = [
        json.loads(storage.read_bytes(f"{run}/ray/stage1/{p}"))
        for p in _list(f"{run}/ray/stage1")
        if p.endswith("meta.json")
    ]
    last = max(metas, key=lambda meta: meta["epoch"])
    assert [m["epoch"] for m in last["history"]] == [1, 2]
    assert last["history"][0] == first["history"][0]
    assert {"train.parquet", "val.parquet", "test.parquet"} <= set(_list(f"{run}/logits"))

    assert main(["fit-cfar", "--run-dir", run, "--solver", "ray", *_tiny()]) == 0
    assert "metrics.json" in _list(f"{run}/cfar")
    args = ["--run-dir", run, "--angle-images", "8", "--cam-images", "1"]
    assert main(["evaluate", *args, *_tiny()]) == 0
    metrics = json.loads(storage.read_bytes(f"{run}/report/test/metrics.json"))
    assert "stage1_cfar" in metrics["sources"]
    assert "report.html" in _list(f"{run}/report/test")


def test_missing_bucket_is_named_before_any_work(s3_server, capsys):
    code = main(["pack", "--manifest", "never-read.parquet", "--out", "s3://no-such-bucket/p"])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        "campar pack: error: cannot write to s3://no-such-bucket/p: the bucket does not exist"
    )


def test_bad_credentials_are_named_before_any_work(
    s3_server, strict_s3_endpoint, monkeypatch, capsys
):
    monkeypatch.setenv("AWS_ENDPOINT_URL", strict_s3_endpoint)
    out = f"{s3_server}/manifests/never"
    assert main(["prepare", "synthetic", "--out", out, "--n", "10"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"campar prepare: error: cannot write to {out}: the credentials were")
    assert "AWS_ACCESS_KEY_ID" in error and "\n" not in error


def test_check_writable_leaves_nothing_behind(s3_server, tmp_path):
    storage.check_writable(f"{s3_server}/probe-here")
    assert _list(f"{s3_server}/probe-here") == []
    storage.check_writable(str(tmp_path / "new" / "run"))
    assert list((tmp_path / "new" / "run").iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(storage.StorageError, match="a parent of the path is a file"):
        storage.check_writable(str(tmp_path / "file" / "run"))
