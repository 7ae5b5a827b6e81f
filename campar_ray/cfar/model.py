"""A fitted stage 2 (eq. 17-20) as one value: fit it, save it, load it.

:func:`fit_model` is the only function that fits stage 2: from stage-1 train and val logits
(r = sigmoid of the prediction logits: ``l_specific`` for the CAM-PAR head, ``l_shared``
for the baseline head) and a ``cfar`` config to ALS factors, the attribute-set dictionary,
and fc2 with its validation-chosen decision threshold. ``campar fit-cfar``
(:func:`campar_ray.cfar.fit.fit_cfar`) and every search trial
(:func:`campar_ray.tune.stage2.fit_cfar_on_val`) call it and save its result with
:func:`save_model`, so a search scores exactly the model ``fit-cfar`` builds.

:func:`save_model` writes, through :mod:`campar_ray.storage` so that directories may be URIs:

- ``factors.npz`` (X, Y; a search trial keeps Y only: N x D per trial adds up over hundreds
  of trials, and lookups need only Y and the dictionary), ``dictionary.npz`` (keys,
  values), ``fc2.npz`` (weight, bias): plain arrays, loaded with ``allow_pickle=False``;
- ``cfar.json``: the config used, the ALS objective per iteration, fc2's selection for every
  lookup fitted and the decision threshold of the configured one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from campar_ray import storage
from campar_ray.artifacts import load_arrays, load_json, save_arrays
from campar_ray.cfar.als import AlsResult
from campar_ray.cfar.dictionary import (
    LOOKUPS,
    AttributeSetDictionary,
    ConfidenceEstimator,
    build_dictionary,
)
from campar_ray.cfar.head import Fc2, Fc2Fit, Fc2Split, train_fc2
from campar_ray.cfar.solver import SOLVERS, choose_solver, fit_als
from campar_ray.config import AlsSettings, CfarConfig, ConfigError
from campar_ray.data.manifest import known_entries
from campar_ray.decision import (
    CFAR_FROM,
    cfar_logits,
    eval_columns,
    logits_name,
    probabilities,
    protocol_threshold,
    reconstruction,
    refine,
)
from campar_ray.metrics import choose_threshold
from campar_ray.run.logits import SplitLogits

FACTORS_FILE = "factors.npz"
DICTIONARY_FILE = "dictionary.npz"
FC2_FILE = "fc2.npz"
MODEL_FILE = "cfar.json"
MODEL_FILES = (FACTORS_FILE, DICTIONARY_FILE, FC2_FILE, MODEL_FILE)
"""Every file :func:`save_model` writes: what a bundle copies of a run's ``cfar/``."""

Progress = Callable[[str, dict[str, Any]], None]
"""``progress(stage, values)``: stage ``als`` after each ALS iteration (iteration,
objective, relative_change, elapsed), then ``dictionary`` (keys) and ``fc2`` (lookup,
best_epoch, epochs_run, rule, val_score, val_loss) once per lookup fitted."""


@dataclass(frozen=True)
class CfarPredictor:
    """Stage-1 prediction logits in, CFAR probabilities out (no Ray, no stage-1 network)."""

    estimator: ConfidenceEstimator
    head: Fc2
    threshold: float
    """Decision threshold on :meth:`probabilities`, chosen on validation data."""
    attributes: tuple[str, ...]

    def refined_logits(self, logits: np.ndarray) -> np.ndarray:
        """fc2(concat(r_hat, l)) for stage-1 logits l (N x M), by
        :func:`campar_ray.decision.refine`."""
        return refine(logits, self.estimator, self.head)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """sigmoid of :meth:`refined_logits`: stage 1 + CFAR's probabilities."""
        return probabilities(self.refined_logits(logits))


@dataclass(frozen=True)
class CfarModel:
    """What :func:`fit_model` fitted: one predictor (and its fc2 fit) per lookup fitted."""

    config: CfarConfig
    seed: int
    attributes: tuple[str, ...]
    prediction_logits: str
    """``specific`` or ``shared``: the stage-1 logits r was computed from."""
    als: AlsResult
    dictionary: AttributeSetDictionary
    predictors: dict[str, CfarPredictor]
    fc2: dict[str, Fc2Fit]

    @property
    def predictor(self) -> CfarPredictor:
        """The configured lookup's predictor: the one saved and loaded."""
        return self.predictors[self.config.lookup]


