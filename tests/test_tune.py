"""Hyperparameter search: the space file, one trial's stage 2, and real searches on local Ray."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pytest
import ray
import ray._private.state as ray_state
import ray.tune
from cli_checks import Payload, one_line
from mlflow.tracking import MlflowClient
from multinode import wait_for
from ray.util import placement_group_table
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from campar_ray.cfar.fit import fit_cfar, load_cfar
from campar_ray.cli import main as cli_main
from campar_ray.config import Config, load_config
from campar_ray.data.synthetic import generate_synthetic
from campar_ray.decision import cfar_logits
from campar_ray.run.layout import RunDir
from campar_ray.run.logits import SplitLogits, read_split_logits, write_split_logits
from campar_ray.tracking import KEY_TAG, SUPERSEDED_TAG, run_key
from campar_ray.tune import SearchResult, SearchSpaceError, load_search_space, run_search
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
            RunDir(str(run_dir)).logits(split),
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
        ("train.weight_decay: {loguniform: [0, 0.1]}", "loguniform needs low > 0"),
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
        (
            "cfar.lookup: {choice: [dictionary, nearest]}",
            "cfar.lookup: expected one of dictionary, ",
        ),
        ("cfar.threshold: {uniform: [0.2, 1.5]}", "bad value 1.5 for cfar.threshold: expected a "),
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
    ray_als = Config().override({"cfar.solver": "ray", "train.cpus_per_worker": 0.5})
    full = trial_footprint(ray_als, "full")
    assert full == {"CPU": 1.0 + 1.0 + 0.5 + 1 * 0.5, "GPU": 0.0}  # trial, ALS, worker, decode
    assert trial_bundles(BASE) == [{"CPU": 1.0}]  # local ALS: no actors to place
    assert trial_bundles(Config()) == [{"CPU": 1.0}]  # auto: a trial fits ALS in its process
    assert trial_bundles(ray_als) == [{"CPU": 1.0}, {"CPU": 0.5}, {"CPU": 0.5}]
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


@pytest.mark.parametrize("lookup", ["dictionary", "fold-in"])
def test_a_trial_saves_the_model_fit_cfar_saves(tmp_path, lookup):
    """Same files, same arrays: a search scores exactly the model ``fit-cfar`` builds."""
    run = tmp_path / "run"
    write_tiny_run(run)
    cfg = dataclasses.replace(BASE.cfar, lookup=lookup)
    fit_cfar_on_val(str(run), str(tmp_path / "trial" / "cfar"), cfg, seed=0)
    fit_cfar(str(run), cfg, seed=0)
    trial, cli = tmp_path / "trial" / "cfar", run / "cfar"
    for name in ("factors.npz", "dictionary.npz", "fc2.npz"):
        with np.load(trial / name) as ours, np.load(cli / name) as theirs:
            assert set(ours.files) == set(theirs.files) - {"X"}, name  # a trial keeps no X
            for key in ours.files:
                np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"{name}:{key}")
    ours, theirs = (json.loads((d / "cfar.json").read_text()) for d in (trial, cli))
    assert ours["fc2"][lookup] == theirs["fc2"][lookup]
    for key in ("config", "seed", "attributes", "als", "keys_used", "threshold"):
        assert ours[key] == theirs[key], key
    test = cfar_logits(read_split_logits(RunDir(str(run)).logits("test")))
    np.testing.assert_array_equal(
        load_cfar(str(tmp_path / "trial")).probabilities(test),
        load_cfar(str(run)).probabilities(test),
    )


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


def _terminate_after(count: int, run: Path) -> tuple[int, str]:
    """``campar tune`` (``_cli_args``) in its own process on the session's cluster, sent
    SIGTERM as a scheduler stopping the job would, once ``count`` trials are complete in its
    ``trials.json``: its exit code and stderr."""
    argv = [str(Path(sys.executable).with_name("campar")), "tune", *_cli_args(run)]
    argv += ["--address", ray.get_runtime_context().gcs_address]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def complete() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"campar tune ended before SIGTERM:\n{process.stderr.read()}")
        try:
            trials = json.loads((run / "tune" / "trials.json").read_text())["trials"]
        except (FileNotFoundError, json.JSONDecodeError):  # not yet, or being written
            return False
        return sum(trial["status"] == "complete" for trial in trials) >= count

    try:
        wait_for(complete, timeout=600, what=f"{count} complete trials")
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=300)
    finally:
        process.kill()
    return process.returncode, err


@dataclass(frozen=True)
class Resumed:
    run: Path
    first: SearchResult
    stopped: tuple[int, str]
    """``campar tune``'s exit code and stderr after SIGTERM."""
    first_table: pd.DataFrame
    done_first: pd.DataFrame
    stamps: dict[str, float]
    folders_before: set[str]
    planted: list[Path]
    payload_marker: Path
    second: SearchResult


