"""What `campar train` does in a run directory that already holds a run.

It resumes only when the stored config matches on the keys that shape the network and its data
(`RUN_KEYS`); otherwise one line names the differing keys and the two ways out, `--fresh` and
`--resume`, and nothing in the directory changes. Weights are loaded into the built network on
the driver before Ray Train starts. A plain re-run continues the run and its MLflow run;
`--fresh` starts both over. Two tiny trainings here, on the session's tiny run: more epochs,
then `--fresh`.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from cli_checks import one_line, run_campar
from mlflow.tracking import MlflowClient

from campar_ray.config import Config, ModelConfig
from campar_ray.data import read_manifest
from campar_ray.model import build_model
from campar_ray.run.checkpoints import MODEL_FILE, resume_checkpoint, stage1_checkpoints
from campar_ray.tracking import KEY_TAG, RUN_DIR_TAG, SUPERSEDED_TAG, run_key
from campar_ray.train.stage1 import check_run_dir


def _state(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` (and itself) with its mtime and size."""
    return {
        str(path.relative_to(folder)): (path.stat().st_mtime_ns, path.stat().st_size)
        for path in [folder, *folder.rglob("*")]
    }


def _train(capsys, tiny_run, run_dir: Path, *extra: str) -> tuple[int, str, str]:
    return run_campar(
        capsys, "train", "--manifest", tiny_run.manifest, "--run-dir", str(run_dir),
        *tiny_run.argv, *extra,
    )  # fmt: skip


def _checkpoint_folders(run_dir: Path) -> set[str]:
    return {
        path.name for path in (run_dir / "ray" / "stage1").glob("checkpoint_*") if path.is_dir()
    }


def _epochs(run_dir: Path) -> list[int]:
    return [meta["epoch"] for _, meta in stage1_checkpoints(str(run_dir))]


def _mlflow_runs(uri: str, run_dir: Path) -> dict[str, tuple[object, list[int]]]:
    """Run id -> (run, the epochs it logged) of every stage-1 MLflow run of ``run_dir`` in the
    store (other tests train copies of the tiny run elsewhere)."""
    client = MlflowClient(uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("campar").experiment_id],
        filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir}'",
    )
    return {
        run.info.run_id: (
            run,
            sorted(point.step for point in client.get_metric_history(run.info.run_id, "epoch")),
        )
        for run in runs
    }


@pytest.mark.ray
def test_another_backbone_is_refused_in_one_line_and_nothing_changes(tiny_run, capsys):
    run_dir = tiny_run.run_dir
    before, stored = _state(run_dir), (run_dir / "config.yaml").read_bytes()
    code, _, err = _train(capsys, tiny_run, run_dir, "--set", "model.backbone=resnet34")
    line = one_line(err)
    assert code == 2 and "model.backbone: resnet18 -> resnet34" in line
    assert "--fresh" in line and "--resume" in line
    assert _state(run_dir) == before and (run_dir / "config.yaml").read_bytes() == stored
    # --resume cannot honour a new learning rate: the optimiser state keeps the stored one.
    code, _, err = _train(capsys, tiny_run, run_dir, "--resume", "--set", "train.lr=0.5")
    assert code == 2 and "train.lr: 0.0001 -> 0.5" in one_line(err)
    assert _state(run_dir) == before


@pytest.mark.ray
def test_weights_of_another_network_are_refused_on_the_driver(tiny_run, tmp_path, capsys):
    copy = Path(shutil.copytree(tiny_run.run_dir, tmp_path / "run"))
    attributes = len(read_manifest(tiny_run.manifest)[1].attributes)
    other = build_model(ModelConfig(backbone="resnet34", fusion=False), attributes)
    weights = Path(resume_checkpoint(str(copy))) / MODEL_FILE
    torch.save(other.state_dict(), weights)
    before = _state(copy)
    code, _, err = _train(capsys, tiny_run, copy, "--epochs", "2")
    line = one_line(err)
    assert code == 2 and f"{weights} does not fit a model.backbone=resnet18 network" in line
    assert "unexpected, e.g. backbone.layer1.2." in line  # resnet34 has a third block per stage
    assert _state(copy) == before


