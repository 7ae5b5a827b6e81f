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
import pyarrow.compute as pc
import pytest
import torch
from cli_checks import TINY_TRAIN, Listener, Payload, one_line, run_campar
from test_evaluate import SIZE, train_tiny_run

from campar_ray.cli import main
from campar_ray.config import load_config
from campar_ray.data import generate_synthetic, read_manifest
from campar_ray.data.manifest import write_manifest
from campar_ray.run.checkpoints import best_checkpoint, resume_checkpoint

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
        ("train.batch_size=0", "bad value 0 for train.batch_size: expected a batch size in "
         "[1, 4096]"),
        ("train.batch_size=100000", "bad value 100000 for train.batch_size: expected a batch "
         "size in [1, 4096]"),
        ("data.image_size=[20000,20000]", "bad value [20000, 20000] for data.image_size: "
         "expected [H, W], each in [1, 4096]"),
        ("cfar.factors=100000", "bad value 100000 for cfar.factors: expected a latent "
         "dimension in [1, 1024]"),
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
        ("data.pad=-1", "bad value -1 for data.pad: expected pixels in [0, 4096]"),
        ("data.image_size=[0,16]", "bad value [0, 16] for data.image_size: expected [H, W], "
         "each in [1, 4096]"),
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


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("snapshot", [False, True])
def test_ctrl_c_and_sigterm_say_what_was_saved_and_how_to_resume(
    trained, tmp_path, capsys, no_training, monkeypatch, stop, snapshot
):
    """SIGTERM (a scheduler stopping the job) ends like Ctrl-C: one line naming the last
    checkpoint Ray Train will resume from (or that there is none yet), exit 143 (130 for
    Ctrl-C)."""
    run_dir = _copy(trained[1], tmp_path)
    checkpoint = Path(best_checkpoint(str(run_dir)))
    if snapshot:
        record = {"checkpoint_dir_name": checkpoint.name}
        (checkpoint.parent / "checkpoint_manager_snapshot.json").write_text(
            json.dumps({"checkpoint_results": [record], "latest_checkpoint_result": record})
        )
    before = _state(run_dir)
    monkeypatch.setattr(no_training, "train_stage1", lambda *a, **k: signal.raise_signal(stop))
    argv = ("train", "--manifest", trained[0], "--run-dir", str(run_dir))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises
    terminate = signal.getsignal(signal.SIGTERM)
    try:
        code, out, err = run_campar(capsys, *argv)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert signal.getsignal(signal.SIGTERM) is terminate  # the command put it back
    assert (code, out) == ((143, "") if stop == signal.SIGTERM else (130, ""))
    saved = (
        f"the last checkpoint saved is {checkpoint}; re-run the same command to resume from it"
        if snapshot
        else "no checkpoint was saved yet; re-run the same command to start again"
    )
    stopped = "stopped by SIGTERM" if stop == signal.SIGTERM else "interrupted"
    assert err.strip() == f"campar train: {stopped}; {saved}"
    assert _state(run_dir) == before


