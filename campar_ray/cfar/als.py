"""Implicit-feedback ALS for CFAR (eq. 17-18): the NumPy kernels and the local solver.

Every entry of the N x M confidence matrix is observed, so each half-step is an exact D x D
solve per row (no sparse tricks, no conjugate gradient). Both half-steps are written in the
shape that shards: a kernel takes a slice of image rows plus a small statistic of the other
side (``Y`` and its Gram matrix) and returns the slice's image factors, or the slice's
additive share of the M attribute systems. :func:`fit_local` runs the kernels on one shard,
:mod:`campar_ray.cfar.ray_als` on one shard per Ray actor; :mod:`campar_ray.cfar.implicit_als`
hands the same problem to the ``implicit`` library, the reference the tests compare against,
and :func:`campar_ray.cfar.solver.fit_als` picks one of the three.

The solvers take the settings as one :class:`~campar_ray.config.AlsSettings` (checked where it
is built) and a starting ``Y`` that must match them; the kernels below take the plain numbers
they use, so that they stay readable as the equations and testable on their own.

Unknown labels (-1) of training images are "no observation", the place implicit feedback has
for an entry nobody saw: preference 0 at the lowest confidence 1, whatever stage 1 predicted
there (``known``, N x M, masks r out of p and c; None when every label is known). ``implicit``
states the same by not storing the entry.

The objective is read off the attribute-step statistics (``objective_from_stats``), so
monitoring convergence costs O(M D^2) per iteration instead of another pass over r.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from campar_ray.config import AlsSettings

CHUNK_ROWS = 2048

AlsCallback = Callable[[int, float, float, float], None]
"""``callback(iteration, objective, relative_change, elapsed_seconds)`` after each iteration;
``iteration`` counts from 0 and ``relative_change`` is ``inf`` on the first one."""


class AlsDivergedError(FloatingPointError):
    """The factors or the objective stopped being finite (NaN or inf)."""


@dataclass(frozen=True)
class AlsResult:
    """Factors after the last iteration and the objective (eq. 18) after each one.

    ``X`` is the image step's solution given the ``Y`` of the previous iteration and ``Y`` the
    attribute step's given that ``X``: the pair whose objective is ``objectives[-1]``.
    """

    X: np.ndarray
    Y: np.ndarray
    objectives: list[float]
    iterations: int
    converged: bool


@dataclass(frozen=True)
class AttributeStats:
    """One shard's additive share of the attribute step and of the objective.

    ``lhs[j] = X^T C_j X`` (M x D x D), ``rhs[j] = X^T C_j p_j`` (M x D), ``targets[j] =
    sum_i c_ij p_ij^2`` (M) and ``factor_norm = |X|^2`` over the shard's rows. Shares of
    disjoint row sets add up to the statistics of their union.
    """

    lhs: np.ndarray
    rhs: np.ndarray
    targets: np.ndarray
    factor_norm: float

    def __add__(self, other: AttributeStats) -> AttributeStats:
        return AttributeStats(
            self.lhs + other.lhs,
            self.rhs + other.rhs,
            self.targets + other.targets,
            self.factor_norm + other.factor_norm,
        )


def targets(
    r: np.ndarray, alpha: float, threshold: float, known: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Preferences ``p = 1[r >= p_t]`` and confidences ``c = 1 + alpha * r`` (float64); an
    entry that is not ``known`` is no observation: ``p = 0``, ``c = 1``."""
    r = np.asarray(r)
    if known is None:
        return (r >= threshold).astype(np.float64), 1.0 + alpha * r.astype(np.float64)
    observed = np.where(known, r, 0).astype(np.float64)
    return (known & (r >= threshold)).astype(np.float64), 1.0 + alpha * observed


def _rows(known: np.ndarray | None, start: int, stop: int) -> np.ndarray | None:
    return None if known is None else known[start:stop]


def gram(factors: np.ndarray) -> np.ndarray:
    """``F^T F``: the D x D statistic every row system of the other side starts from."""
    return factors.T @ factors


def initial_attribute_factors(attributes: int, factors: int, seed: int) -> np.ndarray:
    """Seeded starting ``Y`` (M x D). ``X`` needs none: the first half-step solves it from Y."""
    return np.random.default_rng(seed).normal(scale=0.1, size=(attributes, factors))