def check_cfar_config(cfg: CfarConfig) -> None:
    """Raise a ConfigError naming a ``cfar`` choice that does not exist; the numbers were
    range-checked when the config was built (:class:`~campar_ray.config.CfarConfig`, and
    :class:`~campar_ray.config.AlsSettings` for the ALS keys it hands the solver as
    ``cfg.als``)."""
    for key, value, valid in (("solver", cfg.solver, SOLVERS), ("lookup", cfg.lookup, LOOKUPS)):
        if value not in valid:
            raise ConfigError(f"cfar: {key} must be one of {', '.join(valid)}, got {value!r}")


def fit_model(
    train: SplitLogits,
    val: SplitLogits,
    cfg: CfarConfig,
    *,
    seed: int = 0,
    compare_lookups: bool = False,
    train_path: str | None = None,
    progress: Progress | None = None,
    address: str | None = None,
) -> CfarModel:
    """Stage 2 from stage-1 logits: ALS and the dictionary on train, then fc2 (trained on
    train, its epoch and decision threshold chosen on val) for ``cfg.lookup``, or for every
    lookup with ``compare_lookups``.

    ``solver="auto"`` is resolved by :func:`~campar_ray.cfar.solver.choose_solver` (on the
    size of r and the cluster ``address``). Reads and writes no file, with one exception: the
    Ray solver needs ``train_path``, the logits file ``train`` was read from, whose rows its
    actors read themselves.
    """
    check_cfar_config(cfg)
    check_same_attributes({"train": train, "val": val})
    report = progress or _silent
    columns = eval_columns(train)
    r_train = probabilities(cfar_logits(train))
    known = known_entries(train.labels)  # unknown training labels: no observation
    solver = choose_solver(cfg.solver, r_train.size, address).solver
    als = fit_als(
        train_path if solver == "ray" else r_train,
        cfg.als,
        solver=solver,
        actors=cfg.actors,
        seed=seed,
        known=known,
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
    dictionary = build_dictionary(r_train, als.X, cfg.keys, seed, known)
    report("dictionary", {"keys": len(dictionary.keys)})
    predictors, fits = {}, {}
    for lookup in LOOKUPS if compare_lookups else (cfg.lookup,):
        estimator = ConfidenceEstimator(als.Y, dictionary, lookup, cfg.als)
        predictors[lookup], fits[lookup] = _fit_predictor(estimator, train, val, cfg, columns)
        report("fc2", {"lookup": lookup, **_fc2_summary(fits[lookup], cfg.fc2_rule)})
    return CfarModel(
        cfg,
        seed,
        train.attributes,
        logits_name(train, CFAR_FROM),
        als,
        dictionary,
        predictors,
        fits,
    )


def save_model(directory: str, model: CfarModel, *, image_factors: bool = True) -> None:
    """The files of the configured lookup's model (module doc); X only with ``image_factors``."""
    factors = {"X": model.als.X, "Y": model.als.Y} if image_factors else {"Y": model.als.Y}
    save_arrays(storage.join(directory, FACTORS_FILE), **factors)
    save_arrays(
        storage.join(directory, DICTIONARY_FILE),
        keys=model.dictionary.keys,
        values=model.dictionary.values,
    )
    save_arrays(storage.join(directory, FC2_FILE), **model.predictor.head.arrays())
    meta = {
        "config": dataclasses.asdict(model.config),
        "seed": model.seed,
        "attributes": list(model.attributes),
        "prediction_logits": model.prediction_logits,
        "als": {
            "objectives": model.als.objectives,
            "iterations": model.als.iterations,
            "converged": model.als.converged,
        },
        "keys_used": len(model.dictionary.keys),
        "fc2": {
            lookup: _fc2_summary(fit, model.config.fc2_rule) for lookup, fit in model.fc2.items()
        },
        "threshold": model.predictor.threshold,
    }
    storage.write_bytes(storage.join(directory, MODEL_FILE), json.dumps(meta, indent=2).encode())


def load_predictor(directory: str) -> CfarPredictor:
    """The predictor :func:`save_model` saved in ``directory`` (configured lookup, fc2,
    threshold)."""
    meta = load_json(storage.join(directory, MODEL_FILE))
    cfg = meta["config"]
    factors = load_arrays(storage.join(directory, FACTORS_FILE))
    entries = load_arrays(storage.join(directory, DICTIONARY_FILE))
    fc2 = load_arrays(storage.join(directory, FC2_FILE))
    estimator = ConfidenceEstimator(
        factors["Y"],
        AttributeSetDictionary(entries["keys"], entries["values"]),
        cfg["lookup"],
        AlsSettings.of(cfg),
    )
    return CfarPredictor(
        estimator,
        Fc2.from_arrays(fc2["weight"], fc2["bias"]),
        float(meta["threshold"]),
        tuple(meta["attributes"]),
    )


def check_same_attributes(splits: dict[str, SplitLogits]) -> None:
    """Raise a ValueError naming a split whose attributes differ from train's."""
    reference = splits["train"].attributes
    for name, split in splits.items():
        if split.attributes != reference:
            raise ValueError(
                f"the {name} logits have attributes {split.attributes}, train has {reference}"
            )


def _fc2_summary(fit: Fc2Fit, rule: str) -> dict[str, float | str]:
    return {
        "best_epoch": fit.best_epoch,
        "epochs_run": fit.epochs_run,
        "rule": rule,
        "val_score": fit.val_score,
        "val_loss": fit.val_loss,
    }


def _fit_predictor(
    estimator: ConfidenceEstimator,
    train: SplitLogits,
    val: SplitLogits,
    cfg: CfarConfig,
    columns: np.ndarray,
) -> tuple[CfarPredictor, Fc2Fit]:
    """fc2 on train (selected on val), then its decision threshold on val."""

    def fc2_inputs(split: SplitLogits) -> Fc2Split:
        logits = cfar_logits(split)
        return Fc2Split(reconstruction(logits, estimator), logits, split.labels)

    fit = train_fc2(
        fc2_inputs(train),
        fc2_inputs(val),
        lr=cfg.fc2_lr,
        epochs=cfg.fc2_epochs,
        columns=columns,
        rule=cfg.fc2_rule,
        loss=cfg.fc2_loss,
    )
    val_inputs, arrays = fc2_inputs(val), fit.head.arrays()
    offsets = _decision_offsets(fit.head.logits(val_inputs.r_hat, val_inputs.logits), val.labels)
    head = Fc2.from_arrays(arrays["weight"], arrays["bias"] - offsets)
    predictor = CfarPredictor(estimator, head, 0.5, train.attributes)
    threshold = protocol_threshold("val", val, predictor.probabilities(cfar_logits(val)))
    return dataclasses.replace(predictor, threshold=float(threshold)), fit


OFFSET_GRID = 1 / (1 + np.exp(-np.linspace(-8.0, 8.0, 161)))
"""Candidate cuts for fc2's per-attribute offsets: 0.1 logit apart over [-8, 8]. fc2 trained
with a BCE gives rare attributes probabilities far below the protocols' 0.05 floor."""


def _decision_offsets(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Where 0.5 falls for fc2: each attribute's logit cut with the best validation balanced
    accuracy (the mA term), as an offset for fc2's bias (0 where no validation label is known).

    fc2's epoch is kept by ranking (``cfar.fc2_rule``), and its first steps move each
    attribute's offset; with this offset folded into its bias, stage 1 + CFAR read at 0.5 is
    already calibrated, and the run's calibration on top of it stays near 0."""
    probs = probabilities(logits)
    cuts = choose_threshold(labels, probs, per_attribute=True, candidates=OFFSET_GRID)
    return (np.log(cuts) - np.log1p(-cuts)).astype(np.float32)


def _silent(stage: str, values: dict[str, Any]) -> None:
    """The default progress: nobody listens."""
