"""Hyperparameter search: the space file, one trial's stage 2, and real searches on local Ray."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pytest
import ray._private.state as ray_state
import ray.tune
from mlflow.tracking import MlflowClient
from ray.util import placement_group_table
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from campar_ray.cfar.fit import fit_cfar
from campar_ray.config import Config, load_config
from campar_ray.data.synthetic import generate_synthetic
from campar_ray.train.logits import SplitLogits, logits_path, write_split_logits
from campar_ray.tune import SearchSpaceError, load_search_space, run_search
from campar_ray.tune.full_trial import FullTrial
from campar_ray.tune.report import best_row, param_importances, trial_row
from campar_ray.tune.space import parse_entry
from campar_ray.tune.stage2 import fit_cfar_on_val
from campar_ray.tune.trials import (
    TrialContext,
    max_concurrent_trials,
    trial_bundles,
    trial_footprint,
)

SETS = np.array([[1, 1, 0, 0, 1, 0], [0, 0, 1, 1, 0, 0], [1, 0, 1, 0, 0, 1], [0, 1, 0, 1, 1, 1]])
ATTRIBUTES = tuple(f"attr{j}" for j in range(SETS.shape[1]))
BASE = Config().override(
    {"cfar": {"solver": "local", "iterations": 5, "fc2_epochs": 40, "keys": 8}}
)


def write_tiny_run(run_dir: Path, seed: int = 0) -> None:
    """Labels from four attribute sets (correlated attributes), noisy independent logits."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", 200), ("val", 80), ("test", 80)):
        labels = SETS[rng.integers(len(SETS), size=n)] ^ (rng.random((n, SETS.shape[1])) < 0.05)
        specific = 1.2 * (2.0 * labels - 1.0) + rng.normal(scale=1.4, size=labels.shape)
        write_split_logits(
            logits_path(str(run_dir), split),
            SplitLogits(
                images=[f"{split}/{i}.jpg" for i in range(n)],
                labels=labels.astype(np.int8),
                shared=(specific + 0.3 * rng.normal(size=labels.shape)).astype(np.float32),
                specific=specific.astype(np.float32),
                attributes=ATTRIBUTES,
                eval_attributes=ATTRIBUTES,
            ),
        )


def _space_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


# --- the search space ---------------------------------------------------------------------


def test_default_space_covers_both_stages_and_starts_at_the_defaults():
    cfar = load_search_space(None, Config(), "cfar")
    full = load_search_space(None, Config(), "full")
    assert cfar.keys == [key for key in full.keys if key.startswith("cfar.")]
    assert {"cfar.alpha", "cfar.lam", "cfar.factors", "cfar.keys", "cfar.threshold"} <= set(
        cfar.keys
    )
    assert {"cfar.lookup", "cfar.fc2_lr", "train.lr", "train.weight_decay"} <= set(full.keys)
    assert {"model.fusion", "model.head", "model.backbone", "data.image_size"} <= set(full.keys)
    assert set(cfar.skipped) == set(full.keys) - set(cfar.keys)
    start = full.start_point(Config())
    assert start is not None and full.apply(Config(), start) == Config()


def test_list_choices_travel_as_text_and_come_back_typed():
    param = parse_entry("data.image_size", {"choice": [[32, 16], [64, 32]]}, Config())
    assert param.distribution().choices == ("[32, 16]", "[64, 32]")
    assert param.decode("[64, 32]") == (64, 32)
    assert param.encode((32, 16)) == "[32, 16]" and param.encode((1, 1)) is None


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("cfar.alfa: {uniform: [1, 2]}", "'cfar.alfa' is not a config key; searchable keys: "),
        ("train.epochs: {int: [1, 5]}", "'train.epochs' is not searchable"),
        ("cfar.alpha: {normal: [1, 2]}", "unknown distribution 'normal'; valid: uniform, "),
        ("cfar.alpha: {uniform: [5, 1]}", "low 5.0 must be below high 1.0"),
        ("train.lr: {loguniform: [0, 0.1]}", "loguniform needs low > 0"),
        (
            "cfar.factors: {uniform: [4, 8]}",
            "uniform does not suit int values; use int, logint, choice",
        ),
        (
            "cfar.alpha: {int: [1, 8]}",
            "int does not suit float values; use uniform, loguniform, choice",
        ),
        ("cfar.factors: {int: [4, 8.5]}", "int needs [low, high] as two ints"),
        ("model.fusion: {uniform: [0, 1]}", "uniform does not suit bool values; use choice"),
        ("cfar.fc2_lr: {loguniform: [1e-3, one]}", "loguniform needs [low, high] as two floats"),
        ("cfar.lookup: {choice: [dictionary, nearest]}", "lookup must be one of dictionary, "),
        ("cfar.threshold: {uniform: [0.2, 1.5]}", "threshold p_t must lie in (0, 1)"),
        ("cfar.alpha: 3.0", "must be one mapping {distribution: arguments}"),
    ],
)
def test_bad_entries_name_the_entry_and_the_valid_options(tmp_path, entry, message):
    with pytest.raises(SearchSpaceError, match="search space entry") as error:
        load_search_space(_space_file(tmp_path, entry), Config(), "full")
    assert message in str(error.value)
    if "searchable keys" in message:
        assert "cfar.alpha" in str(error.value) and "train.epochs" not in str(error.value)


