"""Calibration: per-attribute logit offsets fitted on validation data, part of the model.

PAR data sets are imbalanced, so a network's probabilities are seldom best cut at 0.5: the
``val-per-attribute`` protocol picks each attribute's threshold ``t_j`` on the validation
split. Calibration stores that choice as an offset ``b_j = logit(t_j)`` on the final logits,
so that the calibrated probability ``sigmoid(z_j - b_j)`` is 0.5 exactly where the raw one is
``t_j``: a calibrated model is read at 0.5 like any other, and the offsets travel with it
(``calibration.json`` in the run directory and in the bundle; the exported files apply them).

The offsets belong to one final source (stage 1's logits or stage 1 + CFAR): fit-cfar and
stage 1 write them for the run's final source, and a file for another source is stale and
is fitted again from the validation logits.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from campar_ray import storage
from campar_ray.decision.logits import probabilities
from campar_ray.decision.refine import Refiner
from campar_ray.decision.sources import final_logits, final_source
from campar_ray.decision.thresholds import Threshold
from campar_ray.metrics import CALIBRATED, DECISION_PROTOCOLS, check_protocol, select_threshold
from campar_ray.run.layout import RunDir
from campar_ray.run.logits import SplitLogits, read_split_logits

FITTED_BY = "val-per-attribute"
"""The threshold protocol whose choice the offsets store."""


@dataclass(frozen=True)
class Calibration:
    """Per-attribute offsets on a final source's logits (all M attributes, ``attributes`` order)."""

    offsets: tuple[float, ...]
    source: str
    """The final source the offsets were fitted for (``stage1_specific``, ``stage1_cfar``, ...)."""

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated logits: ``z - b`` (N x M float32)."""
        return (np.asarray(logits, dtype=np.float32) - self.array).astype(np.float32)

    @property
    def array(self) -> np.ndarray:
        return np.asarray(self.offsets, dtype=np.float32)

    @property
    def threshold(self) -> Threshold:
        """What a calibrated model's decision is: 0.5 on the calibrated probabilities."""
        return Threshold(
            0.5,
            f"calibrated: per-attribute offsets on {self.source}'s logits, fitted on val "
            f"({FITTED_BY} thresholds), read at 0.5",
            CALIBRATED,
        )

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "fitted_by": FITTED_BY, "offsets": list(self.offsets)}


def check_decision(protocol: str) -> None:
    """Refuse an unknown decision protocol, naming the valid ones."""
    if protocol != CALIBRATED:
        try:
            check_protocol(protocol)
        except ValueError:
            raise ValueError(
                f"unknown threshold protocol {protocol!r}; valid: {', '.join(DECISION_PROTOCOLS)}"
            ) from None


def fit_calibration(val: SplitLogits, predict_from: str, cfar: Refiner | None) -> Calibration:
    """Offsets of the final source, from its ``val-per-attribute`` thresholds on ``val``."""
    logits = final_logits(val, predict_from, cfar)
    thresholds = np.asarray(select_threshold(FITTED_BY, val.labels, probabilities(logits)))
    offsets = np.log(thresholds) - np.log1p(-thresholds)
    return Calibration(tuple(float(v) for v in offsets), final_source(val, predict_from, cfar))


def calibrated_probabilities(logits: np.ndarray, calibration: Calibration | None) -> np.ndarray:
    """Probabilities of final logits, calibrated when ``calibration`` is given."""
    return probabilities(logits if calibration is None else calibration.apply(logits))


def save_calibration(file: str, calibration: Calibration) -> None:
    storage.write_json(file, calibration.to_json())


def read_calibration(file: str, attributes: int) -> Calibration:
    """A ``calibration.json``, checked: ``attributes`` finite offsets and a source name."""
    try:
        payload = json.loads(storage.read_bytes(file))
    except (UnicodeDecodeError, json.JSONDecodeError):
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("source"), str):
        offsets = payload.get("offsets")
        if (
            isinstance(offsets, list)
            and len(offsets) == attributes
            and all(_finite_number(v) for v in offsets)
        ):
            return Calibration(tuple(float(v) for v in offsets), payload["source"])
    raise ValueError(
        f'{file} is not a calibration (expected {{"source": text, "offsets": [{attributes} '
        "finite numbers]}); re-create it with `campar fit-cfar`, or the bundle with "
        "`campar bundle`"
    )


def fit_run_calibration(run_dir: str, predict_from: str, cfar: Refiner | None) -> Calibration:
    """Fit a run's calibration on its validation logits and save it in the run directory."""
    val = read_split_logits(RunDir(run_dir).logits("val"))
    calibration = fit_calibration(val, predict_from, cfar)
    save_calibration(RunDir(run_dir).calibration, calibration)
    return calibration


def run_calibration(run_dir: str, predict_from: str, cfar: Refiner | None) -> Calibration:
    """A run's calibration: the saved one when it was fitted for the run's final source, else
    fitted again from the validation logits (a run from before calibration, or whose final
    source changed since)."""
    val = read_split_logits(RunDir(run_dir).logits("val"))
    file = RunDir(run_dir).calibration
    if storage.exists(file):
        saved = read_calibration(file, len(val.attributes))
        if saved.source == final_source(val, predict_from, cfar):
            return saved
    return fit_calibration(val, predict_from, cfar)


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
