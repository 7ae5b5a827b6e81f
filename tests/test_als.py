"""ALS: exact kernels against direct solves, the local and Ray solvers against implicit."""

from __future__ import annotations

import itertools
import os
import signal

import numpy as np
import pytest

from campar_ray.cfar import als, implicit_als
from campar_ray.cfar.solver import fit_als
from campar_ray.config import AlsSettings, CfarConfig, ConfigError
from campar_ray.decision import probabilities
from campar_ray.run.logits import SplitLogits, write_split_logits

N, M, D = 240, 8, 4
PARAMS = dict(alpha=10.0, lam=0.1, threshold=0.5)


def settings(**change) -> AlsSettings:
    """The test problem's settings (D factors, PARAMS), with ``change`` applied."""
    return AlsSettings(**(dict(factors=D, **PARAMS) | change))


def low_rank_logits(n: int = N, m: int = M, seed: int = 0) -> np.ndarray:
    """Logits with correlated attributes: rank-3 structure plus noise, float32 like stage 1."""
    rng = np.random.default_rng(seed)
    structure = rng.normal(size=(n, 3)) @ rng.normal(size=(3, m))
    return (1.5 * structure + rng.normal(size=(n, m))).astype(np.float32)


@pytest.fixture(scope="module")
def r() -> np.ndarray:
    return probabilities(low_rank_logits())


@pytest.fixture(scope="module")
def logits_file(tmp_path_factory) -> str:
    logits = low_rank_logits()
    names = tuple(f"a{j}" for j in range(M))
    path = str(tmp_path_factory.mktemp("run") / "logits" / "train.parquet")
    write_split_logits(
        path,
        SplitLogits(
            images=[f"img{i}.jpg" for i in range(N)],
            labels=(logits > 0).astype(np.int8),
            shared=logits - 0.1,
            specific=logits,
            attributes=names,
            eval_attributes=names,
        ),
    )
    return path


def direct_image_step(r: np.ndarray, Y: np.ndarray, alpha: float, threshold: float, lam: float):
    """x_i = (Y^T C_i Y + lam I)^-1 Y^T C_i p_i, one np.linalg.solve per row, literally."""
    X = np.empty((len(r), Y.shape[1]))
    for i, row in enumerate(r.astype(np.float64)):
        c = 1 + alpha * row
        p = (r[i] >= threshold).astype(np.float64)
        lhs = Y.T @ np.diag(c) @ Y + lam * np.eye(Y.shape[1])
        X[i] = np.linalg.solve(lhs, Y.T @ (c * p))
    return X


def test_image_step_equals_direct_solve_per_row(r):
    Y = np.random.default_rng(1).normal(size=(M, D))
    expected = direct_image_step(r, Y, **PARAMS)
    batched = als.solve_image_factors(r, Y, als.gram(Y), chunk_rows=7, **PARAMS)
    np.testing.assert_allclose(batched, expected, rtol=1e-6, atol=1e-9)


def test_implicit_image_step_equals_direct_solve(r):
    from implicit.cpu.als import AlternatingLeastSquares

    Y = np.random.default_rng(1).normal(size=(M, D))
    model = AlternatingLeastSquares(factors=D, regularization=PARAMS["lam"], dtype=np.float64)
    model.item_factors = Y
    matrix = implicit_als.confidence_matrix(r, PARAMS["alpha"], PARAMS["threshold"])
    implicit_x = model.recalculate_user(np.arange(N), matrix)
    expected = direct_image_step(r, Y, **PARAMS)
    np.testing.assert_allclose(implicit_x, expected, rtol=1e-6, atol=1e-6)


def test_attribute_step_equals_direct_solve_and_shares_add_up(r):
    X = np.random.default_rng(2).normal(size=(N, D))
    stats = als.attribute_stats(r, X, alpha=10.0, threshold=0.5, chunk_rows=50)
    halves = als.attribute_stats(r[:100], X[:100], alpha=10.0, threshold=0.5) + als.attribute_stats(
        r[100:], X[100:], alpha=10.0, threshold=0.5
    )
    np.testing.assert_allclose(halves.lhs, stats.lhs, rtol=1e-12)
    np.testing.assert_allclose(halves.rhs, stats.rhs, rtol=1e-12)
    Y = als.solve_attribute_factors(stats, lam=0.1)
    expected = direct_image_step(r.T, X, **PARAMS)  # the attribute step is the image step of r^T
    np.testing.assert_allclose(Y, expected, rtol=1e-8, atol=1e-10)


