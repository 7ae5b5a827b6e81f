"""Every failure a user can cause ends in one line, and leaves the run directory as it was.

Each test runs the `campar` command a user would: a number out of range, Ctrl-C, a run whose
logits were never written, a bundle made from a tampered checkpoint or with a broken
``attributes.json``, a Ray Train or Ray Data failure. Each asserts the one line, the exit code,
that no planted payload ran and that no file of the run directory changed. The run is the
tiny one of ``test_evaluate`` (one epoch, no Ray); one test trains for real on Ray Train.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from cli_checks import TINY_TRAIN, Payload, one_line, run_campar
from test_evaluate import SIZE, train_tiny_run

from campar_ray.cli import main
from campar_ray.config import load_config
from campar_ray.data import generate_synthetic, read_manifest
from campar_ray.data.manifest import write_manifest
from campar_ray.run.checkpoints import best_checkpoint

MISSING_LOGITS = (
    "not found: stage 1 writes it when `campar train` finishes (re-run `campar train` with the "
    "same --run-dir to finish or resume it)"
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, Path]:
    """(manifest, run directory) of a finished one-epoch run: checkpoint, config and logits."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("failures")
    manifest = generate_synthetic(str(root / "data"), n=80, size=SIZE, seed=0)
    return manifest, train_tiny_run(root / "run", manifest, "campar", epochs=1)


