"""Stage 2 end to end: stage-1 logits -> ALS -> dictionary -> fc2 -> metrics -> artefacts.

Reads ``<run_dir>/logits/{train,val,test}.parquet`` (r = sigmoid of the prediction logits:
``l_specific`` for the CAM-PAR head, ``l_shared`` for the baseline head) and writes, through
:mod:`campar_ray.storage` so that run directories may be URIs, into ``<run_dir>/cfar/``:

- ``factors.npz`` (X, Y), ``dictionary.npz`` (keys, values), ``fc2.npz`` (weight, bias),
  all plain arrays loaded with ``allow_pickle=False``;
- ``cfar.json``: the config used, the ALS objective per iteration, fc2's selection and the
  final decision threshold;
- ``metrics.json``: stage 1 alone (shared and specific logits) next to stage 1 + CFAR with
  either lookup, on val and test, over the evaluated attributes.

fc2 is trained once per lookup (it takes seconds), so metrics compare the dictionary with
fold-in; the configured ``cfg.lookup`` is the one saved and loaded by :func:`load_cfar`.
Every decision threshold is chosen on validation data only, one per column, by mA.

With ``solver="ray"`` the ALS actors read their own rows of the training logits; this driver
still reads the whole training split once (N x M float32) for k-means and fc2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from campar_ray import storage
from campar_ray.artifacts import load_arrays, save_arrays
from campar_ray.cfar.als import AlsResult, check_als_params, fit_als, probabilities
from campar_ray.cfar.dictionary import (
    LOOKUPS,
    AttributeSetDictionary,
    ConfidenceEstimator,
    build_dictionary,
)
from campar_ray.cfar.head import Fc2, Fc2Fit, Fc2Split, train_fc2
from campar_ray.config import CfarConfig, ConfigError, TrackingConfig
from campar_ray.metrics import choose_threshold, par_metrics, summary
from campar_ray.tracking import (
    TENSORBOARD_DIR,
    Tracker,
    markdown_table,
    open_tracker,
    resolve_tracking,
)
from campar_ray.train.logits import SplitLogits, logits_path, read_split_logits

CFAR_DIR = "cfar"
SPLITS = ("train", "val", "test")
REPORTED = ("val", "test")

Progress = Callable[[str, dict[str, Any]], None]
"""``progress(stage, values)``: stage ``als`` after each ALS iteration (iteration,
objective, relative_change, elapsed), then ``dictionary`` (keys) and ``fc2`` (lookup,
best_epoch, epochs_run, val_mA)."""

PROBABILITIES_FILE = "probabilities.npz"
"""``<column>.<split>``: the probabilities every figure of ``metrics.json`` was computed from."""


@dataclass(frozen=True)
class CfarPredictor:
    """Stage-1 prediction logits in, CFAR probabilities out (no Ray, no stage-1 network)."""

    estimator: ConfidenceEstimator
    head: Fc2
    threshold: float
    """Decision threshold on :meth:`probabilities`, chosen on validation data."""
    attributes: tuple[str, ...]

    def probabilities(self, prediction_logits: np.ndarray) -> np.ndarray:
        """sigmoid(fc2(concat(r_hat, l))) for stage-1 prediction logits l (N x M)."""
        logits = np.asarray(prediction_logits, dtype=np.float32)
        r_hat = self.estimator.reconstruct(probabilities(logits))
        return self.head.probabilities(r_hat, logits)


@dataclass(frozen=True)
class CfarResult:
    """What :func:`fit_cfar` wrote (``output_dir``) and the in-memory results behind it."""

    output_dir: str
    als: AlsResult
    predictor: CfarPredictor
    metrics: dict[str, Any]


def als_options(cfg: CfarConfig) -> dict[str, Any]:
    """The ``cfar`` keys that are ALS parameters, as ``fit_als`` keyword arguments."""
    names = ("alpha", "lam", "factors", "threshold", "iterations", "tol", "solver", "actors")
    return {name: getattr(cfg, name) for name in names}


def check_cfar_config(cfg: CfarConfig) -> None:
    """Raise a ConfigError naming the first bad ``cfar`` value and what it may be."""
    try:
        check_als_params(**als_options(cfg))
    except ValueError as error:
        raise ConfigError(f"cfar: {error}") from None
    checks = [
        (cfg.keys >= 1, f"keys must be >= 1, got {cfg.keys}"),
        (cfg.lookup in LOOKUPS, f"lookup must be one of {', '.join(LOOKUPS)}, got {cfg.lookup!r}"),
        (cfg.fc2_lr > 0, f"fc2_lr must be > 0, got {cfg.fc2_lr}"),
        (cfg.fc2_epochs >= 0, f"fc2_epochs must be >= 0, got {cfg.fc2_epochs}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"cfar: {message}")


def fit_cfar(
    run_dir: str,
    cfg: CfarConfig,
    seed: int = 0,
    progress: Progress | None = None,
    tracking: TrackingConfig | None = None,
) -> CfarResult:
    """Fit stage 2 on a run's stage-1 logits and write its artefacts (see module doc).

    The fit is tracked as ``tracking`` says (default: TensorBoard files in
    ``<run_dir>/tensorboard/cfar``): its config, the ALS objective per iteration, the val and
    test metrics of every column and a short report. Each fit is a new MLflow run.
    """
    check_cfar_config(cfg)
    tracker = _open_tracker(run_dir, cfg, seed, resolve_tracking(tracking or TrackingConfig()))
    report = _tracked(progress or (lambda stage, values: None), tracker)
    splits = {name: read_split_logits(logits_path(run_dir, name)) for name in SPLITS}
    train = splits["train"]
    _check_same_attributes(splits)
    columns = eval_columns(train)
    als, dictionary = fit_factors(run_dir, train, cfg, seed, report)
    report("dictionary", {"keys": len(dictionary.keys)})

    predictors, fits = {}, {}
    for lookup in LOOKUPS:
        estimator = ConfidenceEstimator(
            als.Y, dictionary, lookup, cfg.alpha, cfg.threshold, cfg.lam
        )
        predictors[lookup], fits[lookup] = _fit_predictor(estimator, splits, cfg, columns)
        report("fc2", {"lookup": lookup, **_fit_summary(fits[lookup])})
    predictor = predictors[cfg.lookup]
    probs = _probabilities(splits, predictors, columns)
    metrics = _metrics(splits, probs, predictors, columns, selected=cfg.lookup)

    output_dir = storage.join(run_dir, CFAR_DIR)
    save_arrays(storage.join(output_dir, "factors.npz"), X=als.X, Y=als.Y)
    save_arrays(
        storage.join(output_dir, "dictionary.npz"), keys=dictionary.keys, values=dictionary.values
    )
    save_arrays(storage.join(output_dir, "fc2.npz"), **predictor.head.arrays())
    save_arrays(  # the evidence behind metrics.json, so any protocol can be re-scored later
        storage.join(output_dir, PROBABILITIES_FILE),
        **{
            f"{column}.{split}": values
            for column, by in probs.items()
            for split, values in by.items()
        },
    )
    _write_json(
        storage.join(output_dir, "cfar.json"),
        {
            "config": dataclasses.asdict(cfg),
            "seed": seed,
            "attributes": list(train.attributes),
            "prediction_logits": "shared" if train.specific is None else "specific",
            "als": {
                "objectives": als.objectives,
                "iterations": als.iterations,
                "converged": als.converged,
            },
            "keys_used": len(dictionary.keys),
            "fc2": {lookup: _fit_summary(fit) for lookup, fit in fits.items()},
            "threshold": predictor.threshold,
        },
    )
    _write_json(storage.join(output_dir, "metrics.json"), metrics)
    tracker.log_final(
        {
            f"{split}/{column}/{name}": value
            for split in REPORTED
            for column, values in metrics[split].items()
            for name, value in values.items()
        }
    )
    tracker.log_report(cfar_report(metrics))
    tracker.close()
    return CfarResult(output_dir, als, predictor, metrics)


def cfar_report(metrics: dict[str, Any]) -> str:
    """Markdown: stage 1 alone and stage 1 + CFAR, on val and test (thresholds from val)."""
    tables = "\n\n".join(f"{split}\n\n{markdown_table(metrics[split])}" for split in REPORTED)
    return f"**CFAR** (saved: {metrics['selected']}; thresholds chosen on val)\n\n{tables}\n"


def _open_tracker(run_dir: str, cfg: CfarConfig, seed: int, tracking: TrackingConfig) -> Tracker:
    tracker = open_tracker(
        tracking,
        log_dir=storage.join(run_dir, TENSORBOARD_DIR, CFAR_DIR),
        experiment=tracking.experiment,
        run_name=f"{os.path.basename(run_dir.rstrip('/'))}/{CFAR_DIR}",
        tags={"campar.run_dir": run_dir, "campar.stage": CFAR_DIR},
    )
    tracker.log_config({"cfar": dataclasses.asdict(cfg), "seed": seed})
    return tracker


def _tracked(progress: Progress, tracker: Tracker) -> Progress:
    """``progress`` that also sends each ALS iteration's objective to the tracker."""

    def report(stage: str, values: dict[str, Any]) -> None:
        if stage == "als":
            als = {"als_objective": values["objective"]}
            if math.isfinite(values["relative_change"]):  # inf on the first iteration
                als["als_relative_change"] = values["relative_change"]
            tracker.log_metrics(als, step=int(values["iteration"]))
        progress(stage, values)

    return report