# --- a run without logits -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "split"),
    [
        (("evaluate", "--angle-images", "0", "--cam-images", "0"), "test"),
        (("fit-cfar",), "train"),  # before the ALS solver is chosen (Ray with cfar.solver=ray)
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
        ("config.yaml", {"model": {"head": "x"}}, "is not a campar config: bad value 'x' for "),
        ("config.yaml", {"train": {"lr": 0.1}, "x": 1}, "is not a campar config: unknown config "),
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


# --- predict and bundle read manifest rows through the guard ------------------------------------


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.close()


def _hostile_rows(manifest: str, out: Path, rows: list[str], split: str) -> str:
    """A manifest of ``split``'s first rows with their images replaced by ``rows``."""
    table, info = read_manifest(manifest)
    table = table.filter(pc.equal(table.column("split"), split)).slice(0, len(rows))
    write_manifest(str(out), table.set_column(0, "image", pa.array(rows)), info)
    return str(out)


def _outside_rows(tmp_path: Path, port: int) -> list[str]:
    """``../`` and absolute references to real PNGs outside, and a URI with an endpoint."""
    from PIL import Image

    for name in ("outside.png", "elsewhere.png"):
        Image.new("RGB", (16, 32), (200, 10, 10)).save(tmp_path / name)
    endpoint = f"s3://bucket/x.png?endpoint_override=127.0.0.1:{port}&scheme=http"
    return ["../outside.png", str(tmp_path / "elsewhere.png"), endpoint]


def test_predict_refuses_a_manifest_reaching_outside_its_folder(
    trained, bundle, tmp_path, capsys, monkeypatch, listener
):
    """Its ``../``, absolute and endpoint rows used to be scored (and requested): now the
    command stops in one line naming the row, before Ray, with no request sent."""
    from campar_ray import runtime

    monkeypatch.setattr(runtime, "init_ray", lambda *a, **k: None)  # refused before Ray
    (tmp_path / "m").mkdir()
    for index, row in enumerate(_outside_rows(tmp_path, listener.port)):
        evil = _hostile_rows(trained[0], tmp_path / "m" / f"evil{index}.parquet", [row], "val")
        out = tmp_path / "p.csv"
        argv = ("predict", "--model", str(bundle), "--input", evil, "--out", str(out))
        code, text, err = run_campar(capsys, *argv)
        line = one_line(err)
        assert code == 2 and text == "" and not out.exists()
        assert line.startswith("campar predict: error: row 0: image ")
        assert ("is a URI with options" if "?" in row else "is outside") in line
    assert listener.close() == 0


def test_bundle_samples_only_images_inside_the_manifest_a_checkpoint_names(
    trained, tmp_path, capsys, listener
):
    """A ``meta.json`` naming someone else's manifest (its rows outside its folder, or a URI
    with an endpoint) and one naming the manifest by such a URI: the bundle is made without
    samples from outside and no request is sent."""
    run_dir = _copy(trained[1], tmp_path)
    (tmp_path / "m").mkdir()
    evil = _hostile_rows(trained[0], tmp_path / "m" / "evil.parquet",
                         _outside_rows(tmp_path, listener.port), "val")  # fmt: skip
    meta_file = Path(best_checkpoint(str(run_dir))) / "meta.json"
    meta = json.loads(meta_file.read_text())
    endpoint = f"s3://bucket/m.parquet?endpoint_override=127.0.0.1:{listener.port}&scheme=http"
    for manifest in (evil, endpoint):
        meta["config"]["data"]["manifest"] = manifest
        meta_file.write_text(json.dumps(meta))
        out = tmp_path / "bundle"
        code, _, err = run_campar(capsys, "bundle", "--run-dir", str(run_dir), "--out", str(out))
        assert code == 0, err
        assert (out / "model.pt").is_file() and not (out / "samples.npz").exists()
        shutil.rmtree(out)
    assert listener.close() == 0


def test_bundle_copies_only_the_named_stage2_files_never_through_a_symlink(
    trained, tmp_path, capsys
):
    """``cfar/`` with a symlinked folder holding an ``id_rsa``: not copied (a bundle takes
    the files the layout names, not a listing); a named file replaced by a symlink: refused
    in one line naming it, no bundle written."""
    run_dir = _copy(trained[1], tmp_path)
    argv = ("--run-dir", str(run_dir), "--set", "cfar.solver=local", "--set", "cfar.iterations=2")
    code, _, err = run_campar(capsys, "fit-cfar", *argv, "--set", "cfar.fc2_epochs=2")
    assert code == 0, err
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "id_rsa").write_text("PRIVATE KEY")
    (run_dir / "cfar" / "keys").symlink_to(keys, target_is_directory=True)
    (run_dir / "cfar" / "notes.txt").write_text("not a model file")
    out = tmp_path / "bundle"
    code, _, err = run_campar(capsys, "bundle", "--run-dir", str(run_dir), "--out", str(out))
    assert code == 0, err
    assert sorted(p.name for p in (out / "cfar").iterdir()) == [
        "cfar.json", "dictionary.npz", "factors.npz", "fc2.npz"
    ]  # fmt: skip
    fc2 = run_dir / "cfar" / "fc2.npz"
    fc2.rename(tmp_path / "fc2.npz")
    fc2.symlink_to(tmp_path / "fc2.npz")
    out = tmp_path / "bundle2"
    line = _refused(capsys, run_dir, out, "bundle", "--run-dir", str(run_dir), "--out", str(out))
    assert line == (
        f"campar bundle: error: {fc2} is a symlink; files are copied out of a run directory "
        "only as regular files, never through a symlink: replace it by the file itself"
    )


# --- one writer per run directory ---------------------------------------------------------------

