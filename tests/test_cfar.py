"""CFAR end to end on a tiny run whose stage-1 logits are written by the test itself."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from campar_ray import storage
from campar_ray.cfar.als import fit_local, initial_attribute_factors
from campar_ray.cfar.dictionary import build_dictionary
from campar_ray.cfar.fit import fit_cfar, load_cfar
from campar_ray.cfar.head import Fc2, Fc2Split, train_fc2
from campar_ray.cfar.solver import SolverChoice, choose_solver
from campar_ray.config import LOCAL_ALS_MAX_ENTRIES, AlsSettings, CfarConfig, ConfigError
from campar_ray.decision import cfar_logits, probabilities
from campar_ray.metrics import par_metrics
from campar_ray.run.layout import RunDir
from campar_ray.run.logits import SplitLogits, read_split_logits, write_split_logits

M = 10
ATTRIBUTES = tuple(f"attr{j}" for j in range(M))
EVALUATED = ATTRIBUTES[:8]
NEVER = M - 1
SIZES = {"train": 300, "val": 150, "test": 150}
CONFIG = CfarConfig(solver="local", keys=8, iterations=10, fc2_epochs=150)


def write_tiny_run(run_dir: Path, seed: int = 0) -> None:
    """Labels drawn from six attribute sets (so attributes are strongly correlated), noisy
    logits per attribute (so stage 1 errs independently), one attribute never positive."""
    rng = np.random.default_rng(seed)
    sets = rng.random((6, M)) < 0.45
    sets[:, NEVER] = False
    for split, n in SIZES.items():
        labels = sets[rng.integers(len(sets), size=n)] ^ (rng.random((n, M)) < 0.03)
        labels[:, NEVER] = False
        signal = 2.0 * labels - 1.0
        specific = 1.2 * signal + rng.normal(scale=1.4, size=(n, M))
        specific[:, NEVER] = -3.0 + 0.3 * rng.normal(size=n)
        write_split_logits(
            RunDir(str(run_dir)).logits(split),
            SplitLogits(
                images=[f"{split}/{i}.jpg" for i in range(n)],
                labels=labels.astype(np.int8),
                shared=(0.9 * specific + 0.3 * rng.normal(size=(n, M))).astype(np.float32),
                specific=specific.astype(np.float32),
                attributes=ATTRIBUTES,
                eval_attributes=EVALUATED,
            ),
        )


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    write_tiny_run(run_dir)
    progress = []
    result = fit_cfar(str(run_dir), CONFIG, seed=0, progress=lambda *event: progress.append(event))
    return run_dir, result, progress


def test_fit_cfar_writes_every_artefact(fitted):
    run_dir, result, _ = fitted
    names = ["factors.npz", "dictionary.npz", "fc2.npz", "cfar.json", "metrics.json"]
    for name in names:
        assert (run_dir / "cfar" / name).is_file(), name
    meta = json.loads((run_dir / "cfar" / "cfar.json").read_text())
    assert meta["config"] == dataclasses.asdict(CONFIG)
    assert meta["als"]["objectives"] == result.als.objectives
    assert meta["threshold"] == result.predictor.threshold
    with np.load(run_dir / "cfar" / "factors.npz", allow_pickle=False) as factors:
        assert factors["X"].shape == (SIZES["train"], CONFIG.factors)
        assert factors["Y"].shape == (M, CONFIG.factors)  # D = 16 > M = 10 on purpose


def test_progress_reports_als_dictionary_and_fc2(fitted):
    _, result, progress = fitted
    stages = [stage for stage, _ in progress]
    assert stages.count("als") == result.als.iterations
    assert stages[-3:] == ["dictionary", "fc2", "fc2"]


def test_metrics_compare_stage1_and_cfar_side_by_side(fitted):
    run_dir, result, _ = fitted
    metrics = json.loads((run_dir / "cfar" / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result.metrics))
    columns = {"stage1_shared", "stage1_specific", "cfar_dictionary", "cfar_fold_in"}
    assert metrics["selected"] == "cfar_dictionary"
    assert metrics["eval_attributes"] == list(EVALUATED)
    for split in ("val", "test", "val_at_0.5", "test_at_0.5"):
        assert set(metrics[split]) == columns
        for values in metrics[split].values():
            assert all(np.isfinite(v) and 0 <= v <= 1 for v in values.values())
    assert all(len(v) == len(EVALUATED) for v in metrics["test_attr_mA"].values())
    assert all(0.05 <= t <= 0.95 for t in metrics["thresholds"].values())


def test_cfar_is_not_worse_than_stage1_on_validation(fitted):
    _, result, _ = fitted
    metrics = result.metrics
    for fit in result.model.fc2.values():
        # fc2 starts at stage 1 (epoch 0) and keeps its best epoch by val mean AUC
        assert fit.val_score == max(fit.curve) >= fit.curve[0]
        assert fit.curve[fit.best_epoch] == fit.val_score
    # On strongly correlated attribute sets the correlation prior helps, at tuned thresholds too.
    assert metrics["val"]["cfar_dictionary"]["mA"] > metrics["val"]["stage1_specific"]["mA"]


def test_stage1_cfar_read_at_half_is_already_calibrated(fitted):
    """fc2's bias carries its validation offsets: fitting them again finds (nearly) none."""
    from campar_ray.cfar.model import OFFSET_GRID, _decision_offsets

    run_dir, result, _ = fitted
    val = read_split_logits(RunDir(str(run_dir)).logits("val"))
    again = _decision_offsets(result.predictor.refined_logits(cfar_logits(val)), val.labels)
    step = np.diff(np.log(OFFSET_GRID) - np.log1p(-OFFSET_GRID)).max()
    known = val.labels.any(axis=0)  # an attribute with no positive keeps the lowest cut
    assert np.abs(again[known]).max() <= step + 1e-4