@pytest.fixture(scope="module")
def bundle(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    assert main(["bundle", "--run-dir", str(trained[1]), "--out", str(out)]) == 0
    return out


@pytest.fixture
def no_training(monkeypatch):
    """Stage 1 replaced by ``monkeypatch.setattr(stage1, "train_stage1", ...)`` in a test;
    by default any call fails the test."""
    from campar_ray.train import stage1

    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(stage1, "train_stage1", refuse)
    return stage1


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def _refused(capsys, folder: Path, out: Path, *argv: str) -> str:
    """``campar ARGV`` refused: exit 2, nothing on stdout, nothing written to ``out`` and
    nothing in ``folder`` changed. Returns the one error line."""
    before = _state(folder)
    code, text, err = run_campar(capsys, *argv)
    assert code == 2 and text == ""
    assert not out.exists()
    assert _state(folder) == before
    return one_line(err)


def _state(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file and folder under ``folder``: modification time and content digest."""
    return {
        str(path.relative_to(folder)): (
            path.stat().st_mtime_ns,
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder",
        )
        for path in sorted(folder.rglob("*"))
    }


# --- numbers out of range ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "line"),
    [
        ("train.lr=-1", "bad value -1.0 for train.lr: expected a learning rate > 0"),
        ("train.lr=.nan", "bad value nan for train.lr: expected a learning rate > 0"),
        ("train.weight_decay=-0.1", "bad value -0.1 for train.weight_decay: expected a weight "
         "decay >= 0"),
        ("train.epochs=0", "bad value 0 for train.epochs: expected a number of epochs >= 1"),
        ("train.batch_size=0", "bad value 0 for train.batch_size: expected a batch size >= 1"),
        ("train.grad_clip=-1", "bad value -1.0 for train.grad_clip: expected a gradient-norm "
         "limit >= 0 (0: no clipping)"),
        ("train.cpus_per_worker=0", "bad value 0.0 for train.cpus_per_worker: expected a number "
         "of CPUs > 0"),
        ("train.keep_checkpoints=0", "bad value 0 for train.keep_checkpoints: expected a number "
         "of checkpoints >= 1"),
        ("train.max_failures=-2", "bad value -2 for train.max_failures: expected a number of "
         "restarts >= 0, or -1 for no limit"),
        ("train.resize_check_seconds=0", "bad value 0.0 for train.resize_check_seconds: "
         "expected seconds > 0"),
        ("train.checkpoint_every_minutes=-5", "bad value -5.0 for "
         "train.checkpoint_every_minutes: expected minutes >= 0 (0: per epoch only)"),
        ("data.pad=-1", "bad value -1 for data.pad: expected pixels >= 0"),
        ("data.image_size=[0,16]", "bad value [0, 16] for data.image_size: expected [H, W], "
         "each >= 1"),
        ("data.decode_concurrency=-1", "bad value -1 for data.decode_concurrency: expected a "
         "number of tasks >= 0 (0: automatic)"),
        ("data.prefetch_batches=-1", "bad value -1 for data.prefetch_batches: expected a number "
         "of batches >= 0"),
        ("data.decode_cpus=0", "bad value 0.0 for data.decode_cpus: expected a number of CPUs > 0"),
        ("data.starvation_threshold=1.5", "bad value 1.5 for data.starvation_threshold: expected "
         "a fraction in [0, 1]"),
        ("seed=-1", "bad value -1 for seed: expected an integer in [0, 2**32)"),
        ("cfar.threshold=1", "bad value 1.0 for cfar.threshold: expected a threshold p_t in "
         "(0, 1)"),
        ("cfar.lam=0", "bad value 0.0 for cfar.lam: expected a regularisation > 0 (keeps every "
         "D x D system invertible)"),
    ],
)  # fmt: skip
def test_a_number_out_of_range_stops_train_before_ray_starts(
    trained, tmp_path, capsys, no_training, setting, line
):
    run_dir = tmp_path / "run"
    argv = ("train", "--manifest", trained[0], "--run-dir", str(run_dir), "--set", setting)
    code, out, err = run_campar(capsys, *argv)
    assert code == 2 and out == ""
    assert one_line(err) == f"campar train: error: {line}"
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("backbone", "line"),
    [
        ("resnet5", "model.backbone: unknown backbone 'resnet5'; valid: convnext_base"),
        ("timm:convnext_atoo", "model.backbone: unknown timm model 'convnext_atoo'; close "
         "names: convnext_atto"),
    ],
)  # fmt: skip
def test_an_unknown_backbone_stops_train_before_ray_starts(
    trained, tmp_path, capsys, monkeypatch, backbone, line
):
    from campar_ray.train import stage1

    def refuse(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(stage1, "init_ray", refuse)
    run_dir = tmp_path / "run"
    argv = ("--manifest", trained[0], "--run-dir", str(run_dir))
    code, out, err = run_campar(capsys, "train", *argv, "--set", f"model.backbone={backbone}")
    assert code == 2 and out == ""
    assert one_line(err).startswith(f"campar train: error: {line}")
    assert not run_dir.exists()


def test_the_edges_of_each_range_are_accepted():
    config = load_config(
        overrides=[
            "train.grad_clip=0", "train.max_failures=-1", "train.checkpoint_every_minutes=0",
            "train.weight_decay=0", "data.pad=0", "data.prefetch_batches=0",
            "data.decode_concurrency=0", "data.starvation_threshold=1", "train.epochs=1",
            "seed=0", "cfar.alpha=0", "cfar.tol=0", "cfar.fc2_epochs=0",
        ]
    )  # fmt: skip
    assert config.train.max_failures == -1 and config.data.starvation_threshold == 1
    assert config.cfar.alpha == 0 and config.cfar.fc2_epochs == 0


# --- Ctrl-C -------------------------------------------------------------------------------------


def test_ctrl_c_is_one_line_and_exit_130(trained, tmp_path, capsys, no_training, monkeypatch):
    run_dir = _copy(trained[1], tmp_path)
    before = _state(run_dir)
    monkeypatch.setattr(
        no_training, "train_stage1", lambda *a, **k: signal.raise_signal(signal.SIGINT)
    )
    argv = ("train", "--manifest", trained[0], "--run-dir", str(run_dir))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises
    try:
        code, out, err = run_campar(capsys, *argv)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 130 and out == ""
    assert err.strip() == "campar train: interrupted; re-run the same command to resume"
    assert _state(run_dir) == before


# --- a run without logits -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "split"),
    [
        (("evaluate", "--angle-images", "0", "--cam-images", "0"), "test"),
        (("fit-cfar",), "train"),  # the default solver joins Ray: the check comes first
        (("bundle", "--out", "{tmp}/bundle"), "val"),
    ],
)
def test_missing_logits_name_the_command_that_writes_them(
    trained, tmp_path, capsys, monkeypatch, argv, split
):
    from campar_ray import runtime

    monkeypatch.setattr(runtime, "init_ray", lambda *a: pytest.fail("Ray started"))
    run_dir = _copy(trained[1], tmp_path)
    shutil.rmtree(run_dir / "logits")  # as a run stopped before its last step leaves it
    command = [arg.format(tmp=tmp_path) for arg in argv]
    line = _refused(capsys, run_dir, tmp_path / "bundle", *command, "--run-dir", str(run_dir))
    path = run_dir / "logits" / f"{split}.parquet"
    assert line == f"campar {argv[0]}: error: {path} {MISSING_LOGITS}"


# --- bundles ------------------------------------------------------------------------------------


@pytest.mark.parametrize("planted", ["pickle", "another network"])
def test_bundle_refuses_weights_that_are_not_this_networks_tensors(
    trained, tmp_path, capsys, planted
):
    run_dir = _copy(trained[1], tmp_path)
    marker = tmp_path / "pwned"
    weights = Path(best_checkpoint(str(run_dir))) / "model.pt"
    if planted == "pickle":
        torch.save({"backbone.conv1.weight": Payload(marker)}, weights)
        problem = f"refusing to load {weights}: it holds more than tensors ("
    else:
        torch.save({"fc.weight": torch.zeros(2, 2)}, weights)
        problem = f"{weights} does not hold the weights of a resnet18 network with 17 attributes: "
    out = tmp_path / "bundle"
    line = _refused(capsys, run_dir, out, "bundle", "--run-dir", str(run_dir), "--out", str(out))
    assert line.startswith(f"campar bundle: error: {problem}")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("file", "content", "problem"),
    [
        ("attributes.json", ["a", "b"], "does not name the attributes"),
        ("attributes.json", {"attributes": "abc", "eval_attributes": ["a"]}, "does not name"),
        ("attributes.json", {"attributes": ["a", 1], "eval_attributes": ["a"]}, "does not name"),
        ("attributes.json", {"attributes": ["a", "a"], "eval_attributes": ["a"]}, "does not"),
        ("attributes.json", {"attributes": ["a", "b"], "eval_attributes": ["c"]}, "does not"),
        ("attributes.json", {"attributes": ["a", "b"]}, "does not name the attributes"),
        ("config.yaml", [1, 2], "is not a campar config: expected a mapping, got list"),
        ("config.yaml", {"train": {"lr": -1}}, "is not a campar config: bad value -1.0 for "),
        ("config.yaml", {"model": {"head": 3}, "x": 1}, "is not a campar config: unknown config "),
    ],
)
def test_a_bundle_with_a_broken_file_is_refused_in_one_line_naming_it(
    bundle, tmp_path, capsys, file, content, problem
):
    broken = _copy(bundle, tmp_path)
    (broken / file).write_text(json.dumps(content))  # JSON is YAML too
    out = tmp_path / "model.pt"
    line = _refused(capsys, broken, out, "export", "--model", str(broken), "--out", str(out))
    assert line.startswith(f"campar export: error: {broken / file} {problem}")


# --- Ray Train and Ray Data failures -------------------------------------------------------------


def test_a_bug_keeps_its_traceback(trained, tmp_path, no_training, monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug, not a user's mistake")

    monkeypatch.setattr(no_training, "train_stage1", bug)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        main(["train", "--manifest", trained[0], "--run-dir", str(tmp_path / "run")])


@pytest.mark.ray
def test_a_ray_data_failure_is_its_root_cause_with_the_trace_in_the_run_log(
    ray_cluster, trained, tmp_path, capsys, no_training, monkeypatch
):
    """A Ray Data task's error reaches the driver as a UserCodeException whose cause is text."""
    import ray.data

    def fail(batch):
        raise ValueError("image 7 is not a PNG")

    def stage1(*args, **kwargs):
        ray.data.range(4).map_batches(fail).materialize()

    monkeypatch.setattr(no_training, "train_stage1", stage1)
    run_dir = _copy(trained[1], tmp_path)
    before = _state(run_dir)
    argv = ("train", "--manifest", trained[0], "--run-dir", str(run_dir))
    code, out, err = run_campar(capsys, *argv)
    log = run_dir / "logs" / "campar-train.log"
    assert code == 1 and out == ""
    assert one_line(err) == (
        f"campar train: failed: ValueError: image 7 is not a PNG (full trace: {log})"
    )
    assert "UserCodeException" in log.read_text() and "in fail" in log.read_text()
    after = _state(run_dir)  # the log is the only change
    assert sorted(path for path in after if path.startswith("logs")) == ["logs", "logs/" + log.name]
    assert {k: v for k, v in after.items() if not k.startswith("logs")} == before


@pytest.mark.ray
def test_a_data_error_in_a_worker_fails_once_in_one_line(ray_cluster, tmp_path, capsys):
    """Every validation image corrupt: the worker's error, not Ray Train's three paragraphs,
    and no restart (a restart would fail the same way), though ``train.max_failures`` is 3."""
    manifest = generate_synthetic(str(tmp_path / "data"), n=48, size=SIZE)
    table, info = read_manifest(manifest)
    images = table.column("image").to_pylist()
    for row, split in enumerate(table.column("split").to_pylist()):
        if split == "val":
            images[row] = f"corrupt{row}.png"
            (tmp_path / "data" / images[row]).write_bytes(b"not an image")
    corrupt = str(tmp_path / "data" / "corrupt.parquet")
    write_manifest(corrupt, table.set_column(0, "image", pa.array(images)), info)
    run_dir = tmp_path / "run"
    code, _, err = run_campar(
        capsys, "train", "--manifest", corrupt, "--run-dir", str(run_dir), "--epochs", "1",
        *TINY_TRAIN, "--set", "tracking.tensorboard=true", "--set", "train.max_failures=3",
    )  # fmt: skip
    log = run_dir / "logs" / "campar-train.log"
    assert code == 1
    assert one_line(err) == (
        "campar train: failed: ValueError: no decodable validation image on any worker; cannot "
        f"compute metrics (full trace: {log})"
    )
    # Each start of the worker group opens a new TensorBoard event file: one start, no retry.
    assert len(list((run_dir / "tensorboard" / "stage1").iterdir())) == 1
    trace = log.read_text()
    assert "input or config error, not retried" in trace and "in merge_predictions" in trace
    assert not list((run_dir / "ray" / "stage1").glob("checkpoint_*"))


@pytest.mark.parametrize(
    ("error", "recurs"),
    [
        (ValueError("labels do not fit"), True),
        (FloatingPointError("training loss became nan"), True),
        (OSError("connection reset"), False),
        (RuntimeError("NCCL timeout"), False),
    ],
)
def test_a_worker_error_is_judged_by_its_cause_through_ray_task_errors(error, recurs):
    """A Ray Data read task's error reaches the worker as ``RayTaskError`` (the wrapper that
    subclasses the cause, or the plain one when Ray cannot make that class); a map function's
    as ``UserCodeException``, whose cause is gone by then: retried."""
    from ray.exceptions import RayTaskError, UserCodeException

    from campar_ray.train import worker

    wrapped = RayTaskError("read", "trace", error)
    assert worker.recurs(error) is recurs
    assert (
        worker.recurs(wrapped) is recurs and worker.recurs(wrapped.as_instanceof_cause()) is recurs
    )
    assert not worker.recurs(RayTaskError("map", "trace", UserCodeException(str(error))))


@pytest.mark.ray
@pytest.mark.parametrize("case", ["diverged", "unreadable row"])
def test_an_error_a_restart_would_meet_again_fails_once_in_one_line(
    ray_cluster, tmp_path, capsys, case
):
    """A loss that is no longer finite (``train.lr`` far too high), and a manifest row that
    names a URI no reader opens (read with ``data.allow_outside_root``, so it reaches a Ray Data
    read task, whose error the worker gets wrapped in Ray's ``RayTaskError``): each ends the
    run on its first try, ``train.max_failures`` 3 unspent, with the cause in one line."""
    manifest = generate_synthetic(str(tmp_path / "data"), n=48, size=SIZE)
    options: tuple[str, ...] = ("--set", "train.lr=1e20")
    cause = (
        r"FloatingPointError: training loss became (nan|inf) at step \d+ with learning rate "
        r"1e\+20: training diverged; lower train\.lr"
    )
    if case == "unreadable row":
        table, info = read_manifest(manifest)
        images = table.column("image").to_pylist()
        images[table.column("split").to_pylist().index("train")] = "https://example.com/a.png"
        manifest = str(tmp_path / "data" / "url.parquet")
        write_manifest(manifest, table.set_column(0, "image", pa.array(images)), info)
        options = ("--set", "data.allow_outside_root=true")
        cause = r"ArrowInvalid: Unrecognized filesystem type in URI: https://example\.com/a\.png"
    run_dir = tmp_path / "run"
    code, _, err = run_campar(
        capsys, "train", "--manifest", manifest, "--run-dir", str(run_dir), "--epochs", "2",
        *TINY_TRAIN, *options, "--set", "tracking.tensorboard=true",
        "--set", "train.max_failures=3",
    )  # fmt: skip
    log = run_dir / "logs" / "campar-train.log"
    assert code == 1
    assert re.fullmatch(
        f"campar train: failed: {cause} \\(full trace: {re.escape(str(log))}\\)", one_line(err)
    )
    # Each start of the worker group opens a new TensorBoard event file: one start, no retry.
    assert len(list((run_dir / "tensorboard" / "stage1").iterdir())) == 1
    assert "input or config error, not retried" in log.read_text()
