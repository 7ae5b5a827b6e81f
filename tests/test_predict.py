"""Model bundles in plain Python, input listing, and Ray Data batch prediction.

The bundle is written by hand in the documented format (a fresh ResNet-18 on 32 x 16
inputs), so these tests pin the format itself; bundles saved from runs are covered in
``test_evaluate.py`` and ``test_export.py``.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from campar_ray.bundle import load_model
from campar_ray.cli import main
from campar_ray.config import PREDICT_IN_PROCESS_MAX, Config
from campar_ray.data.images import STRICT
from campar_ray.data.manifest import ManifestInfo, manifest_table, write_manifest
from campar_ray.data.ray_pipeline import decode_batch
from campar_ray.data.synthetic import render, sample_person
from campar_ray.data.transforms import resize
from campar_ray.decision import Threshold
from campar_ray.model import build_model
from campar_ray.model.inputs import normalize
from campar_ray.model.scoring import ScoringActor
from campar_ray.predict import (
    Route,
    choose_route,
    list_inputs,
    predict,
    prediction_table,
    write_predictions,
)
from campar_ray.train.inference import checkpoint_scorer

SIZE = (32, 16)
ATTRIBUTES = ("hat", "bag", "skirt", "jeans")
THRESHOLD = 0.5
VAL_THRESHOLD = 0.45
PER_ATTRIBUTE = (0.3, 0.5, 0.55, 0.7)
THRESHOLDS = {
    "val": {"value": VAL_THRESHOLD, "source": "test: one value"},
    "val-per-attribute": {"value": list(PER_ATTRIBUTE), "source": "test: one per attribute"},
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bundle")
    config = Config().override(
        {"data.image_size": list(SIZE), "model.backbone": "resnet18", "model.fusion": False}
    )
    torch.save(build_model(config.model, len(ATTRIBUTES)).state_dict(), folder / "model.pt")
    config.save(folder / "config.yaml")
    names = {"attributes": list(ATTRIBUTES), "eval_attributes": list(ATTRIBUTES[:3])}
    (folder / "attributes.json").write_text(json.dumps(names))
    (folder / "threshold.json").write_text(json.dumps(THRESHOLDS))
    return folder


def _with_thresholds(bundle: Path, folder: Path, payload) -> Path:
    """The bundle's files (linked) with another ``threshold.json``."""
    folder.mkdir()
    for name in ("model.pt", "config.yaml", "attributes.json"):
        (folder / name).symlink_to(bundle / name)
    (folder / "threshold.json").write_text(json.dumps(payload))
    return folder


