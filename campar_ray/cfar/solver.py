"""One entry to CFAR's ALS: :func:`fit_als` picks the solver, the kernels never do.

Three solvers fit eq. 18 from the same start and reach the same factors:

- ``"local"``: the NumPy kernels of :mod:`campar_ray.cfar.als` in this process;
- ``"ray"``: the same kernels on row shards held by Ray actors (:mod:`.ray_als`);
- ``"implicit"``: the ``implicit`` library (:mod:`.implicit_als`), the reference.

What is fitted travels as one value, :class:`~campar_ray.config.AlsSettings`, from the config
down to every solver, so that no layer forwards (or re-checks) its numbers one by one; how it
is solved (solver, actors, seed) stays in the arguments of :func:`fit_als`.

``cfar.solver=auto`` (the default) is resolved by :func:`choose_solver`, the one rule: the
local solver for small r, the Ray actors for a large one or on a named cluster.

The Ray and ``implicit`` modules are imported when chosen, so that loading a fitted stage 2
(bundles, prediction) needs neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from campar_ray.cfar.als import (
    AlsCallback,
    AlsResult,
    check_probabilities,
    fit_local,
    initial_attribute_factors,
)
from campar_ray.config import LOCAL_ALS_MAX_ENTRIES, SOLVERS
from campar_ray.data.manifest import known_entries
from campar_ray.decision.logits import cfar_logits, probabilities
from campar_ray.run.logits import read_split_logits
from campar_ray.runtime import cluster_address

if TYPE_CHECKING:
    from campar_ray.config import AlsSettings

AUTO = "auto"
FIT_SOLVERS = tuple(solver for solver in SOLVERS if solver != AUTO)
"""The solvers :func:`fit_als` runs: ``cfar.solver``'s choices but ``auto``."""


@dataclass(frozen=True)
class SolverChoice:
    """The solver a fit uses and why, for the one line a fit prints."""

    solver: str
    reason: str

    def line(self) -> str:
        return f"[cfar] ALS solver: {self.solver} ({self.reason})"


def choose_solver(requested: str, entries: int, address: str | None = None) -> SolverChoice:
    """``requested`` (a ``cfar.solver`` value) as the solver to run, for an r of ``entries``
    values (N x M).

    ``auto``: ``ray`` when a cluster address is given (``address``, else ``RAY_ADDRESS``: the
    work belongs on that cluster) or r has more than
    :data:`~campar_ray.config.LOCAL_ALS_MAX_ENTRIES` entries (the actors' start-up is then
    paid back), else ``local``. Any other value is kept as set.
    """
    if requested not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {requested!r}")
    if requested != AUTO:
        return SolverChoice(requested, "set by cfar.solver")
    cluster = cluster_address(address)
    if cluster:
        return SolverChoice("ray", f"auto: a cluster address is given ({cluster})")
    size = f"{entries:,} entries of r (N x M)"
    if entries > LOCAL_ALS_MAX_ENTRIES:
        return SolverChoice("ray", f"auto: {size}, over {LOCAL_ALS_MAX_ENTRIES:,}")
    return SolverChoice(
        "local",
        f"auto: {size}, at most {LOCAL_ALS_MAX_ENTRIES:,}: in this process; --solver ray or "
        "a cluster address for Ray actors",
    )


def fit_als(
    source: np.ndarray | str,
    settings: AlsSettings,
    *,
    solver: str = "ray",
    actors: int = 2,
    seed: int = 0,
    callback: AlsCallback | None = None,
    known: np.ndarray | None = None,
) -> AlsResult:
    """Fit eq. 18 on r with ``settings`` (what is fitted; range-checked when they were built).

    ``source`` is r itself (N x M, in [0, 1]) or the path/URI of a stage-1 logits Parquet
    file, from which r = sigmoid(prediction logits). ``solver`` says how:

    - ``"ray"``: rows sharded over ``actors`` Ray actors that read their own rows of the file
      (needs the path; the driver never holds r).
    - ``"local"``: NumPy in this process.
    - ``"implicit"``: the ``implicit`` library with ``actors`` threads (same core budget).

    Every solver starts from the same seeded ``Y`` (``seed``) and calls ``callback`` after
    each iteration. Unknown labels are no observation: a file's come from its ``labels``,
    an in-memory r's from ``known`` (N x M, None: every label known). D > M is allowed:
    ``lam > 0`` keeps every system positive definite, although ``X Y^T`` cannot have rank
    above M, so the extra dimensions add nothing. Stops early when the relative objective
    change falls below ``settings.tol``; raises AlsDivergedError on NaN.
    """
    if solver not in FIT_SOLVERS:
        raise ValueError(
            f"solver must be one of {', '.join(FIT_SOLVERS)}, got {solver!r} "
            "(choose_solver resolves 'auto')"
        )
    if actors < 1:
        raise ValueError(f"actors must be >= 1, got {actors}")
    if solver == "ray":
        if not isinstance(source, str):
            raise TypeError(
                "solver='ray' needs the logits Parquet path (its actors read their own rows); "
                "pass the path, or use solver='local' for an in-memory r"
            )
        from campar_ray.cfar.ray_als import fit_ray

        return fit_ray(source, settings, actors, seed, callback)
    if isinstance(source, str):
        logits = read_split_logits(source)
        source, known = probabilities(cfar_logits(logits)), known_entries(logits.labels)
    r = check_probabilities(source)
    Y0 = initial_attribute_factors(r.shape[1], settings.factors, seed)
    if solver == "local":
        return fit_local(r, Y0, settings, callback, known=known)
    from campar_ray.cfar.implicit_als import fit_implicit

    return fit_implicit(r, Y0, settings, actors, callback, known=known)