def test_load_cfar_round_trip(fitted):
    run_dir, result, _ = fitted
    loaded = load_cfar(str(run_dir))
    test = read_split_logits(RunDir(str(run_dir)).logits("test"))
    np.testing.assert_array_equal(
        loaded.probabilities(cfar_logits(test)), result.predictor.probabilities(cfar_logits(test))
    )
    assert loaded.threshold == result.predictor.threshold
    assert loaded.attributes == ATTRIBUTES
    columns = [ATTRIBUTES.index(a) for a in EVALUATED]
    probs = loaded.probabilities(cfar_logits(test))[:, columns]
    recomputed = par_metrics(test.labels[:, columns], probs, loaded.threshold)["mA"]
    assert recomputed == pytest.approx(result.metrics["test"]["cfar_dictionary"]["mA"])


def test_fold_in_lookup_is_saved_when_configured(tmp_path):
    write_tiny_run(tmp_path, seed=1)
    config = dataclasses.replace(CONFIG, lookup="fold-in", iterations=4, fc2_epochs=20)
    result = fit_cfar(str(tmp_path), config)
    assert result.metrics["selected"] == "cfar_fold_in"
    assert load_cfar(str(tmp_path)).estimator.lookup == "fold-in"


def test_fc2_starts_at_the_stage1_prediction():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(20, M)).astype(np.float32)
    head = Fc2(M)
    probs = probabilities(head.logits(rng.random((20, M)), logits))
    np.testing.assert_allclose(probs, probabilities(logits), rtol=1e-6)
    split = Fc2Split(rng.random((20, M)), logits, (logits > 0).astype(np.int8))
    untrained = train_fc2(split, split, lr=1e-2, epochs=0)
    assert untrained.best_epoch == 0
    np.testing.assert_array_equal(untrained.head.arrays()["weight"], head.arrays()["weight"])


@pytest.mark.parametrize("rule", ["val_auc", "val_mA", "last"])
@pytest.mark.parametrize("loss", ["weighted_bce", "bce"])
def test_fc2_keeps_the_epoch_its_rule_picks(rule, loss):
    """Each rule of ``cfar.fc2_rule`` picks its own epoch from the same curve of scores."""
    from campar_ray.metrics import mean_auc

    rng = np.random.default_rng(1)
    labels = (rng.random((60, M)) < 0.3).astype(np.int8)
    logits = (labels - 0.5 + rng.normal(scale=1.5, size=labels.shape)).astype(np.float32)
    r_hat = np.clip(labels + rng.normal(scale=0.3, size=labels.shape), 0, 1)
    train, val = (
        Fc2Split(r_hat[:40], logits[:40], labels[:40]),
        Fc2Split(r_hat[40:], logits[40:], labels[40:]),
    )
    fit = train_fc2(train, val, lr=1e-2, epochs=30, rule=rule, loss=loss, patience=30)
    assert len(fit.curve) == fit.epochs_run + 1 == 31
    if rule == "last":
        assert fit.best_epoch == 30
    else:  # the best score (ties go to the lower validation loss)
        assert fit.curve[fit.best_epoch] == fit.val_score == max(fit.curve)
    kept = fit.head.logits(val.r_hat, val.logits)
    if rule == "val_auc":
        assert mean_auc(val.labels, kept) == pytest.approx(fit.val_score)
        assert fit.val_score > fit.curve[0]  # r_hat carries the labels: fc2 learns to use it
    if rule == "val_mA":
        assert par_metrics(val.labels, probabilities(kept))["mA"] == pytest.approx(fit.val_score)


def test_dictionary_values_are_cluster_means_and_keys_are_clamped():
    rng = np.random.default_rng(0)
    groups = np.repeat([[0.9, 0.1, 0.8], [0.1, 0.9, 0.2]], 10, axis=0).astype(np.float32)
    X = rng.normal(size=(20, 4))
    with pytest.warns(UserWarning, match="keys=5 exceeds the 2 distinct training rows"):
        dictionary = build_dictionary(groups, X, keys=5)
    assert len(dictionary.keys) == 2
    for group in (slice(0, 10), slice(10, 20)):
        key = dictionary.nearest(groups[group][:1])[0]
        np.testing.assert_allclose(dictionary.keys[key], groups[group][0], rtol=1e-6)
        np.testing.assert_allclose(dictionary.values[key], X[group].mean(0), rtol=1e-12)
        np.testing.assert_array_equal(
            dictionary.factors(groups[group]), [dictionary.values[key]] * 10
        )


