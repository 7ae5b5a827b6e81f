"""Export: TorchScript parity for both heads with and without CFAR (dictionary and fold-in).

The runs are made by hand in stage 1's layout (a freshly initialised ResNet-18 on 32 x 16
inputs, random logits for CFAR to fit on): parity is about the exported graph reproducing
the PyTorch predictor, whatever the weights.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from campar_ray.bundle import ParPredictor, load_model, save_bundle
from campar_ray.cfar.fit import fit_cfar
from campar_ray.config import CfarConfig, Config
from campar_ray.data.synthetic import render, sample_person
from campar_ray.decision import CALIBRATED, probabilities
from campar_ray.export import CfarModule, ExportError, export_model
from campar_ray.model import build_model
from campar_ray.model.inputs import normalize
from campar_ray.run.layout import RunDir
from campar_ray.run.logits import SplitLogits, write_split_logits

SIZE = (32, 16)
ATTRIBUTES = ("hat", "bag", "skirt", "jeans", "logo")


def make_run(run_dir: Path, head: str, fusion: bool, logit_norm: str = "none") -> Path:
    """One checkpoint of a fresh model plus random stage-1 logits, laid out as stage 1 does.

    A logit BatchNorm gets random positive scales, shifts and running statistics, so that
    folding it into the exported graph is exercised, not the identity map it starts as."""
    torch.manual_seed(0)
    config = Config().override(
        {
            "data.image_size": list(SIZE),
            "model.backbone": "resnet18",
            "model.head": head,
            "model.fusion": fusion,
            "model.logit_norm": logit_norm,
            "run.dir": str(run_dir),
        }
    )
    checkpoint = run_dir / "ray" / "stage1" / "checkpoint_000001"
    checkpoint.mkdir(parents=True)
    model = build_model(config.model, len(ATTRIBUTES))
    with torch.no_grad():
        for module in model.head.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                if module.weight is not None:
                    module.weight.uniform_(0.5, 2.0)
                    module.bias.normal_()
    torch.save(model.state_dict(), checkpoint / "model.pt")
    metrics = {"epoch": 1, "train_loss": 1.0, "val_mA": 0.5, "val_auc": 0.5}
    meta = {
        "epoch": 1,
        "attributes": list(ATTRIBUTES),
        "eval_attributes": list(ATTRIBUTES[:4]),
        "config": config.to_dict(),
        "metrics": metrics,
        "history": [metrics],
    }
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    config.save(run_dir / "config.yaml")
    rng = np.random.default_rng(0)
    for split, count in (("train", 60), ("val", 20), ("test", 20)):
        labels = rng.integers(0, 2, (count, len(ATTRIBUTES))).astype(np.int8)
        logits = (2 * labels - 1) + rng.normal(0, 1.5, labels.shape)
        write_split_logits(
            RunDir(str(run_dir)).logits(split),
            SplitLogits(
                images=[f"{split}_{i}.png" for i in range(count)],
                labels=labels,
                shared=logits.astype(np.float32),
                specific=None if head == "baseline" else (logits + 0.3).astype(np.float32),
                attributes=ATTRIBUTES,
                eval_attributes=ATTRIBUTES[:4],
            ),
        )
    return run_dir


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """Bundles ``<head>-<cfar>`` for both heads and cfar in none / dictionary / fold-in."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("export")
    made = {}
    for head, fusion in (("campar", True), ("baseline", False)):
        run = make_run(root / head, head, fusion)
        made[f"{head}-none"] = Path(save_bundle(str(run), str(root / f"{head}-none"), samples=0))
        fit_cfar(str(run), CfarConfig(solver="local", factors=3, keys=5, fc2_epochs=20))
        dictionary = Path(save_bundle(str(run), str(root / f"{head}-dictionary"), samples=0))
        fold_in = root / f"{head}-fold-in"
        shutil.copytree(dictionary, fold_in)
        meta = json.loads((fold_in / "cfar" / "cfar.json").read_text())
        meta["config"]["lookup"] = "fold-in"
        (fold_in / "cfar" / "cfar.json").write_text(json.dumps(meta))
        made[f"{head}-dictionary"], made[f"{head}-fold-in"] = dictionary, fold_in
    return made


def real_images(count: int, size: tuple[int, int] = (48, 24)) -> np.ndarray:
    """Synthetic pedestrians at a size other than the model's (the export must resize first)."""
    rng = np.random.default_rng(7)
    return np.stack([render(sample_person(rng), rng, size) for _ in range(count)])


