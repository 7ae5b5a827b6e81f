"""The ALS of :mod:`campar_ray.cfar.als` with the image rows sharded over Ray actors.

Each actor reads its own rows of the stage-1 logits Parquet file (the driver never holds r),
with their labels, whose unknown entries are no observation as in the local solver, and keeps
their image factors. Per iteration the driver puts ``(Y, Y^T Y)`` in the object
store once; every actor runs the image step on its rows and returns its additive share of the
M attribute systems (M x D x D + M x D + M + 1 numbers); the driver adds the shares, solves
the M systems for Y and reads the objective off the same sums. Traffic per actor and
iteration is O(M D^2), whatever the number of rows. Each actor receives the fit's
:class:`~campar_ray.config.AlsSettings` once, when it is created, since its shard's
confidences and preferences depend on them.

Failures: an actor that dies is restarted (``max_restarts``) by rerunning its constructor,
which reloads its shard; an in-flight call is retried (``max_task_retries``). The lost X needs
no checkpoint, because a step computes X from Y alone: a retried step recomputes it, and the
final fetch of X recomputes it from the Y it was solved against when the actor restarted
after its last step. A restarted fit therefore reaches the same factors as an undisturbed one.
"""

from __future__ import annotations

import itertools
import math
import os
import resource
from typing import TYPE_CHECKING

import numpy as np
import ray
from threadpoolctl import threadpool_limits

from campar_ray.cfar.als import (
    AlsCallback,
    AlsResult,
    AttributeStats,
    Shard,
    alternate,
    check_start,
    gram,
    initial_attribute_factors,
)
from campar_ray.data.manifest import known_entries
from campar_ray.decision.logits import cfar_logits, probabilities
from campar_ray.run.logits import count_rows, read_split_logits
from campar_ray.runtime import init_ray

if TYPE_CHECKING:
    from campar_ray.config import AlsSettings

MAX_RESTARTS = 3
"""Restarts per actor (and retries per call) before a fit gives up with RayActorError."""
ACTOR_CPUS = 0.5
"""CPUs each actor reserves unless told otherwise (a search trial reserves as many per actor)."""


@ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
class ShardActor:
    """Rows ``[start, stop)`` of one logits file, loaded by the actor itself."""

    def __init__(
        self, path: str, start: int, stop: int, settings: AlsSettings, *, threads: int
    ) -> None:
        threadpool_limits(threads)
        logits = read_split_logits(path, start, stop)
        self._shard = Shard(
            probabilities(cfar_logits(logits)), settings, known=known_entries(logits.labels)
        )
        self._step: int | None = None

    def step(self, side: tuple[np.ndarray, np.ndarray], step: int) -> AttributeStats:
        """Image step from ``side = (Y, Y^T Y)``, then this shard's attribute statistics."""
        stats = self._shard.step(*side)
        self._step = step
        return stats

    def image_factors(self, side: tuple[np.ndarray, np.ndarray], step: int) -> np.ndarray:
        """X of step ``step``, recomputed from that step's ``side`` if a restart lost it."""
        if self._step != step:
            self._shard.solve(*side)
            self._step = step
        return self._shard.X

    def pid(self) -> int:
        return os.getpid()

    def usage(self) -> dict[str, float]:
        """This actor process's peak resident memory (bytes; Linux counts ru_maxrss in KiB)
        and the CPU seconds it has used."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {"peak_rss": usage.ru_maxrss * 1024, "cpu_seconds": usage.ru_utime + usage.ru_stime}


class ShardedAls:
    """Actors holding the row shards of one logits file, set up for one ``settings`` (each
    shard's confidences depend on them); ``fit`` may be called repeatedly.

    ``cpus_per_actor`` may be fractional (0.5 lets two actors share a core on a laptop);
    each actor pins its BLAS to ``max(1, floor(cpus_per_actor))`` threads.
    """

    def __init__(
        self,
        path: str,
        settings: AlsSettings,
        *,
        actors: int,
        cpus_per_actor: float = ACTOR_CPUS,
    ) -> None:
        rows = count_rows(path)
        if actors > rows:
            raise ValueError(f"actors={actors} exceeds the {rows} rows of {path}")
        self.rows = rows
        self.attributes = len(read_split_logits(path, 0, 0).attributes)
        self.settings = settings
        bounds = np.linspace(0, rows, actors + 1).astype(int)
        options = ShardActor.options(num_cpus=cpus_per_actor)
        self.actors = [
            options.remote(
                path,
                int(start),
                int(stop),
                settings,
                threads=max(1, math.floor(cpus_per_actor)),
            )
            for start, stop in itertools.pairwise(bounds)
        ]

    def fit(self, Y0: np.ndarray, callback: AlsCallback | None = None) -> AlsResult:
        """ALS from ``Y0``; the actors keep their shards for the next fit."""
        check_start(Y0, self.attributes, self.settings)
        side, number = None, -1

        def step(Y: np.ndarray) -> AttributeStats:
            nonlocal side, number
            side, number = ray.put((Y, gram(Y))), number + 1
            shares = ray.get([actor.step.remote(side, number) for actor in self.actors])
            return sum(shares[1:], shares[0])

        Y, monitor = alternate(step, Y0, self.settings, callback)
        parts = [actor.image_factors.remote(side, number) for actor in self.actors]
        X = np.concatenate(ray.get(parts))
        return AlsResult(X, Y, monitor.objectives, len(monitor.objectives), monitor.converged)

    def pids(self) -> list[int]:
        return ray.get([actor.pid.remote() for actor in self.actors])

    def usage(self) -> list[dict[str, float]]:
        """Each actor's peak memory and CPU time (for benchmarks and capacity planning)."""
        return ray.get([actor.usage.remote() for actor in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)

    def __enter__(self) -> ShardedAls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fit_ray(
    path: str,
    settings: AlsSettings,
    actors: int,
    seed: int = 0,
    callback: AlsCallback | None = None,
    *,
    cpus_per_actor: float = ACTOR_CPUS,
) -> AlsResult:
    """One ALS fit on Ray actors from the seeded starting Y; the actors are released
    afterwards. Joins Ray as :func:`~campar_ray.runtime.init_ray` does when this process has
    not (``cfar.solver=auto`` picks this solver for a large r without being asked to)."""
    init_ray()
    with ShardedAls(path, settings, actors=actors, cpus_per_actor=cpus_per_actor) as solver:
        Y0 = initial_attribute_factors(solver.attributes, settings.factors, seed)
        return solver.fit(Y0, callback)
