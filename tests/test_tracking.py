"""Experiment tracking (TensorBoard files, MLflow stores) and the data-starvation warning.

No Ray here: the Ray Train, CFAR and search runs are checked where they run (test_train.py,
test_tune.py), on the runs those tests already make.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from campar_ray.config import ConfigError, DataConfig, TrackingConfig
from campar_ray.data.concurrency import decode_tasks
from campar_ray.tracking import (
    KEY_TAG,
    RUN_DIR_TAG,
    SUPERSEDED_TAG,
    open_tracker,
    resolve_tracking,
    retire_runs,
    retire_trials,
    run_key,
    search_experiment,
)
from campar_ray.train.monitor import starvation_warning


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> TrackingConfig:
    """One sqlite MLflow store for the module (creating its tables takes seconds)."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    return resolve_tracking(TrackingConfig(mlflow_uri=f"sqlite:///{path}", experiment="tests"))


def _open(cfg: TrackingConfig, log_dir: Path, key: str | None):
    return open_tracker(cfg, log_dir=str(log_dir), experiment="tests", run_name="r", key=key)


def test_a_restarted_run_continues_its_mlflow_run_and_tensorboard_curve(store, tmp_path):
    key = run_key(str(tmp_path))
    first = _open(store, tmp_path, key)
    first.log_config({"train": {"lr": 0.1, "epochs": 2}, "seed": 0})
    first.log_metrics({"loss": 0.9, "epoch": 1, "trial_dir": "/x", "complete": True}, step=1)
    first.close(finished=False)  # the worker dies here

    again = _open(store, tmp_path, key)  # the restart re-logs its checkpointed history
    again.log_config({"train": {"lr": 0.1, "epochs": 3}, "seed": 0})
    again.log_metrics({"loss": 0.9, "epoch": 1}, step=1)
    again.log_metrics({"loss": 0.5, "epoch": 2}, step=2)
    again.log_final({"loss": 0.5})
    again.log_report("**best** epoch 2")
    again.close()

    assert again.mlflow_run_id == first.mlflow_run_id
    client = MlflowClient(store.mlflow_uri)
    run = client.get_run(first.mlflow_run_id)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(p.step, p.value) for p in history] == [(1, 0.9), (2, 0.5)]
    assert run.data.params == {"train.lr": "0.1", "train.epochs": "2", "seed": "0"}  # immutable
    assert set(run.data.metrics) == {"loss", "epoch", "final/loss"}  # strings and flags left out
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.note.content"] == "**best** epoch 2"

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(p.step, p.value) for p in events.Scalars("loss")] == [
        (1, pytest.approx(0.9)),
        (2, 0.5),
    ]
    report = events.Tensors("report")[-1].tensor_proto.string_val[0].decode()
    assert report == "**best** epoch 2"


def test_runs_without_a_key_or_with_another_key_are_new_runs(store, tmp_path):
    ids = {
        _open(store, tmp_path / name, key).mlflow_run_id
        for name, key in (("a", None), ("b", None), ("c", run_key("c")))
    }
    assert len(ids) == 3


def test_retired_runs_are_not_continued_and_other_runs_are_untouched(store, tmp_path):
    """What ``campar train --fresh`` does to a run directory's MLflow runs."""
    run_dir, other = str(tmp_path / "run"), str(tmp_path / "run2")
    cfg = TrackingConfig(tensorboard=False, mlflow_uri=store.mlflow_uri, experiment="tests")
    trials = search_experiment(cfg, run_dir)
    stage1, finished = _keyed(cfg, run_dir), _keyed(cfg, other)
    finished.close()
    trial = _keyed(cfg, f"{run_dir}/tune/t0", trials)
    stranger = _keyed(cfg, f"{other}/tune/t0", trials)
    retired = retire_runs(cfg, run_dir)
    assert sorted(retired) == sorted([stage1.mlflow_run_id, trial.mlflow_run_id])
    client = MlflowClient(store.mlflow_uri)
    old = client.get_run(stage1.mlflow_run_id)
    assert old.info.status == "KILLED" and KEY_TAG not in old.data.tags  # was left RUNNING
    assert old.data.tags[SUPERSEDED_TAG] == run_key(run_dir)
    assert _keyed(cfg, run_dir).mlflow_run_id != stage1.mlflow_run_id  # a new run from here on
    assert _keyed(cfg, other).mlflow_run_id == finished.mlflow_run_id
    assert client.get_run(finished.mlflow_run_id).info.status == "RUNNING"  # reopened above
    assert client.get_run(stranger.mlflow_run_id).data.tags[KEY_TAG] == run_key(f"{other}/tune/t0")
    assert retire_runs(TrackingConfig(), run_dir) == []  # no MLflow: nothing to do