@pytest.fixture(scope="module")
def resumed_search(ray_cluster, tmp_path_factory):
    """An 8-trial cfar search stopped by SIGTERM after 3 trials, its tune state's pickles
    replaced by a payload, then resumed to the end with ``campar tune --resume``."""
    run = tmp_path_factory.mktemp("tune") / "run"
    write_tiny_run(run)
    stopped = _terminate_after(3, run)
    first = _summary_result(run)
    first_table = pd.read_parquet(first.table)
    done_first = first_table.query("status == 'complete'")
    stamps = {
        trial: os.path.getmtime(run / "tune" / "trials" / trial / "cfar" / "metrics.json")
        for trial in done_first.trial_id
    }
    folders_before = {path.name for path in (run / "tune" / "trials").iterdir()}
    marker = run.parent / "payload-ran"
    planted = _plant_payloads(run / "tune", marker)
    assert cli_main(["tune", *_cli_args(run), "--resume"]) == 0
    second = _summary_result(run)
    return Resumed(
        run, first, stopped, first_table, done_first, stamps, folders_before, planted, marker,
        second,
    )  # fmt: skip


def _plant_payloads(tune_dir: Path, marker: Path) -> list[Path]:
    """Every pickle of the tune state, and Ray's ``search/tuner.pkl``, replaced by a payload."""
    targets = set(tune_dir.rglob("*.pkl")) | {tune_dir / "search" / "tuner.pkl"}
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(Payload(marker)))
    return sorted(targets)


