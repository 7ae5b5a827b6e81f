"""Rebuilding a network from saved weights, and scoring it: plain PyTorch, no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from campar_ray.artifacts import ArtifactError
from campar_ray.config import ModelConfig
from campar_ray.model import (
    Scorer,
    WeightsMismatch,
    build_model,
    load_network,
    rebuild_network,
)
from campar_ray.model.inputs import normalize

CONFIG = ModelConfig(backbone="resnet18", fusion=False, weights="none")
ATTRIBUTES = 3


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(CONFIG, ATTRIBUTES).eval()


def test_rebuilt_network_holds_the_saved_weights_in_eval_mode(trained):
    rebuilt = rebuild_network(CONFIG, ATTRIBUTES, trained.state_dict())
    assert not rebuilt.training
    for key, value in trained.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key


@pytest.mark.parametrize(
    ("state", "problem"),
    [
        ([1, 2], "it holds a list, not a state dict"),
        ({"fc.weight": torch.zeros(2, 2)}, "missing, e.g. backbone."),
        ({"fc.weight": torch.zeros(2, 2)}, "; 1 unexpected, e.g. fc.weight"),
    ],
)
def test_weights_of_another_network_are_named(state, problem):
    with pytest.raises(WeightsMismatch, match=problem):
        rebuild_network(CONFIG, ATTRIBUTES, state)


def test_other_shapes_are_named(trained):
    state = dict(trained.state_dict())
    key = next(key for key in state if key.startswith("head.") and state[key].ndim)
    state[key] = torch.zeros(1)
    with pytest.raises(WeightsMismatch, match=f"1 other shape, e.g. {key}"):
        rebuild_network(CONFIG, ATTRIBUTES, state)


def test_a_weights_file_of_another_network_is_refused_naming_it(trained, tmp_path):
    weights = tmp_path / "model.pt"
    torch.save(trained.state_dict(), weights)
    rebuilt = load_network(CONFIG, ATTRIBUTES, str(weights))
    assert torch.equal(rebuilt.head.classifier.weight, trained.head.classifier.weight)
    torch.save({"fc.weight": torch.zeros(2, 2)}, weights)
    problem = f"{weights} does not hold the weights of a resnet18 network with 3 attributes: "
    with pytest.raises(ArtifactError, match=problem + ".* missing, e.g. backbone."):
        load_network(CONFIG, ATTRIBUTES, str(weights))


def test_scorer_is_the_network_on_normalised_pixels(trained):
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 32, 16, 3), np.uint8))
    with torch.no_grad():
        expected = trained(normalize(pixels))
    scorer = Scorer(trained)
    scores = scorer.score(pixels)
    assert set(scores) == {"shared", "specific"} and scores["shared"].dtype == np.float32
    np.testing.assert_array_equal(scores["shared"], expected.shared.numpy())
    np.testing.assert_array_equal(scores["specific"], expected.specific.numpy())
    np.testing.assert_array_equal(
        scorer.forward(normalize(pixels)).specific.numpy(), expected.specific.numpy()
    )
