"""The typed configuration: defaults, YAML, overrides, refusal of unknown keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from campar_ray import __version__
from campar_ray.cli import main
from campar_ray.config import (
    CHOICES,
    Config,
    ConfigError,
    config_keys,
    describe_keys,
    load_config,
)

ARCHITECTURE_KEYS = [
    "model.backbone",
    "model.weights",
    "model.head",
    "model.fusion",
    "data.manifest",
    "data.image_size",
    "train.epochs",
    "train.batch_size",
    "train.lr",
    "train.num_workers",
    "train.use_gpu",
    "run.dir",
    "cfar.alpha",
    "cfar.lam",
    "cfar.factors",
    "cfar.keys",
    "cfar.threshold",
    "cfar.lookup",
    "cfar.actors",
    "seed",
]


def test_every_documented_key_exists():
    assert set(ARCHITECTURE_KEYS) <= set(config_keys())


def test_defaults_are_the_reference_recipe():
    config = Config()
    assert config.model.backbone == "resnet50"
    assert config.data.image_size == (256, 192)
    assert (config.train.lr, config.train.weight_decay, config.train.batch_size) == (1e-4, 5e-4, 64)
    assert config.train.epochs == 30


def test_yaml_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": 0.01, "epochs": 3}, "seed": 7}))
    config = load_config(path, ["train.lr=0.5", "data.image_size=[64, 32]", "model.fusion=false"])
    assert config.train.lr == 0.5
    assert config.train.epochs == 3
    assert config.seed == 7
    assert config.data.image_size == (64, 32)
    assert config.model.fusion is False


def test_saved_config_loads_back_identically(tmp_path):
    config = load_config(None, ["cfar.keys=5", "model.fusion_size=[8, 4]", "run.dir=/tmp/x"])
    config.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_unknown_key_names_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'.*train\.lr"):
        load_config(None, ["train.lrr=1"])


@pytest.mark.parametrize(
    "override",
    ["train.epochs=1.5", "model.fusion=3", "data.image_size=[1]", "train.lr=fast", "novalue"],
)
def test_bad_values_are_refused_with_the_key(override):
    with pytest.raises(ConfigError):
        load_config(None, [override])


def test_num_workers_is_a_count_or_an_elastic_range():
    fixed = load_config(None, ["train.num_workers=3"]).train
    assert (fixed.num_workers, fixed.min_workers, fixed.max_workers) == (3, 3, 3)
    elastic = load_config(None, ["train.num_workers=1..4"]).train
    assert (elastic.num_workers, elastic.min_workers, elastic.max_workers) == ("1..4", 1, 4)
    assert Config().override({"train": {"num_workers": "2..2"}}).train.max_workers == 2


@pytest.mark.parametrize("value", ["0", "3..2", "0..2", "two", "1..", "1...2", "1.5", "true"])
def test_bad_worker_counts_are_refused_with_the_valid_forms(value):
    with pytest.raises(ConfigError, match=r"train\.num_workers"):
        load_config(None, [f"train.num_workers={value}"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_reference_recipe_is_the_baseline_15_classifier_with_the_floorless_cam():
    from campar_ray.model import build_model

    config = load_config(
        Path(__file__).parents[1] / "configs" / "reference.yaml",
        ["model.backbone=resnet18", "model.weights=none", "model.fusion=false"],
    )
    assert (config.train.loss, config.train.lr, config.train.weight_decay) == (
        "weighted_bce",
        1e-4,
        5e-4,
    )
    assert (config.train.batch_size, config.train.epochs, config.train.scheduler) == (
        64,
        30,
        "plateau",
    )
    head = build_model(config.model, 7).head
    assert head.cam_norm == "min-max" and head.logit_norm is not None
    assert not config.model.prior_bias


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed=-1", "bad value -1 for seed: expected an integer in [0, 2**32)"),
        ("seed=4294967296", "bad value 4294967296 for seed: expected an integer in [0, 2**32)"),
        ("cfar.alpha=-0.5", "bad value -0.5 for cfar.alpha: expected a confidence slope >= 0"),
        ("cfar.alpha=.inf", "bad value inf for cfar.alpha: expected a confidence slope >= 0"),
        ("cfar.lam=0", "bad value 0.0 for cfar.lam: expected a regularisation > 0 (keeps every "
         "D x D system invertible)"),
        ("cfar.factors=0", "bad value 0 for cfar.factors: expected a latent dimension in "
         "[1, 1024]"),
        ("cfar.keys=0", "bad value 0 for cfar.keys: expected a dictionary size in [1, 100000]"),
        ("cfar.threshold=0", "bad value 0.0 for cfar.threshold: expected a threshold p_t in "
         "(0, 1)"),
        ("cfar.threshold=.nan", "bad value nan for cfar.threshold: expected a threshold p_t in "
         "(0, 1)"),
        ("cfar.actors=0", "bad value 0 for cfar.actors: expected a number of actors >= 1"),
        ("cfar.iterations=0", "bad value 0 for cfar.iterations: expected a number of iterations "
         ">= 1"),
        ("cfar.tol=-1e-6", "bad value -1e-06 for cfar.tol: expected a relative change >= 0"),
        ("cfar.fc2_lr=0", "bad value 0.0 for cfar.fc2_lr: expected a learning rate > 0"),
        ("cfar.fc2_epochs=-1", "bad value -1 for cfar.fc2_epochs: expected a number of epochs "
         ">= 0"),
    ],
)  # fmt: skip
def test_seed_and_cfar_numbers_out_of_range_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert str(error.value) == message


def test_seed_and_cfar_ranges_accept_their_edges():
    edges = [
        "seed=0", "cfar.alpha=0", "cfar.factors=1", "cfar.keys=1", "cfar.threshold=0.001",
        "cfar.threshold=0.999", "cfar.actors=1", "cfar.iterations=1", "cfar.tol=0",
        "cfar.fc2_epochs=0",
    ]  # fmt: skip
    config = load_config(None, edges)
    assert (config.seed, config.cfar.alpha, config.cfar.tol, config.cfar.fc2_epochs) == (0, 0, 0, 0)
    assert load_config(None, ["seed=4294967295"]).seed == 2**32 - 1


def test_every_key_is_documented_and_listed_with_type_default_and_choices(capsys):
    keys = describe_keys()
    assert [key.key for key in keys] == config_keys()
    assert all(key.doc for key in keys), [key.key for key in keys if not key.doc]
    assert main(["config", "--keys"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert 'train.scheduler: str = "plateau"  one of: plateau, cosine' in out
    assert "data.image_size: tuple[int, int] = [256, 192]" in out
    at = out.index('cfar.solver: str = "auto"  one of: auto, ray, local, implicit')
    assert out[at + 1].startswith("    `auto` (`local` up to")


@pytest.mark.parametrize("command", ["config", "doctor", "train"])
def test_a_choice_that_does_not_exist_is_refused_by_every_command(command, capsys):
    assert main([command, "--set", "train.scheduler=foo"]) == 2
    assert capsys.readouterr().err == (
        f"campar {command}: error: bad value 'foo' for train.scheduler: expected one of "
        "plateau, cosine\n"
    )


def test_the_code_checks_the_choices_the_config_declares():
    from campar_ray.model import HEADS

    assert tuple(HEADS) == CHOICES["model.head"]  # the others are CHOICES' own tuples
    for key in CHOICES:
        with pytest.raises(ConfigError, match=f"for {key}: expected one of"):
            load_config(overrides=[f"{key}=nothing-valid"])


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out == f"campar {__version__}\n"