def test_a_new_search_retires_the_old_trials_but_not_the_run_it_searches_from(store, tmp_path):
    """What a search started in a run directory whose old ``tune/`` was deleted does."""
    run_dir = str(tmp_path / "run")
    cfg = TrackingConfig(tensorboard=False, mlflow_uri=store.mlflow_uri, experiment="tests")
    trials = search_experiment(cfg, run_dir)
    stage1 = _keyed(cfg, run_dir)
    old = _keyed(cfg, f"{run_dir}/tune/trials/t0", trials)
    elsewhere = _keyed(cfg, f"{run_dir}/tuned/t0", trials)  # a sibling folder, not the search's
    assert retire_trials(cfg, run_dir, f"{run_dir}/tune") == [old.mlflow_run_id]
    client = MlflowClient(store.mlflow_uri)
    assert KEY_TAG not in client.get_run(old.mlflow_run_id).data.tags
    assert _keyed(cfg, f"{run_dir}/tune/trials/t0", trials).mlflow_run_id != old.mlflow_run_id
    assert _keyed(cfg, run_dir).mlflow_run_id == stage1.mlflow_run_id
    assert _keyed(cfg, f"{run_dir}/tuned/t0", trials).mlflow_run_id == elsewhere.mlflow_run_id
    assert retire_trials(TrackingConfig(), run_dir, f"{run_dir}/tune") == []


def _keyed(cfg: TrackingConfig, folder: str, experiment: str = "tests"):
    """The tracker of the run keyed by ``folder``, as stage 1 and search trials open theirs."""
    tags = {RUN_DIR_TAG: folder}
    return open_tracker(
        cfg, log_dir="", experiment=experiment, run_name="r", key=run_key(folder), tags=tags
    )


def test_tensorboard_alone_needs_no_mlflow_and_file_stores_work(tmp_path):
    tracker = _open(TrackingConfig(), tmp_path / "tb", key=None)
    assert tracker.mlflow_run_id is None
    tracker.log_metrics({"val_mA": 0.7}, step=1)
    tracker.close()
    assert len(os.listdir(tmp_path / "tb")) == 1

    cfg = resolve_tracking(TrackingConfig(mlflow_uri=f"file:{tmp_path}/mlruns", tensorboard=False))
    tracker = _open(cfg, tmp_path / "none", key=run_key("x"))
    tracker.log_metrics({"val_mA": 0.7}, step=1)
    tracker.close()
    assert MlflowClient(cfg.mlflow_uri).get_run(tracker.mlflow_run_id).data.metrics == {
        "val_mA": 0.7
    }
    assert not (tmp_path / "none").exists()


def test_uris_are_made_absolute_and_must_not_carry_credentials(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    resolved = resolve_tracking(TrackingConfig(mlflow_uri="sqlite:///runs/mlflow.db"))
    assert resolved.mlflow_uri == f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert resolve_tracking(TrackingConfig(mlflow_uri="mlruns")).mlflow_uri == (
        f"file://{tmp_path}/mlruns"
    )
    server = TrackingConfig(mlflow_uri="https://mlflow.example.org")
    assert resolve_tracking(server) == server
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_PASSWORD"):
        resolve_tracking(TrackingConfig(mlflow_uri="https://me:secret@mlflow.example.org"))


def test_starvation_warning_names_the_knobs_above_the_threshold():
    data = DataConfig(decode_concurrency=3, prefetch_batches=2)
    metrics = {"epoch": 4, "data_wait_fraction": 0.35, "images_per_s": 120.0}
    warning = starvation_warning(metrics, data)
    assert warning is not None and "epoch 4" in warning and "35%" in warning
    for knob in ("data.decode_concurrency, now 3", "data.prefetch_batches, now 2", "--pack"):
        assert knob in warning
    assert starvation_warning({**metrics, "data_wait_fraction": 0.2}, data) is None


def test_auto_decode_concurrency_fills_the_cpus_training_leaves():
    assert decode_tasks(5, 0.5, free_cpus=1.0) == 5  # set explicitly: kept
    assert decode_tasks(0, 0.5, free_cpus=3.0) == 6  # 2 cores, 4 logical CPUs, 1 worker
    assert decode_tasks(0, 1.0, free_cpus=15.0) == 15  # a 16-core GPU node, one worker
    assert decode_tasks(0, 0.5, free_cpus=15.0) == 30  # the default: two tasks a core
    assert decode_tasks(0, 1.0, free_cpus=0.5) == 1  # always at least one