def test_dictionary_lookup_reconstructs_confidences_of_training_rows():
    """On data made of a few attribute sets, r_hat from the nearest key says which
    attributes are present just as r does."""
    rng = np.random.default_rng(0)
    sets = (rng.random((4, M)) < 0.5).astype(np.float32)
    r = np.clip(
        sets[rng.integers(4, size=200)] * 0.8 + 0.1 + rng.normal(scale=0.02, size=(200, M)), 0, 1
    )
    r = r.astype(np.float32)
    settings = AlsSettings(factors=6, alpha=10.0, lam=0.1, threshold=0.5, iterations=15, tol=0.0)
    als = fit_local(r, initial_attribute_factors(M, 6, 0), settings)
    dictionary = build_dictionary(r, als.X, keys=4)
    r_hat = dictionary.factors(r) @ als.Y.T
    assert np.mean((r_hat > 0.5) == (r > 0.5)) > 0.99


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lookup": "nearest"}, "lookup must be one of dictionary, fold-in"),
        ({"solver": "spark"}, "solver must be one of auto, ray, local, implicit"),
        ({"keys": 0}, r"keys\b.*in \[1, 100000\]"),
        ({"lam": -1.0}, r"lam\b.*> 0"),
        ({"fc2_lr": 0.0}, r"fc2_lr\b.*> 0"),
    ],
)
def test_bad_config_values_are_named(tmp_path, change, message):
    """Refused where the value is set (the config) or, at the latest, before any work."""
    with pytest.raises(ConfigError, match=message):
        fit_cfar(str(tmp_path), dataclasses.replace(CONFIG, **change))


def _copy_logits(run_dir: Path, to: Path) -> None:
    for split in SIZES:
        source = RunDir(str(run_dir)).logits(split)
        storage.write_bytes(RunDir(str(to)).logits(split), storage.read_bytes(source))


def test_the_auto_solver_fits_a_small_r_in_process_and_says_so(
    fitted, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    run_dir, local, _ = fitted
    _copy_logits(run_dir, tmp_path)
    auto = fit_cfar(str(tmp_path), dataclasses.replace(CONFIG, solver="auto"))
    entries = SIZES["train"] * M
    assert (
        f"[cfar] ALS solver: local (auto: {entries:,} entries of r (N x M), at most "
        f"{LOCAL_ALS_MAX_ENTRIES:,}: in this process; --solver ray or a cluster address for "
        "Ray actors)"
    ) in capsys.readouterr().err.splitlines()
    assert auto.als.objectives == local.als.objectives
    meta = json.loads((tmp_path / "cfar" / "cfar.json").read_text())
    assert meta["config"]["solver"] == "local"  # what ran, not "auto"


def test_the_auto_solver_takes_ray_for_a_large_r_or_a_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    small, large = LOCAL_ALS_MAX_ENTRIES, LOCAL_ALS_MAX_ENTRIES + 1
    assert choose_solver("auto", small).solver == "local"
    assert choose_solver("auto", large) == SolverChoice(
        "ray", f"auto: {large:,} entries of r (N x M), over {LOCAL_ALS_MAX_ENTRIES:,}"
    )
    assert choose_solver("auto", 10, "10.0.0.1:6379").solver == "ray"
    assert choose_solver("local", large, "10.0.0.1:6379").solver == "local"  # as set
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert choose_solver("auto", 10).reason == "auto: a cluster address is given (10.0.0.2:6379)"
    with pytest.raises(ValueError, match="solver must be one of auto, ray, local, implicit"):
        choose_solver("spark", 10)


@pytest.mark.ray
def test_fit_cfar_with_the_ray_solver_matches_local(ray_cluster, fitted, tmp_path):
    run_dir, local, _ = fitted
    _copy_logits(run_dir, tmp_path)
    sharded = fit_cfar(str(tmp_path), dataclasses.replace(CONFIG, solver="ray", actors=2))
    np.testing.assert_allclose(sharded.als.objectives, local.als.objectives, rtol=1e-9)
    assert sharded.metrics["val"]["cfar_dictionary"]["mA"] == pytest.approx(
        local.metrics["val"]["cfar_dictionary"]["mA"], abs=1e-6
    )


def test_a_refit_in_the_same_run_keeps_each_fits_tensorboard_curve(tmp_path):
    """A second fit starts at ALS iteration 1 again: in its own event folder, so TensorBoard
    keeps both curves instead of dropping the second's steps as out of order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_tiny_run(tmp_path, seed=2)
    config = dataclasses.replace(CONFIG, iterations=4, tol=0.0, fc2_epochs=10)
    for _ in range(2):
        fit_cfar(str(tmp_path), config)
    folders = sorted((tmp_path / "tensorboard" / "cfar").iterdir())
    assert len(folders) == 2
    for folder in folders:
        events = EventAccumulator(str(folder))
        events.Reload()
        assert [event.step for event in events.Scalars("als_objective")] == [0, 1, 2, 3]
