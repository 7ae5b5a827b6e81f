"""Manifests, CSVs, images and URIs from a shared bucket are someone else's input.

Each test runs the `campar` command a user would on input an attacker (or an accident) made:
a manifest naming files outside its folder, a non-image file, a tiny PNG claiming 200
megapixels, credentials inside a URI, a short CSV row, no manifest at all. Each asserts the
one line the user sees, the exit code, and that nothing was written or leaked.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from cli_checks import TINY_TRAIN, black_png, one_line, run_campar
from PIL import Image

from campar_ray import storage
from campar_ray.data import generate_synthetic, read_manifest, verify_manifest
from campar_ray.data.manifest import ManifestError, read_info, write_manifest

SECRET = b"aws_secret_access_key = TOP-SECRET-VALUE"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _with_images(manifest: str, out: str, replace: dict[int, str]) -> str:
    """A copy of ``manifest`` at ``out`` with the image references of some rows replaced."""
    table, info = read_manifest(manifest)
    images = table.column("image").to_pylist()
    for row, image in replace.items():
        images[row] = image
    write_manifest(out, table.set_column(0, "image", pa.array(images)), info)
    return out


@pytest.fixture
def shared(tmp_path) -> tuple[Path, str]:
    """A bucket-like folder: a secret beside the data, and the data's manifest."""
    (tmp_path / "secret.txt").write_bytes(SECRET)
    return tmp_path, generate_synthetic(str(tmp_path / "data"), n=12, size=(32, 16))


# --- manifests cannot reach outside their data -------------------------------------------------


@pytest.mark.parametrize("reference", ["../secret.txt", "{root}/secret.txt", "file://{root}/x"])
def test_pack_refuses_images_outside_the_manifest_folder(shared, capsys, reference):
    root, manifest = shared
    evil = _with_images(
        manifest, str(root / "data" / "evil.parquet"), {3: reference.format(root=root)}
    )
    before = _files(root)
    code, out, err = run_campar(capsys, "pack", "--manifest", evil, "--out", str(root / "packed"))
    line = one_line(err)
    assert code == 2 and out == ""
    assert line.startswith("campar pack: error: row 3: image ") and "is outside" in line
    assert "--allow-outside-root" in line
    assert _files(root) == before  # (the writability probe leaves an empty folder)


def test_pack_stores_only_bytes_that_decode_as_images(shared, capsys):
    root, manifest = shared
    (root / "data" / "notes.txt").write_bytes(SECRET)
    evil = _with_images(manifest, str(root / "data" / "evil.parquet"), {0: "notes.txt"})
    code, out, _ = run_campar(capsys, "pack", "--manifest", evil, "--out", str(root / "packed"))
    assert code == 1
    assert out.splitlines()[:3] == [
        f"wrote {root / 'packed'}: 11 images packed into 1 shard(s)",
        "skipped 1 that do not decode as images:",
        "  notes.txt: cannot decode image: not in any format Pillow reads",
    ]
    assert all(SECRET not in data for data in _files(root / "packed").values())
    assert "notes.txt" not in read_manifest(str(root / "packed"))[0].column("image").to_pylist()


def test_allow_outside_root_reads_there_but_still_packs_only_images(shared, capsys):
    root, manifest = shared
    Image.new("RGB", (16, 32), (1, 2, 3)).save(root / "elsewhere.png")
    evil = _with_images(
        manifest, str(root / "data" / "evil.parquet"), {0: "../secret.txt", 1: "../elsewhere.png"}
    )
    argv = ("pack", "--manifest", evil, "--out", str(root / "packed"), "--allow-outside-root")
    code, out, _ = run_campar(capsys, *argv)
    assert code == 1 and "11 images packed" in out and "  ../secret.txt: cannot decode" in out
    assert all(SECRET not in data for data in _files(root / "packed").values())


def test_prepare_refuses_csv_rows_outside_the_dataset_folder(tmp_path, capsys):
    root = tmp_path / "corpus"
    root.mkdir()
    Image.new("RGB", (8, 16)).save(root / "a.png")
    Image.new("RGB", (8, 16)).save(tmp_path / "private.png")
    (root / "labels.csv").write_text("image,x\na.png,1\n../private.png,0\n")
    out = root / "m.parquet"
    argv = ("prepare", "folder", "--root", str(root), "--out", str(out), "--ratios", "1,0,0")
    code, _, err = run_campar(capsys, *argv)
    assert code == 2
    assert one_line(err) == (
        f"campar prepare: error: row 1: image '../private.png' is outside {root}; pass "
        "--allow-outside-root (or --set data.allow_outside_root=true) to read it anyway"
    )
    assert not out.exists()
    code, out_text, _ = run_campar(capsys, *argv, "--allow-outside-root", "--verify")
    assert code == 0 and "2 images" in out_text and "0 unreadable or corrupt" in out_text


