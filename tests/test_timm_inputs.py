"""A timm encoder's own input convention (mean, std, resize filter) from training to ONNX.

timm's ``test_efficientnet_gn`` (82 k parameters, built offline with ``pretrained=False``) was
pretrained on inputs scaled by 0.5 / 0.5 and resized bicubic, where torchvision encoders use
ImageNet's statistics and bilinear: a run, its bundle, the export's metadata and ``predict``
must all say and do the former.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from cli_checks import TINY_TRAIN, run_campar
from PIL import Image

from campar_ray.bundle import load_model
from campar_ray.data import generate_synthetic
from campar_ray.data.synthetic import render, sample_person
from campar_ray.data.transforms import resize
from campar_ray.decision import CALIBRATED
from campar_ray.export import METADATA_NAME
from campar_ray.model import encoder_interpolation, resolve_inputs
from campar_ray.model.inputs import IMAGENET_MEAN, IMAGENET_STD, normalize
from campar_ray.predict import PROB_PREFIX

ENCODER = "timm:test_efficientnet_gn"
OWN = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}
"""What timm's pretrained configuration of ``test_efficientnet_gn`` says."""


def test_the_encoder_decides_the_filter_unless_the_config_names_one():
    from campar_ray.config import Config

    assert encoder_interpolation(ENCODER) == "bicubic"
    assert encoder_interpolation("resnet18") == "bilinear"
    timm_run = Config().override({"model.backbone": ENCODER})
    assert resolve_inputs(timm_run).data.interpolation == "bicubic"
    chosen = timm_run.override({"data.interpolation": "lanczos"})
    assert resolve_inputs(chosen).data.interpolation == "lanczos"


def onnx_metadata(path: str) -> dict:
    (prop,) = [p for p in onnx.load(path).metadata_props if p.key == METADATA_NAME]
    return json.loads(prop.value)


def as_the_metadata_says(images: list[np.ndarray], metadata: dict) -> np.ndarray:
    """The export's input, prepared only from what its metadata says (a consumer's view)."""
    size = tuple(metadata["image_size"])
    pixels = np.stack([resize(image, size, metadata["interpolation"]) for image in images])
    x = normalize(torch.from_numpy(pixels), mean=metadata["mean"], std=metadata["std"])
    return x.numpy()


@pytest.mark.ray
def test_a_timm_encoder_trains_and_exports_with_its_own_normalisation(
    ray_cluster, tmp_path, capsys
):
    torch.set_num_threads(1)
    manifest = generate_synthetic(str(tmp_path / "data"), n=48, size=(32, 16))
    run, bundle, onnx_file = (str(tmp_path / name) for name in ("run", "bundle", "m.onnx"))
    train = ["train", "--manifest", manifest, "--run-dir", run, *TINY_TRAIN, "--epochs", "1"]
    code, out, err = run_campar(capsys, *train, "--set", f"model.backbone={ENCODER}")
    assert code == 0, out + err
    assert run_campar(capsys, "bundle", "--run-dir", run, "--out", bundle)[0] == 0
    for saved in (run, bundle):  # resolved when training starts, saved with the run
        config = yaml.safe_load(Path(saved, "config.yaml").read_text())
        assert config["data"]["interpolation"] == "bicubic", saved
    code, out, err = run_campar(
        capsys, "export", "--model", bundle, "--format", "onnx", "--out", onnx_file
    )
    assert code == 0, out + err
    metadata = onnx_metadata(onnx_file)
    assert {key: metadata[key] for key in OWN} == OWN

    # Images larger than the model's input, so the filter matters: predict must give what the
    # ONNX file gives on inputs prepared as its metadata says.
    rng = np.random.default_rng(5)
    images = [render(sample_person(rng), rng, (96, 48)) for _ in range(4)]
    folder = tmp_path / "photos"
    folder.mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{index}.png")
    session = onnxruntime.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    expected = session.run(None, {"images": as_the_metadata_says(images, metadata)})[0]
    preds = str(tmp_path / "preds.parquet")
    argv = ["predict", "--model", bundle, "--input", str(folder), "--out", preds]
    assert run_campar(capsys, *argv, "--threshold", CALIBRATED)[0] == 0
    table = pq.read_table(preds).sort_by("path")
    attributes = load_model(bundle).attributes
    got = np.stack([table.column(PROB_PREFIX + a).to_numpy() for a in attributes], axis=1)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    imagenet = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear"}
    other = session.run(None, {"images": as_the_metadata_says(images, metadata | imagenet)})[0]
    assert np.abs(other - expected).max() > 1e-3  # the convention changes the answer