def fit_factors(
    logits_dir: str,
    train: SplitLogits,
    cfg: CfarConfig,
    seed: int,
    progress: Progress | None = None,
) -> tuple[AlsResult, AttributeSetDictionary]:
    """ALS on the training confidences, then the attribute-set dictionary on them.

    The Ray solver's actors read their rows from ``logits_dir``'s train file themselves;
    the other solvers take the in-memory ``r`` of ``train``.
    """
    report = progress or (lambda stage, values: None)
    r_train = probabilities(train.prediction)
    als = fit_als(
        logits_path(logits_dir, "train") if cfg.solver == "ray" else r_train,
        **als_options(cfg),
        seed=seed,
        callback=lambda iteration, value, change, elapsed: report(
            "als",
            {
                "iteration": iteration,
                "objective": value,
                "relative_change": change,
                "elapsed": elapsed,
            },
        ),
    )
    return als, build_dictionary(r_train, als.X, cfg.keys, seed)


def load_cfar(run_dir: str) -> CfarPredictor:
    """The saved stage-2 predictor of a run (the configured lookup, fc2, threshold)."""
    directory = storage.join(run_dir, CFAR_DIR)
    meta = json.loads(storage.read_bytes(storage.join(directory, "cfar.json")))
    cfg = meta["config"]
    factors = load_arrays(storage.join(directory, "factors.npz"))
    entries = load_arrays(storage.join(directory, "dictionary.npz"))
    fc2 = load_arrays(storage.join(directory, "fc2.npz"))
    estimator = ConfidenceEstimator(
        factors["Y"],
        AttributeSetDictionary(entries["keys"], entries["values"]),
        cfg["lookup"],
        cfg["alpha"],
        cfg["threshold"],
        cfg["lam"],
    )
    return CfarPredictor(
        estimator,
        Fc2.from_arrays(fc2["weight"], fc2["bias"]),
        float(meta["threshold"]),
        tuple(meta["attributes"]),
    )