HOLD_LOCK = """
import sys
from campar_ray.run.lock import run_lock
with run_lock(sys.argv[1], "train"):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.mark.parametrize(
    "argv",
    [
        ("train", "--manifest", "{manifest}"),
        ("fit-cfar", "--set", "cfar.solver=local"),
        ("tune", "--num-samples", "1"),
        ("bundle", "--out", "{tmp}/bundle"),
    ],
)
def test_a_second_writer_of_a_run_directory_is_refused_naming_the_holder(
    trained, tmp_path, capsys, no_training, argv
):
    """The holder is another process (a `campar train` in the middle of its run); once it is
    killed, its lock goes with it."""
    import os
    import subprocess
    import sys

    run_dir = _copy(trained[1], tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == b"held\n"
        command = [arg.format(manifest=trained[0], tmp=tmp_path) for arg in argv]
        line = _refused(capsys, run_dir, tmp_path / "bundle", *command, "--run-dir", str(run_dir))
    finally:
        holder.kill()
        holder.wait()
    assert line.startswith(
        f"campar {argv[0]}: error: {run_dir} is being written by `campar train` (pid "
        f"{holder.pid} on "
    )
    assert "one command writes a run directory at a time: wait for it to finish" in line
    from campar_ray.run.lock import run_lock

    with run_lock(str(run_dir), "bundle"):  # a killed holder leaves no stale lock
        assert (run_dir / ".campar-lock").is_file()
    assert not (run_dir / ".campar-lock").exists()


def test_bundle_out_inside_the_run_directory_is_refused(trained, tmp_path, capsys):
    run_dir = _copy(trained[1], tmp_path)
    for out in (run_dir, run_dir / "bundle"):
        line = _refused(
            capsys, run_dir, run_dir / "model.pt", "bundle", "--run-dir", str(run_dir),
            "--out", str(out),
        )  # fmt: skip
        assert line == (
            f"campar bundle: error: --out {out} is inside the run directory {run_dir}, whose "
            "config.yaml the bundle would overwrite; write the bundle elsewhere"
        )


# --- bounded parsing: bombs, depth, sizes, bad YAML ---------------------------------------------

ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
)
"""About 600 bytes that expand to 9**9 (387 million) strings."""
DEEP_YAML = "[" * 20_000 + "]" * 20_000
DEEP_JSON = '{"attributes": ' + "[" * 20_000 + "]" * 20_000 + "}"


@pytest.mark.parametrize(
    ("file", "text", "problem"),
    [
        ("config.yaml", ALIAS_BOMB, "expands to more than 1000000 values (YAML aliases"),
        ("config.yaml", DEEP_YAML, "is nested more than 64 levels deep"),
        ("attributes.json", DEEP_JSON, "is nested more than 64 levels deep"),
        ("config.yaml", "data: {image_size: [20000, 20000]}", "is not a campar config: bad "
         "value [20000, 20000] for data.image_size: expected [H, W], each in [1, 4096]"),
    ],
)  # fmt: skip
def test_a_bundle_file_that_would_take_all_memory_is_refused_in_one_short_line(
    bundle, tmp_path, capsys, file, text, problem
):
    """The 1.3 KB alias bomb used to take 3 GB and print a 522 MB line; 20,000 brackets a
    RecursionError; a 20000 x 20000 input 9.6 GB in ``export``."""
    broken = _copy(bundle, tmp_path)
    (broken / file).write_text(text)
    out = tmp_path / "model.pt"
    line = _refused(capsys, broken, out, "export", "--model", str(broken), "--out", str(out))
    assert line.startswith(f"campar export: error: {broken / file} ")
    assert problem in line and len(line) < 400


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (ALIAS_BOMB, "expands to more than 1000000 values"),
        (DEEP_YAML, "is nested more than 64 levels deep"),
        ("train: [lr: 1", "is not valid YAML: did not find expected ',' or ']' at line 2, "),
    ],
)
def test_a_config_file_bomb_or_bad_yaml_is_one_line(tmp_path, capsys, text, problem):
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    code, out, err = run_campar(capsys, "config", "--config", str(path))
    assert code == 2 and out == ""
    line = one_line(err)
    assert line.startswith(f"campar config: error: config file {path} {problem}")
    assert len(line) < 300


def test_a_config_naming_a_folder_is_one_line(tmp_path, capsys):
    code, out, err = run_campar(capsys, "config", "--config", str(tmp_path))
    assert code == 2 and out == ""
    assert one_line(err) == (
        f"campar config: error: config file {tmp_path} is a folder; --config names a YAML "
        "file (`campar config` prints one to start from)"
    )


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("[1,", "--set train.lr is not valid YAML: did not find expected node content at "),
        ("!!python/object/apply:os.system ['touch {marker}']", "--set train.lr is not valid "
         "YAML: could not determine a constructor for the tag "),
        ("[&a [x, x, x, x, x, x, x, x], *a, *a, *a]", "bad value [['x', 'x', 'x', 'x', 'x', "
         "'x', 'x', 'x'], ['x', 'x', 'x', 'x', 'x', 'x', 'x'... for train.lr: float() "),
    ],
)  # fmt: skip
def test_bad_yaml_in_set_is_one_line_and_runs_nothing(tmp_path, capsys, value, problem):
    marker = tmp_path / "pwned"
    code, out, err = run_campar(
        capsys, "config", "--set", f"train.lr={value}".format(marker=marker)
    )
    assert code == 2 and out == "" and not marker.exists()
    line = one_line(err)
    assert line.startswith(f"campar config: error: {problem}") and len(line) < 300


# --- damaged checkpoint records -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("meta", "problem"),
    [
        ("drop epoch", "no 'epoch' of the right type"),
        ([1, 2], "expected a JSON object, got list"),
    ],
)
def test_a_meta_json_without_epoch_or_not_an_object_is_one_line(
    trained, tmp_path, capsys, meta, problem
):
    run_dir = _copy(trained[1], tmp_path)
    checkpoint = Path(best_checkpoint(str(run_dir)))
    if meta == "drop epoch":
        meta = json.loads((checkpoint / "meta.json").read_text())
        del meta["epoch"]
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "bundle"
    line = _refused(capsys, run_dir, out, "bundle", "--run-dir", str(run_dir), "--out", str(out))
    assert line == (
        f"campar bundle: error: {checkpoint / 'meta.json'} is not a stage-1 checkpoint's "
        f"metadata ({problem}); the checkpoint is damaged: move {checkpoint} away (the run goes "
        "on from its previous checkpoint), or start over with --fresh"
    )


@pytest.mark.parametrize(
    "entry", [{"metrics": {}}, {"checkpoint_dir_name": "../../elsewhere"}, "checkpoint_000001"]
)
def test_a_snapshot_entry_without_a_checkpoint_folder_name_is_one_line(
    trained, tmp_path, capsys, entry
):
    run_dir = _copy(trained[1], tmp_path)
    snapshot = run_dir / "ray" / "stage1" / "checkpoint_manager_snapshot.json"
    snapshot.write_text(json.dumps({"checkpoint_results": [entry]}))
    out = tmp_path / "bundle"
    line = _refused(capsys, run_dir, out, "bundle", "--run-dir", str(run_dir), "--out", str(out))
    assert line == (
        f"campar bundle: error: {snapshot} has an entry without a folder name "
        "(checkpoint_dir_name); the run's checkpoint record is damaged: start over in place "
        "with --fresh, or use a new run.dir"
    )


# --- a full disk ----------------------------------------------------------------------------------


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MB tmpfs: a real disk that fills up (mounting needs root; skipped elsewhere)."""
    import subprocess

    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_during_bundle_is_one_line_and_leaves_no_partial_file(
    trained, full_disk, capsys
):
    out = full_disk / "bundle"
    code, text, err = run_campar(capsys, "bundle", "--run-dir", str(trained[1]), "--out", str(out))
    line = one_line(err)
    assert code == 2 and text == ""
    assert re.fullmatch(
        rf"campar bundle: error: cannot write {re.escape(str(full_disk))}/bundle\.partial-\w+/"
        r"model\.pt: no space left on the device \(or over quota\): free some space, or write "
        r"elsewhere, and re-run",
        line,
    )
    assert list(full_disk.iterdir()) == []  # no model.pt.tmp, no half bundle