def solve_image_factors(
    r: np.ndarray,
    Y: np.ndarray,
    YtY: np.ndarray,
    *,
    alpha: float,
    threshold: float,
    lam: float,
    chunk_rows: int = CHUNK_ROWS,
    known: np.ndarray | None = None,
) -> np.ndarray:
    """Image step for rows ``r``: ``x_i = (Y^T C_i Y + lam I)^-1 Y^T C_i p_i`` for every row.

    ``Y^T C_i Y = YtY + sum_j (c_ij - 1) y_j y_j^T``, so a single GEMM of a chunk's ``c - 1``
    against the M flattened outer products builds all of the chunk's systems, which one
    batched ``np.linalg.solve`` then solves exactly. Working memory beyond r and X is about
    ``chunk_rows * (D*D + 3*M + D) * 8`` bytes (19 MB for 2048 rows, M = 51, D = 32).
    """
    n, m = r.shape
    d = Y.shape[1]
    outer = (Y[:, :, None] * Y[:, None, :]).reshape(m, d * d)
    base = YtY + lam * np.eye(d)
    X = np.empty((n, d))
    for start in range(0, n, chunk_rows):
        stop = start + chunk_rows
        p, c = targets(r[start:stop], alpha, threshold, _rows(known, start, stop))
        lhs = ((c - 1.0) @ outer).reshape(-1, d, d) + base
        rhs = (c * p) @ Y
        X[start : start + len(p)] = np.linalg.solve(lhs, rhs[..., None])[..., 0]
    return X


def attribute_stats(
    r: np.ndarray,
    X: np.ndarray,
    *,
    alpha: float,
    threshold: float,
    chunk_rows: int = CHUNK_ROWS,
    known: np.ndarray | None = None,
) -> AttributeStats:
    """The attribute-step statistics of rows ``r`` with image factors ``X``.

    ``X^T C_j X`` for all j at once: ``c^T`` times the rows' flattened outer products ``x_i
    x_i^T``. Working memory about ``chunk_rows * (D*D + 3*M) * 8`` bytes plus M*D*D*8.
    """
    m = r.shape[1]
    d = X.shape[1]
    lhs = np.zeros((m, d * d))
    rhs = np.zeros((m, d))
    weighted_targets = np.zeros(m)
    for start in range(0, len(r), chunk_rows):
        stop = start + chunk_rows
        p, c = targets(r[start:stop], alpha, threshold, _rows(known, start, stop))
        x = X[start:stop]
        lhs += c.T @ (x[:, :, None] * x[:, None, :]).reshape(-1, d * d)
        rhs += (c * p).T @ x
        weighted_targets += (c * p * p).sum(0)
    return AttributeStats(lhs.reshape(m, d, d), rhs, weighted_targets, float(np.sum(X * X)))


def solve_attribute_factors(stats: AttributeStats, lam: float) -> np.ndarray:
    """Attribute step: ``y_j = (X^T C_j X + lam I)^-1 X^T C_j p_j`` for the M attributes."""
    d = stats.rhs.shape[1]
    return np.linalg.solve(stats.lhs + lam * np.eye(d), stats.rhs[..., None])[..., 0]


def objective_from_stats(stats: AttributeStats, Y: np.ndarray, lam: float) -> float:
    """Eq. 18 from the statistics: ``sum_ij c (p - x^T y)^2`` expands per attribute to
    ``sum_i c p^2 - 2 y^T X^T C p + y^T X^T C X y``, all of which ``stats`` holds."""
    fit = (
        stats.targets.sum()
        - 2.0 * np.einsum("jd,jd->", Y, stats.rhs)
        + np.einsum("jd,jde,je->", Y, stats.lhs, Y)
    )
    return float(fit + lam * (stats.factor_norm + np.sum(Y * Y)))


def objective(
    r: np.ndarray,
    X: np.ndarray,
    Y: np.ndarray,
    *,
    alpha: float,
    threshold: float,
    lam: float,
    chunk_rows: int = CHUNK_ROWS,
    known: np.ndarray | None = None,
) -> float:
    """Eq. 18 computed directly, entry by entry (the obviously-correct reference)."""
    total = 0.0
    for start in range(0, len(r), chunk_rows):
        stop = start + chunk_rows
        p, c = targets(r[start:stop], alpha, threshold, _rows(known, start, stop))
        total += float(np.sum(c * (p - X[start:stop] @ Y.T) ** 2))
    return total + lam * float(np.sum(X * X) + np.sum(Y * Y))


class Shard:
    """Rows of r held by one worker, which of them are known (None: all), and their image
    factors from the latest step."""

    def __init__(
        self,
        r: np.ndarray,
        settings: AlsSettings,
        *,
        chunk_rows: int = CHUNK_ROWS,
        known: np.ndarray | None = None,
    ) -> None:
        self.r = check_probabilities(r)
        self.known = check_known(known, self.r.shape)
        self.settings, self.chunk_rows = settings, chunk_rows
        self.X: np.ndarray | None = None

    def solve(self, Y: np.ndarray, YtY: np.ndarray) -> np.ndarray:
        """Image step for this shard; keeps and returns X."""
        self.X = solve_image_factors(
            self.r,
            Y,
            YtY,
            alpha=self.settings.alpha,
            threshold=self.settings.threshold,
            lam=self.settings.lam,
            chunk_rows=self.chunk_rows,
            known=self.known,
        )
        return self.X

    def step(self, Y: np.ndarray, YtY: np.ndarray) -> AttributeStats:
        """Image step, then this shard's share of the attribute step."""
        X = self.solve(Y, YtY)
        return attribute_stats(
            self.r,
            X,
            alpha=self.settings.alpha,
            threshold=self.settings.threshold,
            chunk_rows=self.chunk_rows,
            known=self.known,
        )


