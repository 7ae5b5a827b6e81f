"""Joining Ray: one function, which checks a named cluster before it joins. No Ray starts here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import ray

from campar_ray import runtime
from campar_ray.cli import main

PACKAGE = Path(__file__).resolve().parents[1] / "campar_ray"


def _calls_ray_init(tree: ast.AST) -> bool:
    return any(
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "init"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "ray"
        for node in ast.walk(tree)
    )


def test_only_runtime_joins_ray():
    joining = [
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*.py")
        if _calls_ray_init(ast.parse(path.read_text()))
    ]
    assert joining == ["runtime.py"]


@pytest.fixture
def unjoined(monkeypatch):
    """A process that has not joined Ray, whose ``ray.init`` must not be reached, and whose
    cluster probe records what it was asked and refuses."""
    asked = []

    def refuse(address: str, insecure: bool = False) -> None:
        asked.append((address, insecure))
        raise runtime.InsecureClusterError(f"refusing to use the Ray cluster at {address}")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **_: pytest.fail("joined an unchecked cluster"))
    monkeypatch.setattr(runtime, "require_authentication", refuse)
    monkeypatch.setattr(runtime, "_output", runtime._output)  # restored after main() sets it
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return asked


def test_a_named_cluster_is_checked_before_it_is_joined(unjoined, monkeypatch):
    with pytest.raises(runtime.InsecureClusterError):
        runtime.init_ray("10.0.0.2:6379", insecure=True)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(runtime.InsecureClusterError):
        runtime.init_ray()  # how a search and prediction join: RAY_ADDRESS is checked too
    assert unjoined == [("10.0.0.2:6379", True), ("10.0.0.1:6379", False)]


def test_a_process_that_joined_is_neither_probed_nor_joined_again(monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "init", lambda **_: pytest.fail("joined twice"))
    monkeypatch.setattr(runtime, "require_authentication", lambda *_, **__: pytest.fail("probed"))
    monkeypatch.setattr(runtime, "_output", runtime.Output(verbose=True))
    runtime.init_ray("10.0.0.1:6379")


@pytest.mark.parametrize("command", ["tune", "doctor"])
def test_the_cli_joins_through_init_ray_with_its_address_and_insecure(
    unjoined, tmp_path, capsys, command
):
    argv = [command, "--run-dir", str(tmp_path / "run"), "--address", "10.0.0.3:6379"]
    assert main([*argv, "--insecure"]) == 2
    assert main(argv) == 2
    assert unjoined == [("10.0.0.3:6379", True), ("10.0.0.3:6379", False)]
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"campar {command}: error: refusing to use the Ray cluster at 10.0.0.3:6379"


LISTENING = """
import json, os, sys, psutil
from campar_ray.runtime import init_ray
import ray
init_ray()
me = psutil.Process()
found = []
for process in [me, *me.children(recursive=True)]:
    try:
        for connection in process.net_connections(kind="inet"):
            if connection.status == psutil.CONN_LISTEN:
                found.append([connection.laddr.ip, connection.laddr.port, process.name()])
    except psutil.Error:
        pass
print(json.dumps(found))
ray.shutdown()
"""


@pytest.mark.ray
def test_a_local_cluster_keeps_its_http_ports_local_and_its_token_private(tmp_path):
    """Its own local cluster (a fresh process, a fresh home): the dashboard listens on
    127.0.0.1, no Prometheus exporter listens on every interface (the dashboard agent served
    one, unauthenticated, on 0.0.0.0), and the token file Ray writes is 0600. Ray's gRPC
    servers (GCS, raylet, workers, agents) still listen on all interfaces, behind the token."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": os.getcwd()}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-c", LISTENING], env=env, capture_output=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    listening = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert any(ip == "127.0.0.1" for ip, _, _ in listening)  # the dashboard
    assert not [entry for entry in listening if entry[0] == "0.0.0.0"]
    token = tmp_path / ".ray" / "auth_token"
    assert token.is_file() and oct(token.stat().st_mode & 0o777) == "0o600"


def test_a_log_file_on_a_full_disk_drops_records_without_a_traceback(capsys):
    """``/dev/full`` answers every write with ENOSPC, as a full disk does: Ray's log lines
    are dropped instead of each printing logging's "--- Logging error ---" traceback."""
    import logging

    handler = runtime._LogFile("/dev/full")
    logger = logging.getLogger("campar-test-full-disk")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("a line for a full disk")
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert capsys.readouterr().err == ""
