"""Connecting to Ray: an existing cluster when one is named, else a small local one.

The library itself never starts Ray (it runs wherever it is called from); the CLI and the
jobs call :func:`init_ray` once. A local cluster gets more logical CPUs than physical cores
so that fractional-CPU training workers and Ray Data decode tasks can run side by side on
a laptop (the documented way around the Data/Train resource deadlock), and binds its
dashboard to localhost only. Its token authentication is Ray's own default for local
clusters since 2.59 (``RAY_AUTH_MODE`` is read once per process, before this code runs, so
setting it here would split the driver and the cluster it starts).

A Ray cluster that accepts clients without a token runs any code anyone who can reach it
sends. :func:`require_authentication` refuses such a cluster unless the user says
``--insecure``: it connects once *without* credentials in a separate process (the
authentication mode is fixed per process) and only an "unauthenticated" refusal passes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

HOST_PORT = re.compile(r"^[\w.\-]+:\d+$")
PROBE = """
import sys
from ray._raylet import GcsClient
from ray.exceptions import AuthenticationError
try:
    GcsClient(address=sys.argv[1]).internal_kv_keys(b"", None, timeout=10)
except AuthenticationError:
    sys.exit(0)
sys.exit(3)
"""
PROBE_REFUSED, PROBE_OPEN = 0, 3


class InsecureClusterError(ValueError):
    """The cluster named would accept anyone's code; the message says how to secure it."""


def local_logical_cpus() -> int:
    """Logical CPUs for a local cluster: at least 4, so 2 workers + decoding fit on 2 cores."""
    return max(4, os.cpu_count() or 1)


def cluster_address(address: str | None = None) -> str | None:
    """The cluster to join: ``address``, else ``RAY_ADDRESS``, else None (start a local one)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def require_authentication(address: str, insecure: bool = False) -> None:
    """Raise :class:`InsecureClusterError` unless the cluster at ``address`` demands a token.

    ``insecure=True`` skips the check (a trusted, isolated network). Addresses that are not
    a GCS ``host:port`` (``ray://`` clients) cannot be probed and need ``--insecure``.
    """
    if insecure:
        return
    why = "its authentication cannot be checked there; use its GCS address host:port, or --insecure"
    if HOST_PORT.match(address):
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
        probe = subprocess.run(
            [sys.executable, "-c", PROBE, address],
            env={**env, "RAY_AUTH_MODE": "disabled"},
            capture_output=True,
            timeout=120,
            check=False,
        )
        if probe.returncode == PROBE_REFUSED:
            return
        if probe.returncode != PROBE_OPEN:
            tail = probe.stderr.decode(errors="replace").strip().splitlines()[-1:]
            raise ConnectionError(f"cannot reach the Ray cluster at {address}: {''.join(tail)}")
        why = (
            "it accepts clients without a token, so anyone who can reach it can run code on "
            "it; start its nodes with RAY_AUTH_MODE=token (README, Operating), or pass "
            "--insecure on a trusted network"
        )
    raise InsecureClusterError(f"refusing to use the Ray cluster at {address}: {why}")


def init_ray(address: str | None = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``) when given, else start a local cluster."""
    import ray

    if ray.is_initialized():
        return
    address = cluster_address(address)
    if address:
        ray.init(address=address)
        return
    ray.init(
        num_cpus=local_logical_cpus(),
        dashboard_host="127.0.0.1",
        include_dashboard=False,
        log_to_driver=True,
    )