def eval_columns(logits: SplitLogits) -> np.ndarray:
    """Indices of the evaluated attributes within all attributes (all when none are named)."""
    if not logits.eval_attributes:
        return np.arange(len(logits.attributes))
    unknown = sorted(set(logits.eval_attributes) - set(logits.attributes))
    if unknown:
        raise ValueError(f"evaluated attributes {unknown} are not among {logits.attributes}")
    return np.array([logits.attributes.index(name) for name in logits.eval_attributes])


def _check_same_attributes(splits: dict[str, SplitLogits]) -> None:
    reference = splits["train"].attributes
    for name, split in splits.items():
        if split.attributes != reference:
            raise ValueError(
                f"the {name} logits have attributes {split.attributes}, train has {reference}"
            )


def _fit_predictor(
    estimator: ConfidenceEstimator,
    splits: dict[str, SplitLogits],
    cfg: CfarConfig,
    columns: np.ndarray,
) -> tuple[CfarPredictor, Fc2Fit]:
    """fc2 on train (selected on val), then its decision threshold on val."""

    def fc2_inputs(split: SplitLogits) -> Fc2Split:
        r_hat = estimator.reconstruct(probabilities(split.prediction))
        return Fc2Split(r_hat, split.prediction, split.labels)

    val = splits["val"]
    fit = train_fc2(
        fc2_inputs(splits["train"]),
        fc2_inputs(val),
        lr=cfg.fc2_lr,
        epochs=cfg.fc2_epochs,
        columns=columns,
    )
    predictor = CfarPredictor(estimator, fit.head, 0.5, splits["train"].attributes)
    probs = predictor.probabilities(val.prediction)
    threshold = choose_threshold(val.labels[:, columns], probs[:, columns])
    return dataclasses.replace(predictor, threshold=float(threshold)), fit