def test_scope_cfar_needs_a_stage2_entry_and_files_must_exist(tmp_path):
    with pytest.raises(SearchSpaceError, match="scope 'cfar' searches stage 2 only"):
        load_search_space(
            _space_file(tmp_path, "train.lr: {loguniform: [1e-5, 1e-3]}"), BASE, "cfar"
        )
    with pytest.raises(SearchSpaceError, match="search space file not found"):
        load_search_space(str(tmp_path / "missing.yaml"), BASE, "cfar")


# --- resources, one trial, the table ------------------------------------------------------


def test_concurrency_follows_the_free_resources_and_what_a_trial_holds():
    full = trial_footprint(Config().override({"train.cpus_per_worker": 0.5}), "full")
    assert full == {"CPU": 1.0 + 1.0 + 0.5 + 1 * 0.5, "GPU": 0.0}  # trial, ALS, worker, decode
    assert trial_bundles(BASE) == [{"CPU": 1.0}]  # local ALS: no actors to place
    assert trial_bundles(Config()) == [{"CPU": 1.0}, {"CPU": 0.5}, {"CPU": 0.5}]
    assert max_concurrent_trials({"CPU": 16.0}, trial_footprint(BASE, "cfar")) == 16
    assert max_concurrent_trials({"CPU": 7.0, "GPU": 2.0}, {"CPU": 3.0, "GPU": 1.0}) == 2
    assert max_concurrent_trials({"CPU": 0.5}, {"CPU": 3.0, "GPU": 0.0}) == 1


def test_a_trial_scores_validation_only_and_matches_fit_cfar(tmp_path):
    run = tmp_path / "run"
    write_tiny_run(run)
    metrics = fit_cfar_on_val(str(run), str(tmp_path / "trial"), BASE.cfar, seed=0)
    reference = fit_cfar(str(run), BASE.cfar, seed=0).metrics
    val = reference["val"][reference["selected"]]
    assert metrics["val_mA"] == pytest.approx(val["mA"], abs=1e-12)
    assert metrics["val_f1"] == pytest.approx(val["f1"], abs=1e-12)
    assert metrics["threshold"] == reference["thresholds"][reference["selected"]]
    assert not any("test" in key for key in metrics)
    saved = json.loads((tmp_path / "trial" / "metrics.json").read_text())
    assert saved["metrics"] == metrics and saved["config"]["alpha"] == BASE.cfar.alpha


def test_rows_rank_complete_trials_only_and_explain_importance():
    space = load_search_space(None, BASE, "cfar")
    sampler = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    rows = []
    for number in range(12):
        sampled = sampler.ask(space.distributions()).params
        value = 0.6 + 0.1 * np.log10(sampled["cfar.alpha"])  # only alpha matters
        done = {"complete": True, "done": True, "val_mA": value, "timestamp": number}
        rows.append(trial_row(f"t{number}", sampled, done, None, space))
    sampled = {key: rows[0][key] for key in space.keys}
    rows.append(trial_row("asha", sampled, {"val_mA": 0.99, "done": True}, None, space))
    rows.append(trial_row("cut", sampled, {"val_mA": 0.99}, None, space))
    rows.append(trial_row("bad", sampled, {}, RuntimeError("boom"), space))
    assert [row["status"] for row in rows[-3:]] == ["stopped", "unfinished", "error"]
    best = max(rows[:12], key=lambda row: row["val_mA"])
    assert best_row(rows, "val_mA")["trial_id"] == best["trial_id"]
    importances = param_importances(rows, space, "val_mA", seed=0)
    assert set(importances) == set(space.keys)
    assert max(importances, key=importances.get) == "cfar.alpha"


# --- real searches ------------------------------------------------------------------------


class InterruptAfter(ray.tune.Callback):
    """Ctrl+C after ``count`` trials complete, once (a marker file outlives the resume,
    which restores this callback with the rest of the search's settings)."""

    def __init__(self, count: int, marker: Path):
        self.count, self.marker, self.seen = count, marker, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.seen += 1
        if self.seen == self.count and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture(scope="module")