@pytest.mark.ray
def test_a_full_disk_during_train_is_one_line_and_the_last_checkpoint_stays_resumable(
    tiny_run, full_disk, tmp_path, capsys
):
    """A run resumed on a disk with room for its small files but not for epoch 2's checkpoint
    ends in one line that names the checkpoint folder, the fix and the checkpoint a re-run
    resumes from; no half-written checkpoint is left or registered. It logs to an MLflow
    store of its own: the copy is another run, which test_run_dir must not find in the tiny
    run's store."""
    _resize(full_disk, 2**29)
    run_dir = Path(shutil.copytree(tiny_run.run_dir, full_disk / "run"))
    checkpoints = run_dir / "ray" / "stage1"
    epoch1 = Path(best_checkpoint(str(run_dir)))
    snapshot = (checkpoints / "checkpoint_manager_snapshot.json").read_bytes()
    before = {path.name for path in checkpoints.iterdir()}
    used = shutil.disk_usage(full_disk).used
    _resize(full_disk, used + 4 * 2**20)  # logs, config and epoch logits fit; no checkpoint
    argv = ("--manifest", tiny_run.manifest, "--run-dir", str(run_dir), *tiny_run.argv)
    tracking = ("--set", f"tracking.mlflow_uri=file://{tmp_path}/mlruns")
    code, _, err = run_campar(capsys, "train", *argv, *tracking, "--epochs", "2")
    assert code == 1 and "Traceback" not in err, err
    assert re.fullmatch(
        rf"campar train: failed: WriteError: cannot write checkpoint {re.escape(str(checkpoints))}"
        r"/checkpoint_[\w.-]+: \d+\.\d MB free on its disk, \d+\.\d MB needed: free some space, "
        rf"or write elsewhere, and re-run; the last checkpoint saved is {re.escape(str(epoch1))}; "
        r"re-run the same command to resume from it \(full trace: \S+\)",
        one_line(err),
    )
    assert {path.name for path in checkpoints.iterdir()} == before
    assert (checkpoints / "checkpoint_manager_snapshot.json").read_bytes() == snapshot
    assert resume_checkpoint(str(run_dir)) == str(epoch1) == best_checkpoint(str(run_dir))
    assert not [path for path in run_dir.rglob("*.tmp*")]