def _fit_summary(fit: Fc2Fit) -> dict[str, float]:
    return {
        "best_epoch": fit.best_epoch,
        "epochs_run": fit.epochs_run,
        "val_mA": fit.val_mA,
        "val_loss": fit.val_loss,
    }


def _probabilities(
    splits: dict[str, SplitLogits], predictors: dict[str, CfarPredictor], columns: np.ndarray
) -> dict[str, dict[str, np.ndarray]]:
    """Column -> split -> probabilities of the evaluated attributes, on the reported splits:
    stage 1's shared and specific logits and stage 1 + CFAR for every lookup."""
    probs: dict[str, dict[str, np.ndarray]] = {}
    for column, field in (("stage1_shared", "shared"), ("stage1_specific", "specific")):
        if getattr(splits["train"], field) is not None:
            probs[column] = {
                name: probabilities(getattr(splits[name], field))[:, columns] for name in REPORTED
            }
    for lookup, predictor in predictors.items():
        probs[_column(lookup)] = {
            name: predictor.probabilities(splits[name].prediction)[:, columns] for name in REPORTED
        }
    return probs


def _metrics(
    splits: dict[str, SplitLogits],
    probs: dict[str, dict[str, np.ndarray]],
    predictors: dict[str, CfarPredictor],
    columns: np.ndarray,
    selected: str,
) -> dict[str, Any]:
    """Each column at 0.5 and at its own validation-chosen threshold, on val and test."""
    labels = {name: splits[name].labels[:, columns] for name in REPORTED}
    thresholds = {
        column: float(choose_threshold(labels["val"], probs[column]["val"]))
        for column in probs
        if column.startswith("stage1_")
    }
    for lookup, predictor in predictors.items():
        thresholds[_column(lookup)] = predictor.threshold

    result: dict[str, Any] = {
        "selected": _column(selected),
        "eval_attributes": [splits["train"].attributes[i] for i in columns],
        "thresholds": thresholds,
    }
    for name in REPORTED:
        for tag, chosen in (("", thresholds), ("_at_0.5", dict.fromkeys(thresholds, 0.5))):
            result[f"{name}{tag}"] = {
                column: summary(par_metrics(labels[name], by_split[name], chosen[column]))
                for column, by_split in probs.items()
            }
    result["test_attr_mA"] = {
        column: par_metrics(labels["test"], by_split["test"], thresholds[column])[
            "attr_accuracy"
        ].tolist()
        for column, by_split in probs.items()
    }
    return result


def _column(lookup: str) -> str:
    return "cfar_" + lookup.replace("-", "_")


def _write_json(path: str, payload: dict[str, Any]) -> None:
    storage.write_bytes(path, json.dumps(payload, indent=2).encode())
