"""One search trial's stage 2: fitted on train, scored on validation data only.

A search compares hundreds of CFAR configurations, so a trial must never look at test data
(the test split is scored once, for the best configuration, by :func:`fit_cfar`). This is the
part of :func:`campar_ray.cfar.fit.fit_cfar` a trial needs: the same ALS, dictionary, fc2 and
validation-chosen threshold for the configured lookup, read from one run's logits and
written to another directory, so that every trial of a ``cfar``-scope search can share one
stage-1 run. Re-fitting the best configuration with ``fit_cfar`` reproduces its val metrics.

A trial keeps Y, the dictionary, fc2 and its metrics; not X (N x D per trial adds up over
hundreds of trials, and the dictionary values already hold what lookups need).
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Any

import numpy as np

from campar_ray import storage
from campar_ray.cfar.als import probabilities
from campar_ray.cfar.dictionary import ConfidenceEstimator
from campar_ray.cfar.fit import CfarPredictor, check_cfar_config, eval_columns, fit_factors
from campar_ray.cfar.head import Fc2Split, train_fc2
from campar_ray.config import CfarConfig
from campar_ray.metrics import choose_threshold, par_metrics, summary
from campar_ray.train.logits import SplitLogits, logits_path, read_split_logits


def fit_cfar_on_val(
    logits_dir: str, output_dir: str, cfg: CfarConfig, seed: int = 0
) -> dict[str, Any]:
    """Stage 2 on the train/val logits of ``logits_dir``; artefacts and metrics in ``output_dir``.

    Returns ``val_<metric>`` for stage 1 + CFAR (at its validation-chosen threshold),
    ``stage1_val_<metric>`` for stage 1 alone (likewise), the threshold, and fit details.
    """
    check_cfar_config(cfg)
    train = read_split_logits(logits_path(logits_dir, "train"))
    val = read_split_logits(logits_path(logits_dir, "val"))
    columns = eval_columns(train)
    als, dictionary = fit_factors(logits_dir, train, cfg, seed)
    estimator = ConfidenceEstimator(
        als.Y, dictionary, cfg.lookup, cfg.alpha, cfg.threshold, cfg.lam
    )

    def fc2_inputs(split: SplitLogits) -> Fc2Split:
        r_hat = estimator.reconstruct(probabilities(split.prediction))
        return Fc2Split(r_hat, split.prediction, split.labels)

    fit = train_fc2(
        fc2_inputs(train), fc2_inputs(val), lr=cfg.fc2_lr, epochs=cfg.fc2_epochs, columns=columns
    )
    predictor = CfarPredictor(estimator, fit.head, 0.5, train.attributes)
    labels = val.labels[:, columns]
    cfar_probs = predictor.probabilities(val.prediction)[:, columns]
    stage1_probs = probabilities(val.prediction)[:, columns]
    threshold = float(choose_threshold(labels, cfar_probs))
    stage1_threshold = float(choose_threshold(labels, stage1_probs))
    metrics: dict[str, Any] = {
        **_prefixed("val_", summary(par_metrics(labels, cfar_probs, threshold))),
        **_prefixed("stage1_val_", summary(par_metrics(labels, stage1_probs, stage1_threshold))),
        "threshold": threshold,
        "stage1_threshold": stage1_threshold,
        "als_iterations": als.iterations,
        "als_objective": als.objectives[-1],
        "keys_used": len(dictionary.keys),
        "fc2_best_epoch": fit.best_epoch,
    }
    _write_npz(storage.join(output_dir, "attribute_factors.npz"), Y=als.Y)
    _write_npz(
        storage.join(output_dir, "dictionary.npz"), keys=dictionary.keys, values=dictionary.values
    )
    _write_npz(storage.join(output_dir, "fc2.npz"), **fit.head.arrays())
    payload = {"config": dataclasses.asdict(cfg), "seed": seed, "metrics": metrics}
    storage.write_bytes(
        storage.join(output_dir, "metrics.json"), json.dumps(payload, indent=2).encode()
    )
    return metrics


def _prefixed(prefix: str, values: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}{key}": value for key, value in values.items()}


def _write_npz(path: str, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    storage.write_bytes(path, buffer.getvalue())
