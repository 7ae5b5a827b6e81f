"""One search trial's stage 2: fitted on train, scored on validation data only.

A search compares hundreds of CFAR configurations, so a trial must never look at test data
(the test split is scored once, for the best configuration, by
:func:`campar_ray.cfar.fit.fit_cfar`). A trial fits stage 2 with the function ``fit-cfar``
uses (:func:`campar_ray.cfar.model.fit_model`) and saves it the same way
(:func:`~campar_ray.cfar.model.save_model`, same file names), reading one run's logits and
writing to another directory, so that every trial of a ``cfar``-scope search can share one
stage-1 run. Re-fitting the best configuration with ``fit_cfar`` rebuilds the same model
and reproduces its val metrics.

A trial keeps Y, the dictionary, fc2 and its metrics; not X (N x D per trial adds up over
hundreds of trials, and the dictionary values already hold what lookups need).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from campar_ray import storage
from campar_ray.cfar.model import fit_model, save_model
from campar_ray.cfar.solver import AUTO
from campar_ray.config import CfarConfig
from campar_ray.decision import (
    CFAR_FROM,
    CFAR_PROTOCOL,
    CFAR_SOURCE,
    score_sources,
    stage1_source,
)
from campar_ray.metrics import summary
from campar_ray.run.layout import CFAR_METRICS_FILE, RunDir
from campar_ray.run.logits import read_split_logits


def fit_cfar_on_val(
    logits_dir: str, output_dir: str, cfg: CfarConfig, seed: int = 0
) -> dict[str, Any]:
    """Stage 2 on the train/val logits of ``logits_dir``; artefacts and metrics in ``output_dir``.

    Returns ``val_<metric>`` for stage 1 + CFAR (at its validation-chosen threshold),
    ``stage1_val_<metric>`` for stage 1 alone (likewise), the threshold, and fit details.
    ``cfar.solver=auto`` fits in the trial's own process: a search's parallelism is its
    trials, and a trial's placement group holds ALS actors only for an explicit ``ray``
    (:func:`campar_ray.tune.trials.trial_bundles`).
    """
    if cfg.solver == AUTO:
        cfg = dataclasses.replace(cfg, solver="local")
    train_path = RunDir(logits_dir).logits("train")
    train = read_split_logits(train_path)
    val = read_split_logits(RunDir(logits_dir).logits("val"))
    model = fit_model(train, val, cfg, seed=seed, train_path=train_path)
    predictor = model.predictor
    scored = score_sources(val, val, CFAR_FROM, predictor, CFAR_PROTOCOL)  # as fit-cfar does
    refined, stage1 = scored[CFAR_SOURCE], scored[stage1_source(model.prediction_logits)]
    metrics: dict[str, Any] = {
        **_prefixed("val_", summary(refined.metrics)),
        **_prefixed("stage1_val_", summary(stage1.metrics)),
        "threshold": predictor.threshold,
        "stage1_threshold": float(stage1.threshold),
        "als_iterations": model.als.iterations,
        "als_objective": model.als.objectives[-1],
        "keys_used": len(model.dictionary.keys),
        "fc2_best_epoch": model.fc2[cfg.lookup].best_epoch,
    }
    save_model(output_dir, model, image_factors=False)
    payload = {"config": dataclasses.asdict(cfg), "seed": seed, "metrics": metrics}
    storage.write_bytes(
        storage.join(output_dir, CFAR_METRICS_FILE), json.dumps(payload, indent=2).encode()
    )
    return metrics


def _prefixed(prefix: str, values: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}{key}": value for key, value in values.items()}
