"""The same ALS handed to the ``implicit`` library: the reference the project's solvers match.

``implicit`` treats a stored ``v > 0`` as p = 1 with confidence v and ``v < 0`` as p = 0
with confidence |v| (METHOD.md, ALS notes) and an entry it does not store as p = 0 with
confidence 1, so a CSR matrix with every known entry stored states eq. 17-18 exactly, unknown
labels being no observation; started from the same factors with the same
:class:`~campar_ray.config.AlsSettings`, it reaches the objective of
:func:`campar_ray.cfar.als.fit_local`.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from campar_ray.cfar.als import (
    AlsCallback,
    AlsResult,
    Monitor,
    check_known,
    check_probabilities,
    check_start,
    objective,
)

if TYPE_CHECKING:
    from campar_ray.config import AlsSettings


def confidence_matrix(
    r: np.ndarray, alpha: float, threshold: float, known: np.ndarray | None = None
) -> sp.csr_matrix:
    """Eq. 17 in ``implicit``'s convention, as a CSR matrix with every known entry stored.

    A stored ``v > 0`` means p = 1 with confidence v, ``v < 0`` p = 0 with confidence |v|,
    so ``where(p, 1, -1) * (1 + alpha * r)`` states eq. 18 exactly; an entry left out
    (not ``known``) is implicit's p = 0 with confidence 1, no observation. Built from the
    flat arrays directly, never through a dense float64 copy.
    """
    n, m = r.shape
    confidence = (1.0 + alpha * np.asarray(r, dtype=np.float32)).astype(np.float32)
    data = np.where(np.asarray(r) >= threshold, confidence, -confidence).ravel()
    indices = np.tile(np.arange(m, dtype=np.int32), n)
    if known is None:
        indptr = np.arange(0, n * m + 1, m, dtype=np.int64)
        return sp.csr_matrix((data, indices, indptr), shape=(n, m))
    stored = np.asarray(known, dtype=bool).ravel()
    indptr = np.concatenate([[0], np.cumsum(known.sum(axis=1), dtype=np.int64)])
    return sp.csr_matrix((data[stored], indices[stored], indptr), shape=(n, m))


class _Converged(Exception):
    """Raised from implicit's per-iteration callback to stop its loop early."""


def fit_implicit(
    r: np.ndarray,
    Y0: np.ndarray,
    settings: AlsSettings,
    threads: int = 1,
    callback: AlsCallback | None = None,
    *,
    dtype: type = np.float32,
    known: np.ndarray | None = None,
) -> AlsResult:
    """The same fit with ``implicit.cpu.als.AlternatingLeastSquares`` (the reference).

    implicit's own ``alpha`` stays 1.0 (the confidences are in the matrix), ``regularization
    = lam`` unscaled, ``use_cg=False`` for exact solves. Pre-set ``user_factors`` and
    ``item_factors`` are kept by ``fit`` (it only draws random ones when they are None) and
    keep their dtype; the matrix is always float32 inside implicit. ``elapsed`` passed to the
    callback is implicit's own time, excluding the objective computed here for monitoring.
    BLAS is pinned to one thread so that ``threads`` OpenMP threads are all it uses.
    """
    from implicit.cpu.als import AlternatingLeastSquares

    r = check_probabilities(r)
    known = check_known(known, r.shape)
    check_start(Y0, r.shape[1], settings)
    alpha, threshold, lam = settings.alpha, settings.threshold, settings.lam
    matrix = confidence_matrix(r, alpha, threshold, known)
    monitor = Monitor(settings.tol, callback)
    elapsed = 0.0
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(
            factors=settings.factors,
            regularization=lam,
            alpha=1.0,
            dtype=dtype,
            use_cg=False,
            iterations=settings.iterations,
            num_threads=threads,
        )
        model.user_factors = np.zeros((len(r), settings.factors), dtype=dtype)
        model.item_factors = Y0.astype(dtype)

        def on_iteration(iteration: int, seconds: float, _loss: float | None) -> None:
            nonlocal elapsed
            elapsed += seconds
            X, Y = model.user_factors, model.item_factors
            value = objective(r, X, Y, alpha=alpha, threshold=threshold, lam=lam, known=known)
            if monitor.record(iteration, value, elapsed, X, Y):
                raise _Converged

        with contextlib.suppress(_Converged):
            model.fit(matrix, show_progress=False, callback=on_iteration)
    return AlsResult(
        model.user_factors.astype(np.float64),
        model.item_factors.astype(np.float64),
        monitor.objectives,
        len(monitor.objectives),
        monitor.converged,
    )