def _resize(mount: Path, size: int) -> None:
    """Give the tmpfs at ``mount`` ``size`` bytes (at least what it holds)."""
    import subprocess

    size = -(-size // 4096) * 4096
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)


def test_a_checkpoint_copy_that_fails_part_way_leaves_no_folder(tmp_path):
    """Ray Train's own copy of a checkpoint (``persist_current_checkpoint``) failing mid-file,
    as on a disk filled by another process after the room check: the half-copied folder is
    deleted and the error is one line. The write fails for real, past this process's file
    size limit (``RLIMIT_FSIZE``: EFBIG, "File too large"), so no mount is needed."""
    import resource

    from ray.train import Checkpoint
    from ray.train.v2._internal.execution.storage import StorageContext

    from campar_ray.storage import FULL, WriteError
    from campar_ray.train.persist import persist_into

    local = tmp_path / "local"
    local.mkdir()
    (local / "meta.json").write_text("{}")
    (local / "model.pt").write_bytes(b"\1" * 2**21)
    context = StorageContext(str(tmp_path / "store"), "stage1")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, hard))
    try:
        with pytest.raises(WriteError) as raised:
            persist_into(context, Checkpoint.from_directory(str(local)), "checkpoint_x")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    target = tmp_path / "store" / "stage1" / "checkpoint_x"
    assert str(raised.value) == f"cannot write checkpoint {target}: {FULL}"
    assert not target.exists()


def test_a_checkpoint_without_room_is_refused_before_a_byte_is_copied(tmp_path, monkeypatch):
    from ray.train import Checkpoint
    from ray.train.v2._internal.execution.storage import StorageContext

    from campar_ray.storage import WriteError
    from campar_ray.train import persist

    local = tmp_path / "local"
    local.mkdir()
    (local / "model.pt").write_bytes(b"\1" * 2**20)
    context = StorageContext(str(tmp_path / "store"), "stage1")
    free = shutil.disk_usage(tmp_path).free
    monkeypatch.setattr(persist, "ROOM_MARGIN", free)  # 1 MB more than the disk has
    with pytest.raises(WriteError, match=r"MB free on its disk, \d+\.\d MB needed: free some"):
        persist.persist_into(context, Checkpoint.from_directory(str(local)), "checkpoint_x")
    assert not (tmp_path / "store" / "stage1" / "checkpoint_x").exists()


@pytest.mark.ray
def test_a_20000_deep_search_record_on_tune_resume_is_one_line(
    ray_cluster, trained, tmp_path, capsys
):
    run_dir = _copy(trained[1], tmp_path)
    (run_dir / "tune").mkdir()
    record = run_dir / "tune" / "search.json"
    record.write_text("[" * 20_000 + "]" * 20_000)
    argv = ("tune", "--run-dir", str(run_dir), "--resume", "--num-samples", "1")
    line = _refused(capsys, run_dir, tmp_path / "none", *argv)
    assert line == (
        f"campar tune: error: {record} is nested more than 64 levels deep (campar's own files "
        "nest a few); it is not campar's search settings, refusing it"
    )