def check_known(known: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """``known`` as a boolean array of r's shape (or None: every entry known)."""
    if known is None:
        return None
    known = np.asarray(known, dtype=bool)
    if known.shape != shape:
        raise ValueError(f"known must have r's shape {shape}, got {known.shape}")
    return known


def check_probabilities(r: np.ndarray) -> np.ndarray:
    """r as a float32 N x M array of finite values in [0, 1], or a ValueError saying why not."""
    r = np.asarray(r, dtype=np.float32)
    if r.ndim != 2 or r.shape[1] == 0:
        raise ValueError(f"r must be an N x M array with M >= 1, got shape {r.shape}")
    if not np.isfinite(r).all():
        raise ValueError("r holds NaN or inf: check the stage-1 logits")
    if r.size and (r.min() < 0 or r.max() > 1):
        raise ValueError(f"r must lie in [0, 1] (sigmoid of logits), got [{r.min()}, {r.max()}]")
    return r


def check_start(Y0: np.ndarray, attributes: int, settings: AlsSettings) -> None:
    """Raise a ValueError unless the starting Y is M x D, D being ``settings.factors``: the
    settings, not the array, say how many factors a fit has."""
    if np.shape(Y0) != (attributes, settings.factors):
        raise ValueError(
            f"the starting Y must be {attributes} x {settings.factors} (attributes x "
            f"settings.factors), got shape {np.shape(Y0)}"
        )


class Monitor:
    """Objective bookkeeping shared by every solver: NaN check, callback, early stop."""

    def __init__(self, tol: float, callback: AlsCallback | None) -> None:
        self.tol, self.callback = tol, callback
        self.objectives: list[float] = []
        self.converged = False

    def record(self, iteration: int, value: float, elapsed: float, *factors: np.ndarray) -> bool:
        """Log one iteration; True when the relative objective change fell below ``tol``."""
        if not math.isfinite(value) or not all(np.isfinite(f).all() for f in factors):
            raise AlsDivergedError(
                f"ALS diverged at iteration {iteration}: objective {value} or the factors are "
                "not finite (NaN/inf in the inputs or starting factors, or an ill-conditioned "
                "problem: lower alpha or raise lam)"
            )
        previous = self.objectives[-1] if self.objectives else None
        if previous is None:
            change = math.inf
        else:  # an objective of 0 (p_t above every r: nothing to fit) has converged
            change = (
                0.0 if previous == value else abs(previous - value) / max(abs(previous), 1e-300)
            )
        self.objectives.append(value)
        if self.callback is not None:
            self.callback(iteration, value, change, elapsed)
        self.converged = change < self.tol
        return self.converged


def alternate(
    step: Callable[[np.ndarray], AttributeStats],
    Y: np.ndarray,
    settings: AlsSettings,
    callback: AlsCallback | None = None,
) -> tuple[np.ndarray, Monitor]:
    """The ALS loop around ``step(Y)`` (image step + attribute statistics, on any shards).

    Returns the final Y and the monitor holding the objective after each iteration.
    """
    monitor = Monitor(settings.tol, callback)
    start = time.perf_counter()
    for iteration in range(settings.iterations):
        stats = step(Y)
        Y = solve_attribute_factors(stats, settings.lam)
        value = objective_from_stats(stats, Y, settings.lam)
        if monitor.record(iteration, value, time.perf_counter() - start, Y):
            break
    return Y, monitor


def fit_local(
    r: np.ndarray,
    Y0: np.ndarray,
    settings: AlsSettings,
    callback: AlsCallback | None = None,
    *,
    chunk_rows: int = CHUNK_ROWS,
    known: np.ndarray | None = None,
) -> AlsResult:
    """ALS in this process on an in-memory r (one shard), from the starting ``Y0``; entries
    outside ``known`` (None: all known) are no observation."""
    shard = Shard(r, settings, chunk_rows=chunk_rows, known=known)
    check_start(Y0, shard.r.shape[1], settings)
    Y, monitor = alternate(lambda Y: shard.step(Y, gram(Y)), Y0, settings, callback)
    return AlsResult(shard.X, Y, monitor.objectives, len(monitor.objectives), monitor.converged)
