"""A real multi-node Ray cluster on one machine, started with the same `ray start` commands
a cloud cluster runs (head + worker nodes, each with its own raylet and resources).

Token authentication is on, as on every cluster the project configures. Every process of
the cluster carries its private ``--temp-dir`` in its command line, which is how a node is
killed (its raylet and everything under it, as when a machine dies) and how the whole
cluster is torn down without touching any other Ray instance on the machine (``ray stop``
would stop them all). With ``share_nothing`` each node gets its own temp dir and working
directory under it, as separate machines would: no node finds another's session files,
runtime environments or relative paths.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))
REPOSITORY = Path(__file__).resolve().parents[1]
OBJECT_STORE_BYTES = 150 * 1024 * 1024  # per node: four nodes share one small machine


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now and that this test process has not handed out before:
    the OS may give a just-closed probe's port again, and two agents of a node on one port
    make ``ray start`` fail (it did: ``--dashboard-agent-listen-port`` and
    ``--runtime-env-agent-port`` both 37245)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@dataclass
class LocalCluster:
    """Head (no CPUs: it schedules and runs the job driver) plus named worker nodes."""

    temp_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="crt-", dir="/tmp"))
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    nodes: dict[str, int] = field(default_factory=dict)
    """Worker node name -> raylet pid."""
    auth: bool = True
    """Token authentication; False makes the insecure cluster ``--insecure`` is about."""
    share_nothing: bool = False
    """Each node its own ``--temp-dir`` and working directory (``<temp_dir>/<node>``)."""

    @classmethod
    @contextlib.contextmanager
    def running(
        cls, nodes: dict[str, float], share_nothing: bool = False
    ) -> Iterator[LocalCluster]:
        """A head plus one worker node per ``name: cpus``, torn down on exit."""
        cluster = cls(share_nothing=share_nothing)
        try:
            cluster.start_head()
            for name, cpus in nodes.items():
                cluster.add_node(name, cpus=cpus)
            yield cluster
        finally:
            cluster.shutdown()

    @property
    def env(self) -> dict[str, str]:
        """Auth mode and token for every node and client; this venv's ``python`` first on PATH."""
        return {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "token" if self.auth else "disabled",
            "RAY_AUTH_TOKEN": self.token,
            "OMP_NUM_THREADS": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_DATA_DISABLE_PROGRESS_BARS": "1",  # job logs stay readable
            # Ray's OOM killer reads the whole machine's memory, which on one shared test
            # machine is mostly other work's: it would kill this cluster's workers for it.
            "RAY_memory_monitor_refresh_ms": "0",
            # A killed node is found dead after 3 failed health checks 1 s apart (Ray's
            # defaults: 5, 3 s apart), as Ray's own node-failure tests shorten it; a node
            # that only stalls still has 3 x 10 s before it is declared dead.
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
        }

    @property
    def node_env(self) -> dict[str, str]:
        """Worker nodes also name the head: Ray's helpers that look for "the" local cluster
        (Train's placement-group cleaner) must not pick another Ray on the same machine."""
        return {**self.env, "RAY_ADDRESS": self.gcs_address}

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start_head(self, cpus: float = 0) -> None:
        self._ray(
            "start",
            "--head",
            f"--port={self.gcs_port}",
            f"--num-cpus={cpus}",
            f"--temp-dir={self._node_dir('head')}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            *self._agent_ports(),
            cwd=self._node_dir("head", "cwd"),
        )

    def add_node(self, name: str, cpus: float = 1) -> int:
        """Start a worker node; its custom resource ``name`` tells its raylet apart."""
        before = set(self._raylets())
        self._ray(
            "start",
            f"--address={self.gcs_address}",
            f"--num-cpus={cpus}",
            f"--resources={json.dumps({name: 1})}",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            *self._agent_ports(),
            *([f"--temp-dir={self._node_dir(name)}"] if self.share_nothing else []),
            env=self.node_env,
            cwd=self._node_dir(name, "cwd"),
        )
        (pid,) = set(self._raylets()) - before
        self.nodes[name] = pid
        return pid

    def kill_node(self, name: str) -> int:
        """SIGKILL a worker node's raylet and every process under it; the number killed."""
        raylet = psutil.Process(self.nodes.pop(name))
        victims = [raylet, *raylet.children(recursive=True)]
        for process in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGKILL)
        return len(victims)

    def node_of(self, pid: int) -> str | None:
        """The worker node whose raylet started process ``pid``."""
        ancestors = {parent.pid for parent in psutil.Process(pid).parents()}
        return next((name for name, raylet in self.nodes.items() if raylet in ancestors), None)

    def actors(self, class_name: str, alive_only: bool = True) -> list[dict]:
        """Actors of a class, through the state API (as `ray list actors` shows them)."""
        alive = ["--filter=state=ALIVE"] if alive_only else []
        return self._state("actors", f"--filter=class_name={class_name}", *alive)

    def _state(self, kind: str, *filters: str) -> list[dict]:
        out = self._ray(
            "list", kind, f"--address={self.dashboard}", *filters, "--format=json", "--detail"
        )
        return json.loads(out) if out.lstrip().startswith("[") else []  # "No resource in..."

    @contextlib.contextmanager
    def job(
        self, entrypoint: list[str], runtime_env: str, log_path: Path
    ) -> Iterator[subprocess.Popen]:
        """The README's ``ray job submit --working-dir . --runtime-env ENV -- ENTRYPOINT``,
        run from the repository root in the background, output into ``log_path``; a job
        still running when the block exits is stopped."""
        with log_path.open("w") as log:
            job = subprocess.Popen(
                [
                    RAY,
                    "job",
                    "submit",
                    f"--address={self.dashboard}",
                    "--working-dir",
                    ".",
                    "--runtime-env",
                    runtime_env,
                    "--",
                    *entrypoint,
                ],
                cwd=REPOSITORY,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
            try:
                yield job
            finally:
                if job.poll() is None:
                    job.kill()

    def shutdown(self) -> None:
        """Kill every process of this cluster (and only of this cluster), then drop its logs."""
        for process in psutil.process_iter(["cmdline"]):
            try:
                if any(self.temp_dir in part for part in process.info["cmdline"] or ()):
                    process.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        self.nodes.clear()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _node_dir(self, node: str, kind: str = "tmp") -> str | None:
        """A node's own temp dir or working directory; without share_nothing the cluster's
        temp dir and this process's working directory (None)."""
        if not self.share_nothing:
            return self.temp_dir if kind == "tmp" else None
        folder = Path(self.temp_dir, node if kind == "tmp" else f"{node}-{kind}")
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder)

    @staticmethod
    def _agent_ports() -> list[str]:
        """Each node's agents on their own ports: fixed defaults would clash on one machine."""
        return [
            f"--{flag}={free_port()}"
            for flag in (
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "runtime-env-agent-port",
                "metrics-export-port",
            )
        ]

    def _raylets(self) -> list[int]:
        pids = []
        for process in psutil.process_iter(["name", "cmdline"]):
            cmdline = process.info["cmdline"] or ()
            if process.info["name"] == "raylet" and any(self.temp_dir in p for p in cmdline):
                pids.append(process.pid)
        return pids

    def _ray(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float = 300,
    ) -> str:
        done = subprocess.run(
            [RAY, *args],
            env=env or self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode:
            raise RuntimeError(f"ray {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
