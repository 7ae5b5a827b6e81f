"""How many decode tasks a run keeps going: the one reading of ``data.decode_concurrency``.

A number is kept as given. ``0`` (the default) is automatic: as many tasks of
``data.decode_cpus`` as the CPUs the training workers leave, at least one (one pool of tasks
reads, decodes, resizes and augments). The preflight makes it concrete here for the cluster
the run gets and plans with that number, training builds its datasets with the number the
preflight hands back, and a search counts each trial's tasks here. The caller says how many
CPUs the cluster has: nothing here asks Ray.
"""

from __future__ import annotations

from campar_ray.config import DataConfig, TrainConfig


def decode_tasks(concurrency: int, decode_cpus: float, free_cpus: float) -> int:
    """``concurrency``, or for 0 as many tasks of ``decode_cpus`` as ``free_cpus`` hold (at
    least one)."""
    if concurrency > 0:
        return concurrency
    return max(1, int(free_cpus // decode_cpus))


def least_decode_tasks(data: DataConfig) -> int:
    """The decode tasks a run cannot start without: the number set, or automatic's first
    task (it then grows into whatever the workers leave)."""
    return decode_tasks(data.decode_concurrency, data.decode_cpus, free_cpus=0.0)


def cluster_decode_tasks(data: DataConfig, train: TrainConfig, cluster_cpus: float) -> int:
    """``data.decode_concurrency`` made concrete on a cluster of ``cluster_cpus`` CPUs:
    :func:`decode_tasks` of the CPUs the training workers (all of an elastic range) leave there."""
    free = cluster_cpus - train.max_workers * train.cpus_per_worker
    return decode_tasks(data.decode_concurrency, data.decode_cpus, free)
