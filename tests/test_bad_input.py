"""Bad input fails fast with one line and leaves no half-written state behind.

A real stage-1 run (one worker, one epoch, on the session's local Ray cluster) and a CFAR
fit provide the artefacts; each test then damages a copy of them the way things go wrong
in practice (a truncated upload, a planted pickle, another dataset's manifest) and runs the
`campar` command a user would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_checks import Payload

from campar_ray.artifacts import ArtifactError, load_tensors
from campar_ray.bundle import load_model, load_samples, save_bundle
from campar_ray.cfar.fit import fit_cfar
from campar_ray.cli import main
from campar_ray.config import Config
from campar_ray.data import generate_synthetic, read_manifest
from campar_ray.data.manifest import write_manifest
from campar_ray.run.checkpoints import STATE_FILE, resume_checkpoint
from campar_ray.train.stage1 import train_stage1

MARKER = "pwned"


@pytest.fixture(scope="module")
def trained(ray_cluster, tmp_path_factory) -> tuple[str, str]:
    """(manifest, run dir) of a finished one-epoch run with CFAR fitted."""
    root = tmp_path_factory.mktemp("bad-input")
    manifest = generate_synthetic(str(root / "data"), n=120, size=(32, 16))
    run_dir = str(root / "run")
    config = Config().override(
        {
            "model": {"backbone": "resnet18", "fusion": False},
            "data": {"manifest": manifest, "image_size": [32, 16], "pad": 2},
            "train": {"epochs": 1, "batch_size": 32, "num_workers": 1, "cpus_per_worker": 0.5},
            "run": {"dir": run_dir},
            "tracking": {"tensorboard": False},
        }
    )
    train_stage1(config, progress=False)
    cfar = dataclasses.replace(config.cfar, solver="local", keys=4, factors=4, fc2_epochs=20)
    fit_cfar(run_dir, cfar)
    return manifest, run_dir


def _copy(run_dir: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _campar(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


def _one_line(message: str) -> str:
    errors = [line for line in message.splitlines() if line.startswith("campar ")]
    assert len(errors) == 1, message
    return errors[0]


def test_missing_and_unreadable_manifests_stop_before_anything_is_written(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, err = _campar(
        capsys, "train", "--manifest", str(tmp_path / "none.parquet"), "--run-dir", str(run_dir)
    )
    assert code == 2 and "manifest not found" in _one_line(err)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet")
    code, err = _campar(capsys, "train", "--manifest", str(garbage), "--run-dir", str(run_dir))
    assert code == 2 and str(garbage) in _one_line(err)
    assert not run_dir.exists()


def test_unknown_config_key_names_the_valid_ones(tmp_path, capsys):
    code, err = _campar(capsys, "train", "--set", "train.epoch=3")
    line = _one_line(err)
    assert code == 2 and "unknown config key 'train.epoch'" in line and "train.epochs" in line


@pytest.mark.ray
def test_unwritable_storage_path_is_refused_before_training(trained, tmp_path, capsys):
    manifest, _ = trained
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the run folder should go")
    run_dir = blocker / "run"
    code, err = _campar(capsys, "train", "--manifest", manifest, "--run-dir", str(run_dir))
    assert code == 2 and f"cannot write to {run_dir}" in _one_line(err)


@pytest.mark.ray
def test_manifest_with_other_attributes_cannot_resume_a_run(trained, tmp_path, capsys):
    manifest, run_dir = trained
    table, info = read_manifest(manifest)
    renamed = ("coatColour", *info.attributes[1:])
    other = Path(manifest).with_name("renamed.parquet")
    write_manifest(
        str(other),
        table,
        dataclasses.replace(info, attributes=renamed, eval_attributes=renamed, root=""),
    )
    copy = _copy(run_dir, tmp_path)
    before = _digest(copy)
    code, err = _campar(
        capsys, "train", "--manifest", str(other), "--run-dir", str(copy), "--epochs", "2"
    )
    line = _one_line(err)
    assert code == 2 and "cannot resume" in line and "coatColour" in line
    assert _digest(copy) == before


@pytest.mark.ray
def test_truncated_checkpoint_is_rejected_and_nothing_is_touched(trained, tmp_path, capsys):
    manifest, run_dir = trained
    copy = _copy(run_dir, tmp_path)
    state = Path(resume_checkpoint(str(copy))) / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a cut-off upload
    before = _digest(copy)
    code, err = _campar(
        capsys, "train", "--manifest", manifest, "--run-dir", str(copy), "--epochs", "2"
    )
    line = _one_line(err)
    assert code == 2 and "corrupt or truncated" in line and STATE_FILE in line
    assert _digest(copy) == before  # the damaged and every other checkpoint are kept


@pytest.mark.ray
def test_planted_pickle_in_a_checkpoint_is_refused_not_run(trained, tmp_path, capsys):
    manifest, run_dir = trained
    copy = _copy(run_dir, tmp_path)
    marker = tmp_path / MARKER
    checkpoint = Path(resume_checkpoint(str(copy)))
    torch.save({"optimizer": Payload(marker)}, checkpoint / STATE_FILE)
    code, err = _campar(
        capsys, "train", "--manifest", manifest, "--run-dir", str(copy), "--epochs", "2"
    )
    assert code == 2 and "refusing to load" in _one_line(err)
    # The refusal names the call the file tried to make.
    with pytest.raises(ArtifactError, match=r"holds more than tensors \(.*GLOBAL \w+\.open"):
        load_tensors(str(checkpoint / STATE_FILE))
    assert not marker.exists()


@pytest.mark.ray
@pytest.mark.parametrize(
    ("artefact", "loader"),
    [("model.pt", load_model), ("cfar/factors.npz", load_model), ("samples.npz", load_samples)],
)
def test_planted_pickle_in_a_bundle_is_refused_not_run(trained, tmp_path, artefact, loader):
    _, run_dir = trained
    bundle = Path(save_bundle(run_dir, str(tmp_path / "bundle")))
    marker = tmp_path / MARKER
    target = bundle / artefact
    assert target.exists()
    if target.suffix == ".pt":
        torch.save({"weight": Payload(marker)}, target)
    else:
        np.savez(target, X=np.array([Payload(marker)], dtype=object))
    with pytest.raises(ArtifactError, match="refusing to load"):
        loader(str(bundle))
    assert not marker.exists()


def test_a_train_state_for_another_shape_is_refused_before_training(trained, tmp_path, capsys):
    """A tampered ``train_state.pt`` (plain tensors, one of the wrong shape) used to fail 88 s
    in, inside every worker, with a bare ``RuntimeError: output with shape [7, 7]``."""
    manifest, run_dir = trained
    copy = _copy(run_dir, tmp_path)
    state_file = Path(resume_checkpoint(str(copy))) / STATE_FILE
    state = load_tensors(str(state_file))
    first = min(state["optimizer"]["state"])
    state["optimizer"]["state"][first]["exp_avg"] = torch.zeros(7, 7)
    torch.save(state, state_file)
    before = _digest(copy)
    code, err = _campar(capsys, "train", "--manifest", manifest, "--run-dir", str(copy), "--resume")
    line = _one_line(err)
    assert code == 2
    assert line.startswith(
        f"campar train: error: cannot resume {copy}: {state_file} does not fit this network's "
        f"optimiser (its exp_avg of parameter {first} is [7, 7], the parameter is ["
    )
    assert line.endswith(f"(move {state_file.parent} away to resume from the previous "
                         "checkpoint, or --fresh)")  # fmt: skip
    assert _digest(copy) == before
