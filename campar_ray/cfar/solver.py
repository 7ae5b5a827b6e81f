"""One entry to CFAR's ALS: :func:`fit_als` picks the solver, the kernels never do.

Three solvers fit eq. 18 from the same start and reach the same factors:

- ``"local"``: the NumPy kernels of :mod:`campar_ray.cfar.als` in this process;
- ``"ray"``: the same kernels on row shards held by Ray actors (:mod:`.ray_als`);
- ``"implicit"``: the ``implicit`` library (:mod:`.implicit_als`), the reference.

The Ray and ``implicit`` modules are imported when chosen, so that loading a fitted stage 2
(bundles, prediction) needs neither.
"""

from __future__ import annotations

import math

import numpy as np

from campar_ray.cfar.als import (
    AlsCallback,
    AlsResult,
    check_probabilities,
    fit_local,
    initial_attribute_factors,
    probabilities,
)
from campar_ray.train.logits import read_split_logits

SOLVERS = ("ray", "local", "implicit")


def check_als_params(
    *,
    solver: str,
    factors: int,
    alpha: float,
    lam: float,
    threshold: float,
    iterations: int,
    tol: float,
    actors: int,
) -> None:
    """Raise a ValueError naming the first bad ALS setting and the values it may take."""
    checks = [
        (solver in SOLVERS, f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}"),
        (0 <= alpha < math.inf, f"alpha must be finite and >= 0, got {alpha}"),
        (
            0 < lam < math.inf,
            f"lam must be finite and > 0 (keeps every D x D system invertible), got {lam}",
        ),
        (factors >= 1, f"factors must be >= 1, got {factors}"),
        (0 < threshold < 1, f"threshold p_t must lie in (0, 1), got {threshold}"),
        (iterations >= 1, f"iterations must be >= 1, got {iterations}"),
        (tol >= 0, f"tol must be >= 0, got {tol}"),
        (actors >= 1, f"actors must be >= 1, got {actors}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def fit_als(
    source: np.ndarray | str,
    *,
    solver: str = "ray",
    factors: int,
    alpha: float,
    lam: float,
    threshold: float,
    iterations: int = 15,
    tol: float = 1e-6,
    actors: int = 2,
    seed: int = 0,
    callback: AlsCallback | None = None,
) -> AlsResult:
    """Fit eq. 18 on r: ``factors`` = D, ``c = 1 + alpha * r``, ``p = 1[r >= threshold]``,
    L2 weight ``lam`` on both factor matrices.

    ``source`` is r itself (N x M, in [0, 1]) or the path/URI of a stage-1 logits Parquet
    file, from which r = sigmoid(prediction logits). ``solver``:

    - ``"ray"``: rows sharded over ``actors`` Ray actors that read their own rows of the file
      (needs the path; the driver never holds r).
    - ``"local"``: NumPy in this process.
    - ``"implicit"``: the ``implicit`` library with ``actors`` threads (same core budget).

    Every solver starts from the same seeded ``Y`` (``seed``) and calls ``callback`` after
    each iteration. D > M is allowed: ``lam > 0`` keeps every system positive definite,
    although ``X Y^T`` cannot have rank above M, so the extra dimensions add nothing. Stops
    early when the relative objective change falls below ``tol``; raises AlsDivergedError on
    NaN.
    """
    check_als_params(
        solver=solver,
        factors=factors,
        alpha=alpha,
        lam=lam,
        threshold=threshold,
        iterations=iterations,
        tol=tol,
        actors=actors,
    )
    if solver == "ray":
        if not isinstance(source, str):
            raise TypeError(
                "solver='ray' needs the logits Parquet path (its actors read their own rows); "
                "pass the path, or use solver='local' for an in-memory r"
            )
        from campar_ray.cfar.ray_als import fit_ray

        return fit_ray(
            source,
            factors=factors,
            alpha=alpha,
            lam=lam,
            threshold=threshold,
            iterations=iterations,
            tol=tol,
            actors=actors,
            seed=seed,
            callback=callback,
        )
    r = check_probabilities(
        probabilities(read_split_logits(source).prediction) if isinstance(source, str) else source
    )
    Y0 = initial_attribute_factors(r.shape[1], factors, seed)
    if solver == "local":
        return fit_local(
            r,
            Y0,
            alpha=alpha,
            lam=lam,
            threshold=threshold,
            iterations=iterations,
            tol=tol,
            callback=callback,
        )
    from campar_ray.cfar.implicit_als import fit_implicit

    return fit_implicit(
        r,
        Y0,
        alpha=alpha,
        lam=lam,
        threshold=threshold,
        iterations=iterations,
        tol=tol,
        threads=actors,
        callback=callback,
    )