@pytest.mark.ray
def test_more_epochs_resume_the_run_and_fresh_starts_over_in_place(tiny_run, capsys):
    """The last test of the module: it changes the session's tiny run."""
    run_dir, first = tiny_run.run_dir, tiny_run.mlflow_run_id
    code, out, _ = _train(capsys, tiny_run, run_dir, "--epochs", "2")
    assert code == 0 and "best checkpoint:" in out
    assert _epochs(run_dir) == [1, 2]
    history = stage1_checkpoints(str(run_dir))[-1][1]["history"]
    assert [m["epoch"] for m in history] == [1, 2] and history[0] == tiny_run.epoch1
    assert all(0 < m["val_loss"] < math.inf for m in history)  # the report's val-loss curve
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["epochs"] == 2
    runs = _mlflow_runs(tiny_run.mlflow_uri, run_dir)
    assert list(runs) == [first] and runs[first][1] == [1, 2]  # the same MLflow run goes on

    old = _checkpoint_folders(run_dir)
    for stale in ("cfar/factors.npz", "tune/search.json"):
        (run_dir / stale).parent.mkdir()
        (run_dir / stale).write_text("from the old run")
    argv = ("--set", "model.backbone=resnet34", "--epochs", "1", "--fresh")
    code, out, _ = _train(capsys, tiny_run, run_dir, *argv)
    assert code == 0 and "best checkpoint:" in out
    assert _epochs(run_dir) == [1]
    assert not old & _checkpoint_folders(run_dir)
    assert not (run_dir / "cfar").exists() and not (run_dir / "tune").exists()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["backbone"] == "resnet34"
    assert (run_dir / "logits" / "val.parquet").exists()
    # A new MLflow run; the old one keeps what it logged, marked as started over.
    runs = _mlflow_runs(tiny_run.mlflow_uri, run_dir)
    (new,) = set(runs) - {first}
    (old_run, old_epochs), (new_run, new_epochs) = runs[first], runs[new]
    assert old_epochs == [1, 2] and old_run.info.status == "FINISHED"
    assert KEY_TAG not in old_run.data.tags
    assert old_run.data.tags[SUPERSEDED_TAG] == run_key(str(run_dir))
    assert new_epochs == [1] and new_run.info.status == "FINISHED"
    assert new_run.data.tags[KEY_TAG] == run_key(str(run_dir))
    assert new_run.data.params["model.backbone"] == "resnet34"


# --- which differences refuse, which --resume keeps (no Ray) ---------------------------------

STORED = Config().override(
    {"model.backbone": "resnet18", "data.manifest": "/m.parquet", "run.dir": "/run"}
)


def test_keys_that_do_not_shape_the_model_may_differ():
    new = STORED.override(
        {"train.epochs": 60, "train.num_workers": "2..4", "data.decode_concurrency": 3}
    )
    assert check_run_dir(new, STORED.to_dict(), "match") == new


def test_resume_keeps_the_stored_model_and_data_keys():
    new = STORED.override({"model.backbone": "resnet34", "data.image_size": [64, 32]})
    resumed = check_run_dir(new.override({"train.epochs": 5}), STORED.to_dict(), "resume")
    assert resumed.model == STORED.model and resumed.data == STORED.data
    assert resumed.train.epochs == 5
    with pytest.raises(ValueError, match=r"data\.image_size: \[256, 192\] -> \[64, 32\]"):
        check_run_dir(new, STORED.to_dict(), "match")


def test_the_resize_filter_is_compared_as_resolved():
    """A run saved with ``encoder`` (before config.yaml saved the resolved filter) matches the
    same filter spelled out; ``--resume`` keeps the stored filter, resolved."""
    encoder = STORED.override({"data.interpolation": "encoder"})  # resnet18: bilinear
    bilinear = STORED.override({"data.interpolation": "bilinear"})
    assert check_run_dir(bilinear, encoder.to_dict(), "match") == bilinear
    assert check_run_dir(encoder, bilinear.to_dict(), "match") == encoder
    bicubic = STORED.override({"data.interpolation": "bicubic"})
    assert check_run_dir(bicubic, encoder.to_dict(), "resume").data.interpolation == "bilinear"


@pytest.mark.parametrize(
    ("stored", "new", "existing", "message"),
    [
        (None, {"train.epochs": 5}, "resume", "it holds no run"),
        ({"train.scheduler": "cosine"}, {"train.epochs": 60}, "match", "train.epochs: 30 -> 60"),
        ({}, {"train.scheduler": "cosine"}, "resume", "train.scheduler: plateau -> cosine"),
        ({}, {"seed": 7}, "match", "seed: 0 -> 7"),
        ({}, {"data.interpolation": "bicubic"}, "match", "interpolation: bilinear -> bicubic"),
    ],
)
def test_what_a_resume_cannot_honour_is_refused(stored, new, existing, message):
    old = None if stored is None else STORED.override(stored).to_dict()
    with pytest.raises(ValueError, match=message):
        check_run_dir(STORED.override({**(stored or {}), **new}), old, existing)
