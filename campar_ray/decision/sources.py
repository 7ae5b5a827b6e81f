"""The probabilities a run can be scored from, and the one its predictions come from.

A *source* is one way to turn stage-1 logits into probabilities: the shared logits, the
specific ones (CAM-PAR head), their mean (when the run predicts from it) and stage 1 + CFAR
(when fitted). The *final* source is the one a run's predictions, bundle and exports use:
CFAR when fitted, else the logits ``model.predict_from`` names.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from campar_ray.decision.logits import (
    StageOneLogits,
    as_array,
    cfar_logits,
    logits_name,
    prediction_logits,
    probabilities,
)
from campar_ray.decision.refine import Refiner

CFAR_SOURCE = "stage1_cfar"
SOURCE_LABELS = {
    "stage1_shared": "Stage 1, shared logits",
    "stage1_specific": "Stage 1, specific logits",
    "stage1_mean": "Stage 1, mean of both logits",
    CFAR_SOURCE: "Stage 1 + CFAR",
}
"""Each source's name in tables and printed figures."""


def stage1_source(predict_from: str) -> str:
    """The name of a stage-1 source: ``stage1_<logits>``."""
    return f"stage1_{predict_from}"


def final_source(outputs: StageOneLogits, predict_from: str, cfar: Refiner | None) -> str:
    """The source a run's predictions come from: CFAR when fitted, else ``predict_from``."""
    if cfar is not None:
        return CFAR_SOURCE
    return stage1_source(logits_name(outputs, predict_from))


def final_logits(outputs: StageOneLogits, predict_from: str, cfar: Refiner | None) -> np.ndarray:
    """The logits whose sigmoid is the run's prediction (N x M float32): stage 1 + CFAR when
    fitted (on :func:`~.logits.cfar_logits`), else stage 1's ``predict_from`` logits."""
    if cfar is None:
        return as_array(prediction_logits(outputs, predict_from))
    return cfar.refined_logits(as_array(cfar_logits(outputs)))


def source_probabilities(
    outputs: StageOneLogits, predict_from: str, cfar: Refiner | None
) -> dict[str, np.ndarray]:
    """Probabilities of each source (all attributes), in the order they are reported:
    shared, specific (when the head has them), their mean (when ``predict_from`` says so),
    then stage 1 + CFAR (when fitted)."""
    names: list[Any] = ["shared"]
    if outputs.specific is not None:
        names += ["specific", "mean"] if predict_from == "mean" else ["specific"]
    probs = {stage1_source(name): probabilities(prediction_logits(outputs, name)) for name in names}
    if cfar is not None:
        probs[CFAR_SOURCE] = probabilities(final_logits(outputs, predict_from, cfar))
    return probs