def test_verify_reports_outside_images_without_reading_them(shared, monkeypatch):
    root, manifest = shared
    evil = _with_images(manifest, str(root / "data" / "evil.parquet"), {5: "../secret.txt"})
    read = []
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda path: read.append(path) or real(path))
    report = verify_manifest(evil)
    assert [image for image, _ in report.bad] == ["../secret.txt"]
    assert "is outside" in report.bad[0][1]
    assert len(read) == 11 and not any("secret" in path for path in read)


# --- images are bounded -----------------------------------------------------------------------


def test_prepare_verify_and_pack_skip_decompression_bombs_and_oversized_images(tmp_path, capsys):
    root = tmp_path / "corpus"
    root.mkdir()
    Image.new("RGB", (8, 16)).save(root / "a.png")
    bomb = black_png(root / "bomb.png", 20000, 10000)  # 200 megapixels in a few KB
    assert bomb.stat().st_size < 100_000
    black_png(root / "big.png", 2000, 1000)
    (root / "labels.csv").write_text("image,x\na.png,1\nbomb.png,0\nbig.png,1\n")
    common = ("--root", str(root), "--ratios", "1,0,0", "--set", "data.max_image_pixels=1000000")
    out = root / "m.parquet"
    code, text, _ = run_campar(capsys, "prepare", "folder", "--out", str(out), "--verify", *common)
    assert code == 1
    assert "verified 3 images: 2 unreadable or corrupt" in text
    assert "  bomb.png: cannot decode image" in text and "decompression bomb" in text
    assert (
        "  big.png: image is 2000 x 1000 pixels, more than data.max_image_pixels (1000000)" in text
    )
    packed = tmp_path / "packed" / "m.parquet"
    code, text, _ = run_campar(capsys, "prepare", "folder", "--out", str(packed), "--pack", *common)
    assert code == 0 and "1 images (train 1, val 0, test 0)" in text
    assert "dropped: files that do not decode as images (not packed): 2" in text
    assert read_manifest(str(packed))[0].column("image").to_pylist() == [str(root / "a.png")]


@pytest.mark.ray
def test_training_skips_bombs_and_oversized_images(tiny_run):
    """One 200-megapixel PNG used to kill the whole run; now it is one skipped image (the
    session's tiny run has one, and a 2-megapixel PNG over its ``data.max_image_pixels``)."""
    assert "best checkpoint:" in tiny_run.out
    assert sorted(tiny_run.skipped["train"]) == ["big.png", "bomb.png"]


def test_training_refuses_outside_images_before_writing_anything(tmp_path, capsys):
    manifest = generate_synthetic(str(tmp_path / "data"), n=12, size=(32, 16))
    val = read_manifest(manifest)[0].column("split").to_pylist().index("val")
    Image.new("RGB", (16, 32), (9, 9, 9)).save(tmp_path / "outside.png")
    outside = _with_images(
        manifest, str(tmp_path / "data" / "outside.parquet"), {val: "../outside.png"}
    )
    run_dir = tmp_path / "run"
    argv = ("train", "--manifest", outside, "--run-dir", str(run_dir), *TINY_TRAIN)
    code, _, err = run_campar(capsys, *argv)
    assert code == 2 and "'../outside.png' is outside" in one_line(err)
    assert not run_dir.exists()


# --- credentials never live in a URI ----------------------------------------------------------

KEY, PASSWORD = "AKIAEXAMPLEKEY", "wJalr/XUtnFEMI+K7MDENG"


@pytest.mark.parametrize(
    "argv",
    [
        ("config", "--set", "run.dir=s3://{key}:{password}@bucket/run"),
        ("train", "--manifest", "{manifest}", "--run-dir", "s3://{key}:{password}@bucket/run"),
        ("config", "--set", "data.manifest=gs://{key}:{password}@bucket/m.parquet"),
        ("pack", "--manifest", "{manifest}", "--out", "s3://{key}:{password}@bucket/packed"),
        ("prepare", "synthetic", "--out", "s3://{key}:{password}@bucket/m.parquet"),
        ("pack", "--manifest", "s3://{key}@bucket/m.parquet", "--out", "{tmp}/packed"),
    ],
)
def test_uris_with_credentials_are_refused_without_echoing_them(shared, capsys, argv):
    root, manifest = shared
    values = {"key": KEY, "password": PASSWORD, "manifest": manifest, "tmp": root}
    before = _files(root)
    code, out, err = run_campar(capsys, *(arg.format(**values) for arg in argv))
    line = one_line(err)
    assert code == 2 and out == ""
    assert "must not carry credentials" in line and "AWS_ACCESS_KEY_ID" in line
    assert not any(part in err + out for part in (KEY, *PASSWORD.split("/")))
    assert _files(root) == before


# --- clear lines for the first things a new user types ----------------------------------------


