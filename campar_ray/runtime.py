"""Connecting to Ray: an existing cluster when one is named, else a small local one.

The library itself never starts Ray (it runs wherever it is called from); the CLI and the
jobs call :func:`init_ray` once. A local cluster gets more logical CPUs than physical cores
so that fractional-CPU training workers and Ray Data decode tasks can run side by side on
a laptop (the documented way around the Data/Train resource deadlock), and its dashboard
binds to localhost only.
"""

from __future__ import annotations

import os


def local_logical_cpus() -> int:
    """Logical CPUs for a local cluster: at least 4, so 2 workers + decoding fit on 2 cores."""
    return max(4, os.cpu_count() or 1)


def init_ray(address: str | None = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``) when given, else start a local cluster."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    ray.init(
        num_cpus=local_logical_cpus(),
        dashboard_host="127.0.0.1",
        include_dashboard=False,
        log_to_driver=True,
    )