def test_objective_from_statistics_equals_direct_objective(r):
    rng = np.random.default_rng(3)
    X, Y = rng.normal(size=(N, D)), rng.normal(size=(M, D))
    stats = als.attribute_stats(r, X, alpha=10.0, threshold=0.5)
    direct = als.objective(r, X, Y, **PARAMS)
    assert als.objective_from_stats(stats, Y, lam=0.1) == pytest.approx(direct, rel=1e-10)


def test_local_solver_matches_implicit(r):
    fifteen = settings(iterations=15, tol=0.0)
    local = fit_als(r, fifteen, solver="local", seed=0)
    reference = fit_als(r, fifteen, solver="implicit", actors=1, seed=0)
    assert local.iterations == reference.iterations == 15
    np.testing.assert_allclose(local.objectives, reference.objectives, rtol=1e-3)
    assert local.objectives[-1] == pytest.approx(
        als.objective(r, local.X, local.Y, **PARAMS), rel=1e-10
    )
    # implicit with float64 factors (its confidences stay float32): the factors themselves agree.
    exact = implicit_als.fit_implicit(
        r, als.initial_attribute_factors(M, D, 0), fifteen, dtype=np.float64
    )
    np.testing.assert_allclose(local.X, exact.X, atol=1e-6 * np.abs(local.X).max())
    np.testing.assert_allclose(local.Y, exact.Y, atol=1e-6 * np.abs(local.Y).max())


def test_objective_never_increases_and_callback_reports_each_iteration(r):
    seen = []
    result = fit_als(
        r,
        settings(iterations=10, tol=0.0),
        solver="local",
        callback=lambda *values: seen.append(values),
    )
    assert [s[0] for s in seen] == list(range(10))
    assert [s[1] for s in seen] == result.objectives
    assert seen[0][2] == float("inf")
    assert all(b <= a * (1 + 1e-12) for a, b in itertools.pairwise(result.objectives))
    assert all(b >= a for a, b in itertools.pairwise(s[3] for s in seen))


@pytest.mark.parametrize("solver", ["local", "implicit"])
def test_early_stop_on_tolerance(r, solver):
    result = fit_als(r, settings(iterations=200, tol=1e-3), solver=solver)
    assert result.converged
    assert result.iterations < 200
    last, previous = result.objectives[-1], result.objectives[-2]
    assert abs(previous - last) / previous < 1e-3


@pytest.mark.parametrize("fit", [als.fit_local, implicit_als.fit_implicit])
def test_nan_factors_raise_named_error(r, fit):
    Y0 = np.ones((M, D))
    Y0[1, 2] = np.nan
    with pytest.raises(als.AlsDivergedError, match="iteration 0"):
        fit(r, Y0, settings(iterations=3, tol=0.0))


def test_attribute_never_predicted_positive_gets_zero_factor(r):
    never = r.copy()
    never[:, 3] = 0.2  # below p_t for every image: p_.3 = 0
    result = fit_als(never, settings(iterations=5), solver="local")
    np.testing.assert_array_equal(result.Y[3], 0.0)
    assert np.isfinite(result.X).all()


def test_more_factors_than_attributes_is_well_posed(r):
    result = fit_als(r, settings(factors=2 * M, iterations=8, tol=0.0), solver="local")
    assert result.X.shape == (N, 2 * M)
    assert np.isfinite(result.objectives).all()
    assert result.objectives[-1] < result.objectives[0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lam": 0.0}, r"bad value 0.0 for cfar.lam: expected a regularisation > 0"),
        ({"alpha": float("nan")}, "bad value nan for cfar.alpha: expected a confidence slope"),
        ({"threshold": 1.0}, r"bad value 1.0 for cfar.threshold: .* in \(0, 1\)"),
        ({"factors": 0}, r"bad value 0 for cfar.factors: expected a latent dimension in \[1, "),
        ({"iterations": 0}, "bad value 0 for cfar.iterations: expected a number of iterations"),
        ({"tol": -1.0}, "bad value -1.0 for cfar.tol: expected a relative change >= 0"),
    ],
)
def test_bad_settings_are_named_by_their_config_key(change, message):
    """AlsSettings owns the ALS ranges: built from code or from a config, the same message."""
    with pytest.raises(ConfigError, match=message):
        settings(**change)
    with pytest.raises(ConfigError, match=message):
        CfarConfig(**change)


