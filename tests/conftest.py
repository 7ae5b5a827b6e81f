"""Shared fixtures: one small local Ray cluster per test session, a local S3-compatible
server, real data locations."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PETA_ROOT = SHARED / "datasets" / "peta"

# Tests run on 2-core machines: keep every library to a small, fixed thread budget.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