def resumed_search(ray_cluster, tmp_path_factory):
    """An 8-trial cfar search interrupted after 3 trials, then resumed to the end."""
    run = tmp_path_factory.mktemp("tune") / "run"
    write_tiny_run(run)
    common = {"run_dir": str(run), "scope": "cfar", "num_samples": 8, "seed": 0}
    marker = run / "interrupted"
    first = run_search(
        _tracked(BASE, run),
        **common,
        max_concurrent=2,
        callbacks=[InterruptAfter(3, marker)],
        progress=False,
    )
    done_first = pd.read_parquet(first.table).query("status == 'complete'")
    stamps = {
        trial: os.path.getmtime(run / "tune" / "trials" / trial / "cfar" / "metrics.json")
        for trial in done_first.trial_id
    }
    second = run_search(_tracked(BASE, run), **common, resume=True, progress=False)
    return run, first, done_first, stamps, second


def _tracked(config: Config, run: Path) -> Config:
    """``config`` logging to an MLflow store next to the run directory."""
    return config.override({"tracking.mlflow_uri": f"sqlite:///{run.parent}/mlflow.db"})


def _mlflow_runs(run: Path, experiment: str) -> list[Any]:
    client = MlflowClient(_tracked(BASE, run).tracking.mlflow_uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


@pytest.mark.ray
def test_an_interrupted_search_resumes_where_it_stopped(resumed_search):
    run, first, done_first, stamps, second = resumed_search
    assert not first.complete and first.best_config is None and not first.test
    assert len(done_first) >= 3
    table = pd.read_parquet(second.table)
    assert second.complete and len(table) == 8 and set(table.status) == {"complete"}
    assert set(done_first.trial_id) <= set(table.trial_id)
    for trial, stamp in stamps.items():  # finished trials were not run again
        assert os.path.getmtime(run / "tune" / "trials" / trial / "cfar" / "metrics.json") == stamp
    with pytest.raises(FileExistsError, match="add --resume"):
        run_search(BASE, run_dir=str(run), scope="cfar", num_samples=8, progress=False)


@pytest.mark.ray
def test_each_trial_is_one_mlflow_run_of_the_search_experiment_across_the_resume(
    resumed_search,
):
    run, _, _, _, second = resumed_search
    table = pd.read_parquet(second.table).set_index("trial_id")
    runs = {r.info.run_name: r for r in _mlflow_runs(run, "campar-search-run")}
    assert sorted(runs) == sorted(table.index)  # 8 runs: the resume added none twice
    for trial_id, mlflow_run in runs.items():
        assert mlflow_run.info.status == "FINISHED"
        assert mlflow_run.data.metrics["trial/val_mA"] == table.loc[trial_id, "val_mA"]
        alpha = float(mlflow_run.data.params["cfar.alpha"])
        assert alpha == pytest.approx(table.loc[trial_id, "cfar.alpha"])
        events = EventAccumulator(str(run / "tune" / "trials" / trial_id / "tensorboard" / "trial"))
        events.Reload()
        assert events.Scalars("trial/val_mA")[0].value == pytest.approx(
            mlflow_run.data.metrics["trial/val_mA"]
        )
    # The best configuration's refit (the one test score) is a CFAR fit of the base experiment.
    (refit,) = _mlflow_runs(run, "campar")
    selected = json.loads((run / "cfar" / "metrics.json").read_text())["selected"]
    assert refit.data.metrics[f"final/test/{selected}/mA"] == second.test["test_mA"]
    assert "als_objective" in refit.data.metrics


@pytest.mark.ray
def test_cfar_search_beats_the_defaults_and_its_best_yaml_reproduces(resumed_search, tmp_path):
    run, _, _, _, result = resumed_search
    default = fit_cfar_on_val(str(run), str(tmp_path), BASE.cfar, seed=0)
    assert result.best_val["val_mA"] >= default["val_mA"]
    assert result.best_val["val_mA"] > result.best_val["stage1_val_mA"]

    best = load_config(result.best_config)
    assert best == _tracked(BASE, run).override({**result.best_params, "run.dir": str(run)})
    refit = fit_cfar(best.run.dir, best.cfar, seed=best.seed).metrics
    assert refit["val"][refit["selected"]]["mA"] == pytest.approx(
        result.best_val["val_mA"], abs=1e-12
    )
    assert result.test == {f"test_{k}": v for k, v in refit["test"][refit["selected"]].items()}

    tune_dir = run / "tune"
    for name in ("trials.csv", "history.png", "importances.png", "summary.json", "search.json"):
        assert (tune_dir / name).stat().st_size > 0
    summary = json.loads((tune_dir / "summary.json").read_text())
    assert summary["best_trial"] == result.best_trial and summary["test"] == result.test


@pytest.fixture(scope="module")
def stage1_base(tmp_path_factory) -> Config:
    """A stage-1 recipe small enough for tests: 120 images of 32 x 16, ResNet-18, no fusion."""
    data = tmp_path_factory.mktemp("synthetic")
    manifest = generate_synthetic(str(data), n=120, size=(32, 16), seed=0)
    return BASE.override(
        {
            "model": {"backbone": "resnet18", "fusion": False},
            "data": {"manifest": manifest, "image_size": [32, 16], "pad": 2},
            "train": {"epochs": 1, "batch_size": 32, "lr": 1e-3, "cpus_per_worker": 0.5},
        }
    )


@pytest.mark.ray
def test_full_search_trains_stage1_per_trial_then_stage2(ray_cluster, stage1_base, tmp_path):
    space = _space_file(
        tmp_path,
        "train.lr: {loguniform: [0.0001, 0.01]}\nmodel.head: {choice: [campar, baseline]}\n"
        "cfar.alpha: {loguniform: [1, 30]}\n",
    )
    actors_before, groups_before = _alive_actors(), _live_placement_groups()
    result = run_search(
        _tracked(stage1_base, tmp_path / "run"),
        run_dir=str(tmp_path / "run"),
        scope="full",
        num_samples=2,
        search_space=space,
        seed=0,
        progress=False,
    )
    table = pd.read_parquet(result.table).set_index("trial_id")
    assert result.complete and len(table) == 2 and result.counts["error"] == 0
    best = table.loc[result.best_trial]
    assert best["status"] == "complete" and best["training_iteration"] == 2  # epoch, then 1 + 2
    trial_dir = Path(best["trial_dir"])
    assert (trial_dir / "logits" / "val.parquet").exists()
    assert (trial_dir / "cfar" / "metrics.json").exists() and result.test
    assert load_config(result.best_config).run.dir == str(trial_dir)
    # One MLflow run per trial: stage 1's epochs (rank 0 of its Train run), then the trial's result.
    runs = {r.info.run_name: r for r in _mlflow_runs(tmp_path / "run", "campar-search-run")}
    assert sorted(runs) == sorted(table.index)
    tracked = runs[result.best_trial].data.metrics
    assert tracked["epoch"] == 1 and "train_loss" in tracked and "data_wait_fraction" in tracked
    assert tracked["trial/val_mA"] == best["val_mA"] and "final/val_mA" in tracked  # + stage 1
    _assert_nothing_left(actors_before, groups_before)


@pytest.mark.ray
def test_a_trial_stopped_mid_training_frees_its_train_run(ray_cluster, stage1_base, tmp_path):
    base = stage1_base.override({"train.epochs": 2})
    space = load_search_space(_space_file(tmp_path, "cfar.alpha: {uniform: [1, 30]}"), base, "full")
    context = TrialContext(base, space, str(tmp_path), str(tmp_path / "trials"), "stopped")
    actors_before, groups_before = _alive_actors(), _live_placement_groups()
    grid = ray.tune.Tuner(
        ray.tune.with_parameters(FullTrial, context=context),
        param_space={"cfar.alpha": 10.0},
        run_config=ray.tune.RunConfig(
            storage_path=str(tmp_path / "tune"),
            stop={"training_iteration": 1},
            checkpoint_config=ray.tune.CheckpointConfig(checkpoint_at_end=False),
            verbose=0,
        ),
    ).fit()
    assert grid[0].error is None and grid[0].metrics["epoch"] == 1  # stopped like ASHA does
    assert not grid[0].metrics.get("complete")
    _assert_nothing_left(actors_before, groups_before)


def _assert_nothing_left(actors_before: dict[str, str], groups_before: set[str]) -> None:
    """No Train controller, worker, helper or placement group outlives the trials.

    Actors die asynchronously once their owner has, so this waits a little for them. (Ray's
    state API needs the dashboard, which the shared test cluster runs without, so this reads
    the GCS tables directly.)
    """
    deadline = time.monotonic() + 30
    while True:
        new = {a: name for a, name in _alive_actors().items() if a not in actors_before}
        leaked = {name for name in new.values() if name not in CLUSTER_SINGLETONS}
        groups = _live_placement_groups() - groups_before
        if not (leaked or groups) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not groups and not leaked


CLUSTER_SINGLETONS = {"_StatsActor", "_AutoscalingCoordinatorActor"}
"""Ray Data's per-cluster actors: started by the first dataset, kept on purpose."""


def _alive_actors() -> dict[str, str]:
    return {
        actor_id: actor["ActorClassName"]
        for actor_id, actor in ray_state.actors().items()
        if actor["State"] == "ALIVE"
    }


def _live_placement_groups() -> set[str]:
    return {pg for pg, info in placement_group_table().items() if info["state"] != "REMOVED"}
