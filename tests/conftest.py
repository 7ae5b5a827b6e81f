"""Shared fixtures: one small local Ray cluster per test session, a local S3-compatible
server, real data locations."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_checks import TINY_TRAIN, black_png
from multinode import free_port

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PETA_ROOT = SHARED / "datasets" / "peta"

# Tests run on 2-core machines: keep every library to a small, fixed thread budget.
os.environ.setdefault("OMP_NUM_THREADS", "1")


S3_BUCKET = "campar-test"
S3_ENV = {
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
    "AWS_ACCESS_KEY_ID": "campar-test-key",
    "AWS_SECRET_ACCESS_KEY": "campar-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
"""The ``s3_server`` fixture's endpoint and credentials, fixed before any Ray worker starts:
``ray_cluster`` hands them to every worker (workers inherit Ray's environment, not the
test process's later one), the S3 tests set them in the test process."""


def start_moto(port: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    """moto's standalone S3-compatible server on 127.0.0.1:``port``, once it answers."""
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            return server
        except OSError:
            if server.poll() is not None:
                break
            time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"moto server did not answer on 127.0.0.1:{port}")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) with the bucket ``S3_BUCKET``; yields ``s3://bucket``.

    The test process gets ``S3_ENV`` (endpoint, credentials) for the session, as a user's
    shell would; pyarrow, and so every ``campar`` path, picks the endpoint up.
    """
    pytest.importorskip("moto.server", reason="the test extra installs moto[server]")
    import pyarrow.fs as pafs

    server = start_moto(int(S3_ENV["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    with pytest.MonkeyPatch.context() as patch:
        for key, value in S3_ENV.items():
            patch.setenv(key, value)
        pafs.S3FileSystem(
            endpoint_override=S3_ENV["AWS_ENDPOINT_URL"], allow_bucket_creation=True
        ).create_dir(S3_BUCKET)
        yield f"s3://{S3_BUCKET}"
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster shared by every integration test of the session.

    Four logical CPUs on a 2-core machine leave room for Ray Data next to fractional-CPU
    training workers (the documented way to avoid the Data/Train resource deadlock). Its
    workers get ``S3_ENV``, so any test may use ``s3_server`` whenever it runs.
    """
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": S3_ENV},
    )
    yield ray
    workers = ray_workers()
    ray.shutdown()
    reap(workers)


def ray_workers() -> list:
    """Ray worker processes this test process started (children of its raylet)."""
    import psutil

    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.name().startswith("ray::"):
                found.append(process)
        except psutil.Error:
            continue  # exited while we looked
    return found


def reap(workers: list, timeout: float = 20.0) -> None:
    """Wait for ``workers`` to exit after ``ray.shutdown``; kill and name any that do not.

    A Ray worker can hang in interpreter teardown once its raylet is gone (Ray tracks this for
    train workers in ray-project/ray#59872); a fresh-clone CI run here left a TrainController
    of 1.3 GB alive for as long as the machine ran. Nothing a test starts may outlive it.
    """
    import psutil

    _, alive = psutil.wait_procs(workers, timeout=timeout)
    for process in alive:
        warnings.warn(
            f"killed {process.name()} (pid {process.pid}): alive {timeout:.0f} s after "
            "ray.shutdown",
            stacklevel=1,
        )
        process.kill()


@dataclass(frozen=True)
class TinyRun:
    """A finished one-epoch ``campar train`` run (``TINY_TRAIN``), as it was when it finished."""

    manifest: str
    """48 synthetic images; the first two training rows are a 200-megapixel bomb and a
    2000 x 1000 PNG, over the run's ``data.max_image_pixels``."""
    argv: tuple[str, ...]
    """The options it was trained with: ``TINY_TRAIN``, the pixel cap, the MLflow store."""
    run_dir: Path
    mlflow_uri: str
    out: str
    """What ``campar train`` printed."""
    skipped: dict
    """``logits/skipped.json``: the images the logits leave out."""
    epoch1: dict
    """Epoch 1's metrics."""
    mlflow_run_id: str


@pytest.fixture(scope="session")
def tiny_run(ray_cluster, tmp_path_factory) -> TinyRun:
    """One tiny real training shared by the session's tests, the expensive part of each.

    ``test_run_dir`` resumes it and then restarts it in place (``--fresh``), as its last test;
    other tests read what the fields recorded or copy ``run_dir``.
    """
    import contextlib
    import io
    import json

    import pyarrow as pa
    from mlflow.tracking import MlflowClient

    from campar_ray.cli import main
    from campar_ray.data import generate_synthetic, read_manifest
    from campar_ray.data.manifest import write_manifest
    from campar_ray.run.checkpoints import stage1_checkpoints

    root = tmp_path_factory.mktemp("tiny-run")
    table, info = read_manifest(generate_synthetic(str(root / "data"), n=48, size=(32, 16)))
    images = table.column("image").to_pylist()
    splits = table.column("split").to_pylist()
    train = [row for row, split in enumerate(splits) if split == "train"]
    for row, (name, width, height) in zip(
        train[:2], [("bomb", 20000, 10000), ("big", 2000, 1000)], strict=True
    ):
        images[row] = f"{name}.png"
        black_png(root / "data" / images[row], width, height)
    manifest = str(root / "data" / "bombs.parquet")
    write_manifest(manifest, table.set_column(0, "image", pa.array(images)), info)
    uri = f"file://{root}/mlruns"
    argv = (
        *TINY_TRAIN, "--set", "data.max_image_pixels=1000000", "--set", f"tracking.mlflow_uri={uri}"
    )  # fmt: skip
    run_dir = root / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(
            ["train", "--manifest", manifest, "--run-dir", str(run_dir), *argv, "--epochs", "1"]
        )
    assert code == 0, out.getvalue()
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("campar").experiment_id])
    return TinyRun(
        manifest=manifest,
        argv=argv,
        run_dir=run_dir,
        mlflow_uri=uri,
        out=out.getvalue(),
        skipped=json.loads((run_dir / "logits" / "skipped.json").read_text()),
        epoch1=stage1_checkpoints(str(run_dir))[-1][1]["history"][0],
        mlflow_run_id=run.info.run_id,
    )


@pytest.fixture(scope="session")
def peta_root() -> Path:
    if not (PETA_ROOT / "PETA dataset").is_dir():
        pytest.skip(f"real PETA images not found at {PETA_ROOT} (../shared is absent)")
    return PETA_ROOT


@pytest.fixture
def strict_s3_endpoint() -> str:
    """Another moto server that checks credentials (IAM mode) and knows none: any key is bad."""
    pytest.importorskip("moto.server", reason="the test extra installs moto[server]")
    port = free_port()
    server = start_moto(port, {"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=30)