def test_config_hands_its_als_keys_over_as_one_value():
    config = CfarConfig(factors=7, alpha=2.0, lam=0.3, threshold=0.4, iterations=9, tol=1e-3)
    assert config.als == AlsSettings(
        factors=7, alpha=2.0, lam=0.3, threshold=0.4, iterations=9, tol=1e-3
    )
    assert CfarConfig().als == AlsSettings(factors=16, alpha=10.0, lam=0.1, threshold=0.5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"solver": "spark"}, "solver must be one of ray, local, implicit"),
        ({"actors": 0}, "actors must be >= 1"),
    ],
)
def test_bad_solver_arguments_are_named(r, change, message):
    with pytest.raises(ValueError, match=message):
        fit_als(r, settings(iterations=2), **(dict(solver="local", actors=1) | change))


@pytest.mark.parametrize("fit", [als.fit_local, implicit_als.fit_implicit])
def test_starting_factors_must_match_the_settings(r, fit):
    with pytest.raises(ValueError, match=rf"starting Y must be {M} x {D + 1}"):
        fit(r, als.initial_attribute_factors(M, D, 0), settings(factors=D + 1))


def test_bad_inputs_are_refused(r):
    with pytest.raises(TypeError, match="logits Parquet path"):
        fit_als(r, settings(), solver="ray")
    broken = r.copy()
    broken[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_als(broken, settings(), solver="local")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fit_als(r * 2, settings(), solver="local")


def test_local_solver_reads_a_logits_file(r, logits_file):
    from_file = fit_als(logits_file, settings(iterations=3), solver="local")
    in_memory = fit_als(r, settings(iterations=3), solver="local")
    assert from_file.objectives == in_memory.objectives


def test_more_actors_than_rows_is_refused(logits_file):
    from campar_ray.cfar.ray_als import ShardedAls

    with pytest.raises(ValueError, match=f"actors={N + 1} exceeds the {N} rows"):
        ShardedAls(logits_file, settings(), actors=N + 1)


@pytest.mark.ray
@pytest.mark.parametrize("actors", [1, 2])
def test_ray_solver_equals_local_solver(ray_cluster, r, logits_file, actors):
    six = settings(iterations=6, tol=0.0)
    local = fit_als(r, six, solver="local", seed=3)
    sharded = fit_als(logits_file, six, solver="ray", actors=actors, seed=3)
    np.testing.assert_allclose(sharded.objectives, local.objectives, rtol=1e-10)
    np.testing.assert_allclose(sharded.X, local.X, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(sharded.Y, local.Y, rtol=1e-8, atol=1e-10)


@pytest.mark.ray
def test_ray_solver_survives_killed_actors(ray_cluster, r, logits_file):
    """Kill one actor mid-fit (its next step is retried on the restarted actor) and again after
    the last step (its X is lost and recomputed): same objectives as an undisturbed fit."""
    from campar_ray.cfar.ray_als import ShardedAls

    iterations = 6
    six = settings(iterations=iterations, tol=0.0)
    undisturbed = als.fit_local(r, als.initial_attribute_factors(M, D, 0), six)
    killed = []
    with ShardedAls(logits_file, six, actors=2) as solver:

        def kill(iteration, *_):
            if iteration in (2, iterations - 1):
                pid = solver.pids()[1]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

        result = solver.fit(als.initial_attribute_factors(M, D, 0), kill)
        survivors = solver.pids()
    assert len(set(killed)) == 2 and not set(killed) & set(survivors)
    np.testing.assert_allclose(result.objectives, undisturbed.objectives, rtol=1e-6)
    np.testing.assert_allclose(result.X, undisturbed.X, rtol=1e-6, atol=1e-9)