def _load_torchscript(path: Path) -> tuple[torch.jit.ScriptModule, dict]:
    extra = {"campar.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), _extra_files=extra)
    return module, json.loads(extra["campar.json"])


@pytest.mark.parametrize("head", ["campar", "baseline"])
@pytest.mark.parametrize("cfar", ["none", "dictionary", "fold-in"])
def test_torchscript_matches_pytorch(bundles, tmp_path, head, cfar, capsys):
    bundle = bundles[f"{head}-{cfar}"]
    images = real_images(4)
    report = export_model(str(bundle), "torchscript", str(tmp_path / "model.pt"), images=images)
    assert set(report.max_abs_diff) == {"random", "real"}
    assert max(report.max_abs_diff.values()) <= 1e-5
    assert "parity on real inputs: max abs diff" in capsys.readouterr().out
    assert report.summary() == (
        f"exported torchscript to {tmp_path / 'model.pt'}; largest difference from PyTorch's "
        f"probabilities: random inputs {report.max_abs_diff['random']:.1e}, real inputs "
        f"{report.max_abs_diff['real']:.1e} (tolerance 0.0001)"
    )

    module, meta = _load_torchscript(tmp_path / "model.pt")
    predictor = load_model(str(bundle), CALIBRATED)  # a bundle with a calibration exports it
    assert meta["attributes"] == list(ATTRIBUTES) and meta["threshold"] == 0.5
    assert meta["calibration"]["offsets"] == list(predictor.calibration.offsets)
    assert meta["cfar"] == (None if cfar == "none" else cfar)
    expected = predictor.predict_proba(list(images))
    raw = load_model(str(bundle)).predict_proba(list(images))
    if cfar == "none":
        assert np.abs(expected - raw).max() > 1e-3  # the offsets are applied, not ignored
    else:  # fc2's bias took the val offsets: stage 1 + CFAR at 0.5 is already calibrated
        assert np.abs(meta["calibration"]["offsets"]).max() < 0.5
    for batch in (1, 4):  # the batch axis is dynamic: neither is the traced size (2)
        x = normalize(predictor.prepare(list(images[:batch])))
        with torch.no_grad():
            got = module(x).numpy()
        np.testing.assert_allclose(got, expected[:batch], atol=1e-5)


@pytest.mark.parametrize("lookup", ["dictionary", "fold-in"])
def test_torch_cfar_matches_the_decision_module(bundles, lookup):
    """The export's torch CFAR (both lookups, fc2) against decision.refine, array for array."""
    cfar = load_model(str(bundles[f"campar-{lookup}"])).cfar
    logits = np.random.default_rng(3).normal(0, 2, (64, len(ATTRIBUTES))).astype(np.float32)
    with torch.no_grad():
        got = CfarModule(cfar)(torch.from_numpy(logits)).numpy()
    np.testing.assert_allclose(got, cfar.refined_logits(logits), atol=1e-5)
    np.testing.assert_allclose(
        torch.sigmoid(torch.from_numpy(got)).numpy(), probabilities(cfar.refined_logits(logits)),
        atol=1e-5,
    )  # fmt: skip


def test_an_old_bundle_without_calibration_exports_raw(bundles, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(bundles["campar-none"], old)
    (old / "calibration.json").unlink()
    export_model(str(old), "torchscript", str(tmp_path / "m.pt"), progress=False)
    _, meta = _load_torchscript(tmp_path / "m.pt")
    assert meta["calibration"] is None and meta["threshold"] == 0.5
    with pytest.raises(ValueError, match=r"has no calibration\.json .*`campar bundle`"):
        load_model(str(old), CALIBRATED)


@pytest.mark.parametrize("logit_norm", ["batchnorm", "batchnorm-own-affine"])
def test_torchscript_keeps_the_logit_batchnorm_of_either_statistics(tmp_path, logit_norm):
    run = make_run(tmp_path / "run", "campar", False, logit_norm)
    bundle = save_bundle(str(run), str(tmp_path / "bundle"), samples=0)
    report = export_model(
        bundle, "torchscript", str(tmp_path / "model.pt"), images=real_images(3), progress=False
    )
    assert max(report.max_abs_diff.values()) <= 1e-4
    predictor = load_model(bundle)
    assert predictor.model.head.logit_norm is not None  # the bundle kept the chosen form
    weight, bias = predictor.model.head.effective_classifier("specific")
    shared_weight, shared_bias = predictor.model.head.effective_classifier("shared")
    same = torch.allclose(bias, shared_bias) and torch.allclose(weight, shared_weight)
    assert same == (logit_norm == "batchnorm")  # own statistics: a classifier of their own


def test_parity_check_catches_a_mismatch(bundles, tmp_path, monkeypatch):
    original = ParPredictor.probabilities
    monkeypatch.setattr(
        ParPredictor, "probabilities", lambda self, output: original(self, output) + 1e-3
    )
    with pytest.raises(
        ExportError, match=r"differs from PyTorch by \d\.\d{3}e-0[34] \(> 0\.0001\)"
    ):
        export_model(str(bundles["campar-dictionary"]), "torchscript", str(tmp_path / "m.pt"))


def test_onnx_refuses_fold_in_with_the_alternatives(bundles, tmp_path):
    with pytest.raises(ExportError, match=r"format 'torchscript', or fit CFAR with cfar\.lookup"):
        export_model(str(bundles["campar-fold-in"]), "onnx", str(tmp_path / "m.onnx"))


def test_unknown_format_lists_the_valid_ones(bundles, tmp_path):
    with pytest.raises(ValueError, match="'tflite'; valid: torchscript, onnx"):
        export_model(str(bundles["campar-none"]), "tflite", str(tmp_path / "m"))


ONNX_MISSING = [
    name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None
]


@pytest.mark.skipif(
    bool(ONNX_MISSING),
    reason=f"ONNX export needs the optional extra campar-ray[onnx]; missing: {ONNX_MISSING}",
)
@pytest.mark.parametrize("name", ["campar-none", "campar-dictionary", "baseline-dictionary"])
def test_onnx_matches_pytorch_through_onnxruntime(bundles, tmp_path, name):
    import onnxruntime

    out = tmp_path / "model.onnx"
    images = real_images(3)
    report = export_model(str(bundles[name]), "onnx", str(out), images=images)
    assert max(report.max_abs_diff.values()) <= 1e-5
    predictor = load_model(str(bundles[name]), CALIBRATED)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = normalize(predictor.prepare(list(images))).numpy()
    got = session.run(None, {"images": x})[0]
    np.testing.assert_allclose(got, predictor.predict_proba(list(images)), atol=1e-5)


def test_onnx_without_its_packages_names_the_extra(bundles, tmp_path):
    if not ONNX_MISSING:
        pytest.skip("onnx, onnxscript and onnxruntime are installed")
    with pytest.raises(ExportError, match=r"campar-ray\[onnx\]"):
        export_model(str(bundles["campar-dictionary"]), "onnx", str(tmp_path / "m.onnx"))