def _cli_args(run: Path) -> list[str]:
    """``campar tune`` arguments repeating the fixture's search (``_tracked(BASE, run)``)."""
    sets = {
        "cfar.solver": "local",
        "cfar.iterations": 5,
        "cfar.fc2_epochs": 40,
        "cfar.keys": 8,
        "tracking.mlflow_uri": _tracked(BASE, run).tracking.mlflow_uri,
    }
    args = ["--run-dir", str(run), "--scope", "cfar", "--num-samples", "8"]
    return args + [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def _summary_result(run: Path) -> SearchResult:
    summary = json.loads((run / "tune" / "summary.json").read_text())
    return SearchResult(**{f.name: summary[f.name] for f in dataclasses.fields(SearchResult)})


def _tracked(config: Config, run: Path) -> Config:
    """``config`` logging to an MLflow store next to the run directory."""
    return config.override({"tracking.mlflow_uri": f"sqlite:///{run.parent}/mlflow.db"})


def _mlflow_runs(run: Path, experiment: str) -> list[Any]:
    client = MlflowClient(_tracked(BASE, run).tracking.mlflow_uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


@pytest.mark.ray
def test_an_interrupted_search_resumes_where_it_stopped(resumed_search):
    """The resume replays the finished trials from trials.json and runs only the rest."""
    search = resumed_search
    run, first, done_first, second = search.run, search.first, search.done_first, search.second
    assert not first.complete and first.best_config is None and not first.test
    assert len(done_first) >= 3
    table = pd.read_parquet(second.table)
    assert second.complete and len(table) == 8 and set(table.status) == {"complete"}
    assert set(done_first.trial_id) <= set(table.trial_id)
    for trial, stamp in search.stamps.items():  # finished trials were not run again
        assert os.path.getmtime(run / "tune" / "trials" / trial / "cfar" / "metrics.json") == stamp
    # Only the remaining budget ran: one new trial folder per trial still to do.
    new = {path.name for path in (run / "tune" / "trials").iterdir()}
    new -= search.folders_before
    assert new == set(table.trial_id) - set(done_first.trial_id)
    assert len(new) == 8 - len(done_first)
    record = json.loads((run / "tune" / "trials.json").read_text())["trials"]
    assert sorted(entry["trial_id"] for entry in record) == sorted(table.trial_id)
    with pytest.raises(FileExistsError, match="add --resume"):
        run_search(BASE, run_dir=str(run), scope="cfar", num_samples=8, progress=False)


@pytest.mark.ray
def test_sigterm_stops_a_search_in_one_line_saying_how_to_resume(resumed_search):
    """SIGTERM (a scheduler's stop) ends ``campar tune`` like Ctrl-C, not with Ray's C++ stack
    dump and exit 134: Tune stops the search, the finished trials stay in ``trials.json`` and
    one line says so; the fixture's ``--resume`` then completes it."""
    code, err = resumed_search.stopped
    record = resumed_search.run / "tune" / "trials.json"
    assert code == 143 and "Traceback" not in err and "*** SIG" not in err, err  # no stack dump
    assert one_line(err) == (
        f"campar tune: stopped by SIGTERM; finished trials are kept in {record}; add --resume "
        "to run the rest"
    )
    assert resumed_search.second.complete


@pytest.mark.ray
def test_resume_never_unpickles_the_run_directory(resumed_search, tmp_path):
    """Payloads planted in tuner.pkl and every other pickle of the tune state never ran."""
    planted = resumed_search.planted
    assert resumed_search.run / "tune" / "search" / "tuner.pkl" in planted
    assert any("searcher-state" in path.name for path in planted)  # Ray's own pickles too
    assert resumed_search.second.complete and not resumed_search.payload_marker.exists()
    live = tmp_path / "live"  # the payload is live: loading it would have left the marker
    pickle.loads(pickle.dumps(Payload(live)))
    assert live.exists()


@pytest.mark.ray
@pytest.mark.parametrize(
    ("name", "tamper", "message"),
    [
        (
            "trials.json",
            lambda r: r["trials"][0]["params"].update({"cfar.factors": "8"}),
            "is not a value of the search space",
        ),
        (
            "trials.json",
            lambda r: r["trials"][0]["params"].update({"cfar.bogus": 1.0}),
            "params must hold exactly the searched keys",
        ),
        (
            "trials.json",
            lambda r: r["trials"][0]["params"].update({"cfar.alpha": 1e6}),
            "cfar.alpha = 1000000.0 is not a value of the search space",
        ),
        (
            "trials.json",
            lambda r: r["trials"][1]["metrics"].update({"val_mA": "high"}),
            "metric val_mA must be a finite number",
        ),
        (
            "trials.json",
            lambda r: r["trials"][2]["info"].update({"trial_dir": "/tmp/elsewhere"}),
            "trial_dir must be",
        ),
        ("trials.json", "pickle", "is not valid JSON"),
        ("search.json", "pickle", "is not valid JSON"),
    ],
    ids=["type", "unknown-key", "outside-space", "metric", "trial-dir", "pickle", "settings"],
)
def test_tampered_tune_state_is_refused_in_one_line(
    resumed_search, capsys, tmp_path, name, tamper, message
):
    run, path = resumed_search.run, resumed_search.run / "tune" / name
    original = path.read_bytes()
    marker = tmp_path / "payload-ran"
    try:
        if tamper == "pickle":
            path.write_bytes(pickle.dumps(Payload(marker)))
        else:
            record = json.loads(original)
            tamper(record)
            path.write_text(json.dumps(record))
        before = _snapshot(run)
        capsys.readouterr()
        assert cli_main(["tune", *_cli_args(run), "--resume"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("campar tune: error: ") and "\n" not in err
        assert message in err and str(path) in err
        assert _snapshot(run) == before and not marker.exists()
    finally:
        path.write_bytes(original)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in folder.rglob("*")
        if path.is_file()
    }


@pytest.mark.ray
def test_each_trial_is_one_mlflow_run_of_the_search_experiment_across_the_resume(
    resumed_search,
):
    run, second = resumed_search.run, resumed_search.second
    table = pd.read_parquet(second.table).set_index("trial_id")
    runs = {r.info.run_name: r for r in _mlflow_runs(run, "campar-search-run")}
    # One run per trial of the table, none twice; a trial interrupted mid-way may have left
    # a run of its own behind, since the resume reran it as a new trial (from its start).
    first = resumed_search
    unfinished = set(first.first_table.trial_id) - set(first.done_first.trial_id)
    assert set(table.index) <= set(runs) and set(runs) - set(table.index) <= unfinished
    for trial_id in table.index:
        mlflow_run = runs[trial_id]
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
def test_a_search_started_over_opens_new_mlflow_runs_and_keeps_the_old_ones(ray_cluster, tmp_path):
    """``tune/`` deleted (as the refusal to start a second search says) and searched again
    with ``campar tune``: the old trials' runs are retired with their metrics, not continued."""
    run = tmp_path / "run"
    write_tiny_run(run)
    common = {"run_dir": str(run), "scope": "cfar", "num_samples": 1, "seed": 0}
    run_search(_tracked(BASE, run), **common, progress=False)
    old = _mlflow_runs(run, "campar-search-run")
    shutil.rmtree(run / "tune")
    argv = _cli_args(run)
    argv[argv.index("--num-samples") + 1] = "1"
    assert cli_main(["tune", *argv]) == 0
    runs = {r.info.run_id: r for r in _mlflow_runs(run, "campar-search-run")}
    (new,) = set(runs) - {r.info.run_id for r in old}
    assert runs[new].data.tags[KEY_TAG] == run_key(runs[new].data.tags["campar.run_dir"])
    assert runs[new].data.metrics["trial/val_mA"] > 0
    for before in old:
        after = runs[before.info.run_id]
        assert KEY_TAG not in after.data.tags
        assert after.data.tags[SUPERSEDED_TAG] == before.data.tags[KEY_TAG]
        assert after.data.metrics == before.data.metrics and after.info.status == "FINISHED"


@pytest.mark.ray
def test_cfar_search_beats_the_defaults_and_its_best_yaml_reproduces(resumed_search, tmp_path):
    run, result = resumed_search.run, resumed_search.second
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