def _image(seed: int, size: tuple[int, int]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return render(sample_person(rng), rng, size)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Five readable images of different sizes (one in a subfolder), a corrupt and a
    truncated one, and a file that is not an image."""
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    for index, (name, size) in enumerate(
        [("a.png", (40, 20)), ("b.jpg", (64, 32)), ("c.png", (32, 16)),
         ("d.bmp", (50, 30)), ("sub/e.png", (128, 64))]
    ):  # fmt: skip
        Image.fromarray(_image(index, size)).save(root / name)
    (root / "broken.jpg").write_bytes(b"this is not a JPEG")
    whole = io.BytesIO()
    Image.fromarray(_image(9, (64, 32))).save(whole, format="PNG")
    (root / "truncated.png").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (root / "notes.txt").write_text("not an image")
    return root


def test_bundle_predicts_like_the_network_on_resized_inputs(bundle, folder):
    predictor = load_model(str(bundle))
    assert predictor.attributes == ATTRIBUTES and predictor.threshold == THRESHOLD
    assert predictor.image_size == SIZE and predictor.cfar is None
    arrays = [_image(0, (40, 20)), _image(1, (64, 32))]
    model = build_model(predictor.config.model, len(ATTRIBUTES))
    model.load_state_dict(torch.load(bundle / "model.pt", weights_only=True))
    x = normalize(torch.from_numpy(np.stack([resize(a, SIZE) for a in arrays])))
    with torch.no_grad():
        expected = torch.sigmoid(model.eval()(x).specific).numpy()
    probs = predictor.predict_proba(arrays)
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    names = predictor.predict(arrays)
    assert names == [
        [a for a, p in zip(ATTRIBUTES, row, strict=True) if p >= THRESHOLD] for row in probs
    ]
    from_paths = predictor.predict_proba([folder / "a.png", str(folder / "b.jpg")])
    assert from_paths.shape == (2, len(ATTRIBUTES)) and np.all((from_paths > 0) & (from_paths < 1))


def test_bundle_applies_each_threshold_protocol(bundle):
    arrays = [_image(seed, (48, 24)) for seed in range(12)]
    expected = {"0.5": THRESHOLD, "val": VAL_THRESHOLD, "val-per-attribute": PER_ATTRIBUTE}
    probs = load_model(str(bundle)).predict_proba(arrays)
    decided = {}
    for protocol, value in expected.items():
        predictor = load_model(str(bundle), protocol)
        assert predictor.threshold == value and predictor.decision.protocol == protocol
        cut = np.broadcast_to(value, len(ATTRIBUTES))
        names = predictor.predict(arrays)
        assert names == [
            [a for a, p, t in zip(ATTRIBUTES, row, cut, strict=True) if p >= t] for row in probs
        ]
        decided[protocol] = names
    assert decided["val-per-attribute"] != decided["0.5"]


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"value": 0.5, "source": "a bundle from before threshold protocols"}, "not a threshold"),
        ([0.5, 0.5], "not a threshold file"),
        ({"val": {"value": "0.5", "source": "x"}}, "bad 'val' entry"),
        ({"val": {"value": [0.5], "source": "x"}}, "bad 'val' entry"),
        ({"val": {"value": 1.5, "source": "x"}}, "bad 'val' entry"),
        ({"val": {"value": 0.5}}, "bad 'val' entry"),
        ({"val-per-attribute": {"value": [0.5] * 3, "source": "x"}}, "4 numbers"),
        ({"val-per-attribute": {"value": 0.5, "source": "x"}}, "bad 'val-per-attribute'"),
        ({"val-per-attribute": {"value": [0.5, None, 0.5, 0.5], "source": "x"}}, "bad 'val-"),
    ],
)
def test_bad_threshold_file_is_one_clear_error(bundle, tmp_path, payload, problem):
    broken = _with_thresholds(bundle, tmp_path / "broken", payload)
    with pytest.raises(ValueError, match=problem) as error:
        load_model(str(broken))
    assert str(broken / "threshold.json") in str(error.value)


def test_a_protocol_the_bundle_lacks_is_refused(bundle, tmp_path):
    partial = _with_thresholds(bundle, tmp_path / "partial", {"val": THRESHOLDS["val"]})
    assert load_model(str(partial), "val").threshold == VAL_THRESHOLD
    with pytest.raises(ValueError, match=r"has no 'val-per-attribute' threshold .*holds val"):
        load_model(str(partial), "val-per-attribute")
    with pytest.raises(ValueError, match="unknown threshold protocol 'test'"):
        load_model(str(bundle), "test")


def test_predict_proba_gives_a_file_the_same_probabilities_as_a_path_pil_image_or_array(
    bundle, folder, tmp_path
):
    """PIL images (RGB and grey) and their RGB arrays go through the decoder's own steps:
    bit for bit the probabilities of their files (in the same batches), one image, a list or
    one N x H x W x 3 array."""
    grey = tmp_path / "grey.png"
    Image.fromarray(_image(5, (40, 20))[..., 0]).save(grey)
    paths = [folder / "a.png", folder / "b.jpg", folder / "d.bmp", folder / "sub/e.png", grey]
    predictor = load_model(str(bundle))
    expected = predictor.predict_proba(paths)
    pil = [Image.open(path) for path in paths]
    assert pil[-1].mode == "L"
    arrays = [np.asarray(image.convert("RGB")) for image in pil]
    np.testing.assert_array_equal(predictor.predict_proba(pil), expected)
    np.testing.assert_array_equal(predictor.predict_proba(arrays), expected)
    np.testing.assert_array_equal(predictor.predict_proba([*pil[:2], *arrays[2:]]), expected)
    one = predictor.predict_proba(str(paths[1]))  # one image: a batch of one
    assert one.shape == (1, len(ATTRIBUTES))
    np.testing.assert_array_equal(predictor.predict_proba(pil[1]), one)
    np.testing.assert_array_equal(predictor.predict_proba(arrays[1]), one)
    same_size = [resize(array, SIZE) for array in arrays]
    np.testing.assert_array_equal(predictor.predict_proba(np.stack(same_size)), expected)


def test_bundle_input_errors_name_the_problem(bundle, tmp_path):
    predictor = load_model(str(bundle))
    with pytest.raises(ValueError, match=r"image 1 must be an H x W x 3 uint8 array"):
        predictor.predict_proba([_image(0, SIZE), np.zeros((32, 16), np.uint8)])
    rgba = np.zeros((32, 16, 4), np.uint8)
    with pytest.raises(ValueError, match=r"got uint8 \(32, 16, 4\) \(a PIL image's \.convert"):
        predictor.predict_proba(rgba)
    with pytest.raises(TypeError, match=r"^image 1 must be a path, a PIL image or an H x W x 3 "):
        predictor.predict_proba([_image(0, SIZE), 3.5])
    with pytest.raises(TypeError, match=r"^images must be .*, or a list of them, got int$"):
        predictor.predict_proba(7)
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        predictor.predict_proba([tmp_path / "missing.png"])
    with pytest.raises(FileNotFoundError, match="neither a model bundle"):
        load_model(str(tmp_path))


def test_inputs_from_folder_glob_and_manifest(folder, tmp_path):
    listed = list_inputs(str(folder)).table.column("image").to_pylist()
    assert [Path(p).relative_to(folder).as_posix() for p in listed] == [
        "a.png", "b.jpg", "broken.jpg", "c.png", "d.bmp", "sub/e.png", "truncated.png",
    ]  # fmt: skip
    globbed = list_inputs(str(folder / "*.png")).table.column("image").to_pylist()
    assert [Path(p).name for p in globbed] == ["a.png", "c.png", "truncated.png"]
    table = manifest_table(
        ["a.png", "c.png"], np.zeros((2, 4), np.int8), ["test"] * 2, ["p0", "p1"], ["s"] * 2
    )
    write_manifest(str(folder / "m.parquet"), table, ManifestInfo("t", ATTRIBUTES, ATTRIBUTES))
    inputs = list_inputs(str(folder / "m.parquet"))
    assert inputs.table.column("image").to_pylist() == ["a.png", "c.png"]
    assert inputs.root == str(folder)
    with pytest.raises(FileNotFoundError, match="no images found"):
        list_inputs(str(tmp_path / "*.png"))


def test_decoding_records_errors_instead_of_raising(folder):
    batch = {
        "row": np.arange(3),
        "image": np.array(["a.png", "missing.png", "broken.jpg"], dtype=object),
    }
    decoded = decode_batch(batch, root=str(folder), size=SIZE, limits=STRICT, reasons=True)
    assert decoded["image"].shape == (3, *SIZE, 3)
    assert decoded["valid"].tolist() == [True, False, False]
    assert decoded["error"][0] == ""
    assert decoded["error"][1].startswith("FileNotFoundError: image not found")
    assert decoded["error"][2].startswith("ImageDecodeError")


def test_logits_prediction_and_the_bundle_score_through_one_scorer(bundle, folder, tmp_path):
    """A checkpoint's logits (as stage 1 writes them) and batch prediction's probabilities
    are the bundle's own outputs on the same decoded pixels, bit for bit; undecodable rows
    come back NaN with their reason, and a batch with nothing to score still has its columns."""
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "model.pt").symlink_to(bundle / "model.pt")
    config = yaml.safe_load((bundle / "config.yaml").read_text())
    meta = {"config": config, "attributes": list(ATTRIBUTES)}
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    names = ["a.png", "broken.jpg", "b.jpg", "sub/e.png"]
    batch = {"row": np.arange(4), "image": np.array(names, dtype=object)}
    decoded = decode_batch(batch, root=str(folder), size=SIZE, limits=STRICT, reasons=True)
    load_logits = functools.partial(
        checkpoint_scorer, str(checkpoint), amp=False, channels_last=False
    )
    logits = ScoringActor(load_logits, use_gpu=False)(decoded)
    probs = ScoringActor(functools.partial(load_model, str(bundle)), use_gpu=False)(decoded)

    predictor = load_model(str(bundle))
    good = [folder / name for name in names if name != "broken.jpg"]
    output = predictor.stage1(normalize(predictor.prepare(good)))
    valid = decoded["valid"]
    assert valid.tolist() == [True, False, True, True]
    np.testing.assert_array_equal(logits["shared"][valid], output.shared.numpy())
    np.testing.assert_array_equal(logits["specific"][valid], output.specific.numpy())
    np.testing.assert_array_equal(probs["probs"][valid], predictor.predict_proba(good))
    assert np.isnan(logits["shared"][1]).all() and np.isnan(probs["probs"][1]).all()
    assert probs["error"][1].startswith("ImageDecodeError")
    assert probs["row"].tolist() == [0, 1, 2, 3]
    nothing = {name: column[1:2] for name, column in decoded.items()}
    assert ScoringActor(load_logits, use_gpu=False)(nothing)["specific"].shape == (1, 4)


def test_csv_output_joins_names_and_leaves_failures_empty(tmp_path):
    probs = np.array([[0.9, 0.1, 0.6, 0.2], [np.nan] * 4], dtype=np.float32)
    fixed = Threshold(0.5, "test", "0.5")
    table = prediction_table(["x.png", "y.png"], np.array(["", "bad"]), probs, ATTRIBUTES, fixed)
    write_predictions(str(tmp_path / "p.csv"), table)
    options = pacsv.ConvertOptions(strings_can_be_null=True)
    rows = pacsv.read_csv(tmp_path / "p.csv", convert_options=options).to_pylist()
    assert rows[0]["predicted"] == "hat;skirt" and rows[0]["error"] is None
    assert rows[1]["error"] == "bad" and rows[1]["prob_hat"] is None


def test_output_suffix_is_checked_first(bundle, folder, tmp_path):
    with pytest.raises(ValueError, match=r"must end with one of \.parquet, \.csv"):
        predict(str(bundle), str(folder), str(tmp_path / "preds.json"))


def test_predict_goes_to_ray_for_many_images_or_a_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert choose_route(PREDICT_IN_PROCESS_MAX) == Route(
        False,
        f"predict: {PREDICT_IN_PROCESS_MAX} images in-process (at most "
        f"{PREDICT_IN_PROCESS_MAX}; pass --address or more images for Ray)",
    )
    many = PREDICT_IN_PROCESS_MAX + 1
    assert choose_route(many) == Route(
        True, f"predict: {many} images on Ray (over {PREDICT_IN_PROCESS_MAX} images)"
    )
    assert choose_route(3, "10.0.0.1:6379").on_ray
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert choose_route(3) == Route(True, "predict: 3 images on Ray (cluster 10.0.0.2:6379)")


@pytest.mark.ray
def test_predict_folder_keeps_every_row_and_records_errors(
    ray_cluster, bundle, folder, tmp_path, capsys, monkeypatch
):
    """On Ray (asked for) and in this process (a few images: chosen), the same rows, errors
    and probabilities."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "preds.parquet"
    result = predict(str(bundle), str(folder), str(out), batch_size=3, on_ray=True)
    local = predict(str(bundle), str(folder), str(tmp_path / "local.parquet"), batch_size=3)
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("predict:")]
    assert said == [
        "predict: 7 images on Ray (as asked)",
        f"predict: 7 images in-process (at most {PREDICT_IN_PROCESS_MAX}; pass --address or "
        "more images for Ray)",
    ]
    assert (result.images, result.errors) == (local.images, local.errors) == (7, 2)
    probs = [f"prob_{a}" for a in ATTRIBUTES]
    assert result.table.drop_columns(probs).equals(local.table.drop_columns(probs))
    np.testing.assert_allclose(
        result.table.select(probs).to_pandas().to_numpy(),
        local.table.select(probs).to_pandas().to_numpy(),
        atol=1e-6,
    )
    table = pq.read_table(out)
    rows = table.to_pylist()
    names = [Path(row["path"]).name for row in rows]
    assert names == ["a.png", "b.jpg", "broken.jpg", "c.png", "d.bmp", "e.png", "truncated.png"]
    failed = {Path(r["path"]).name: r for r in rows if r["error"] is not None}
    assert set(failed) == {"broken.jpg", "truncated.png"}
    assert all(r["predicted"] is None and r["prob_hat"] is None for r in failed.values())
    good = [row for row in rows if row["error"] is None]
    expected = load_model(str(bundle)).predict_proba([row["path"] for row in good])
    got = np.array([[row[f"prob_{a}"] for a in ATTRIBUTES] for row in good])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    for row, probs in zip(good, expected, strict=True):
        assert row["predicted"] == [
            a for a, p in zip(ATTRIBUTES, probs, strict=True) if p >= THRESHOLD
        ]
    assert table.schema.metadata[b"threshold_protocol"] == b"0.5"


def test_predict_cli_applies_per_attribute_thresholds(
    bundle, folder, tmp_path, capsys, monkeypatch
):
    """A few images: scored in this process, Ray never joined, and the command says so."""
    from campar_ray import predict as module

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(module, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    out = tmp_path / "preds.parquet"
    args = ["predict", "--model", str(bundle), "--input", str(folder / "*.png"), "--out", str(out)]
    assert main([*args, "--threshold", "val-per-attribute"]) == 0
    printed = capsys.readouterr()
    [summary] = printed.out.splitlines()  # one line, no object dump
    assert f"-> {out}; threshold protocol val-per-attribute" in summary
    assert "predict: 3 images in-process (at most " in printed.err
    table = pq.read_table(out)
    metadata = table.schema.metadata
    assert metadata[b"threshold_protocol"] == b"val-per-attribute"
    assert json.loads(metadata[b"threshold"]) == list(PER_ATTRIBUTE)
    assert metadata[b"threshold_source"] == b"test: one per attribute"
    for row in table.to_pylist():
        if row["error"] is None:
            assert row["predicted"] == [
                a for a, t in zip(ATTRIBUTES, PER_ATTRIBUTE, strict=True) if row[f"prob_{a}"] >= t
            ]