@pytest.mark.parametrize(
    ("csv", "line"),
    [
        ("image,x,y\na.png,1\n", 2),
        ("image,x,y\na.png,1,0\n\n\nb.png,1\n", 5),  # blank lines count
        ('image,x,y\n"a\nb.png",1,0\nb.png,1,0,1\n', 4),  # so do quoted line breaks
    ],
)
def test_folder_csv_with_a_short_or_long_row_names_line_and_counts(tmp_path, capsys, csv, line):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "labels.csv").write_text(csv)
    fields = len(csv.rstrip("\n").splitlines()[-1].split(","))
    argv = ("prepare", "folder", "--root", str(root), "--out", str(root / "m.parquet"))
    code, _, err = run_campar(capsys, *argv)
    assert code == 2 and one_line(err) == (
        f"campar prepare: error: {root / 'labels.csv'} line {line} has {fields} fields, the "
        "header has 3"
    )
    assert not (root / "m.parquet").exists()


def test_empty_manifest_path_is_refused_inone_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Makefile").write_text("all:\n")  # what the current folder used to be read as
    for read in (read_info, read_manifest):
        with pytest.raises(ManifestError, match=r"^no manifest given \(set data.manifest"):
            read("")
    code, _, err = run_campar(capsys, "pack", "--manifest", "", "--out", str(tmp_path / "packed"))
    assert code == 2 and one_line(err).startswith("campar pack: error: no manifest given")
    assert list(_files(tmp_path)) == ["Makefile"]


@pytest.mark.ray
def test_doctor_without_a_config_says_the_manifest_is_not_set(
    ray_cluster, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Makefile").write_text("all:\n")
    code, out, _ = run_campar(capsys, "doctor")
    assert code == 1
    assert "error: data.manifest is not set (pass --manifest or --config)" in out.splitlines()
    assert "ok: nothing found" not in out and "Makefile" not in out
    assert sum(line.startswith("error:") for line in out.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Makefile"]  # no runs/ folder


# --- one guard for every reader of manifest rows ----------------------------------------------


@pytest.fixture
def listener():
    from cli_checks import Listener

    server = Listener()
    yield server
    server.close()


def test_a_uri_row_with_endpoint_options_is_refused_everywhere_without_a_request(
    shared, capsys, listener
):
    """``?endpoint_override=`` would send a request signed with the user's key elsewhere:
    refused by the guard even with --allow-outside-root, and by storage for any path."""
    root, manifest = shared
    hostile = f"s3://bucket/x.png?endpoint_override=127.0.0.1:{listener.port}&scheme=http"
    evil = _with_images(manifest, str(root / "data" / "evil.parquet"), {2: hostile})
    for extra in ((), ("--allow-outside-root",)):
        argv = ("pack", "--manifest", evil, "--out", str(root / "packed"), *extra)
        code, out, err = run_campar(capsys, *argv)
        line = one_line(err)
        assert code == 2 and out == ""
        assert line.startswith("campar pack: error: row 2: image 's3://bucket/x.png?endpoint_ov")
        assert "is a URI with options" in line and "AWS_ENDPOINT_URL" in line
    report = verify_manifest(evil)
    assert [image for image, _ in report.bad] == [hostile]
    with pytest.raises(storage.StorageError, match="must not carry options"):
        storage.read_bytes(hostile)
    assert listener.close() == 0


def test_a_symlink_inside_the_manifest_folder_may_not_point_outside_it(shared, capsys):
    """Symlinks are resolved before the root check: a link to a file outside and a linked
    folder (holding an ``id_rsa``) are refused by pack, verify and training's check alike; a
    link that stays inside is read."""
    root, manifest = shared
    (root / "keys").mkdir()
    (root / "keys" / "id_rsa").write_bytes(SECRET)
    Image.new("RGB", (16, 32), (1, 2, 3)).save(root / "outside.png")
    data = root / "data"
    (data / "link.png").symlink_to(root / "outside.png")
    (data / "linked").symlink_to(root / "keys", target_is_directory=True)
    first = read_manifest(manifest)[0].column("image")[0].as_py()
    (data / "inside.png").symlink_to(data / first)
    for row, reference in ((4, "link.png"), (5, "linked/id_rsa")):
        evil = _with_images(manifest, str(data / "evil.parquet"), {row: reference, 1: "inside.png"})
        code, _, err = run_campar(capsys, "pack", "--manifest", evil, "--out", str(root / "p"))
        assert code == 2
        assert one_line(err) == (
            f"campar pack: error: row {row}: image {reference!r} is outside {data} through a "
            "symlink; pass --allow-outside-root (or --set data.allow_outside_root=true) to "
            "read it anyway"
        )
        assert [image for image, _ in verify_manifest(evil).bad] == [reference]
        (data / "evil.parquet").unlink()
    assert not (root / "p").exists() or not any((root / "p").rglob("*.parquet"))
