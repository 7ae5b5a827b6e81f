"""The decision threshold of each protocol, chosen on validation data (never test).

The protocols themselves (:data:`campar_ray.metrics.THRESHOLD_PROTOCOLS`, chosen by
:func:`campar_ray.metrics.select_threshold`) are the field's: a fixed 0.5, one threshold
chosen on val, or one per attribute. This module applies them to a run: over which
attributes a single value is chosen, from which source's validation probabilities, and, for
stage 1 + CFAR's ``val``, the threshold fit-cfar chose and stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from campar_ray.data.manifest import eval_positions
from campar_ray.decision.refine import Refiner
from campar_ray.decision.sources import CFAR_SOURCE, final_source, source_probabilities
from campar_ray.metrics import THRESHOLD_PROTOCOLS, check_protocol, select_threshold
from campar_ray.run.layout import RunDir
from campar_ray.run.logits import SplitLogits, read_split_logits


@dataclass(frozen=True)
class Threshold:
    """A decision threshold on the final probabilities and how it was obtained."""

    value: float | tuple[float, ...]
    """One value, or one per attribute (in ``attributes`` order)."""
    source: str
    protocol: str
    """One of :data:`campar_ray.metrics.THRESHOLD_PROTOCOLS`, or ``calibrated``."""


FIXED = Threshold(0.5, "fixed, as PAR papers report", "0.5")
"""The ``0.5`` protocol's threshold: the same for every run."""

VAL_PROTOCOLS = tuple(p for p in THRESHOLD_PROTOCOLS if p != FIXED.protocol)
"""The protocols whose thresholds depend on the run, so a bundle must store them."""

CFAR_PROTOCOL = "val"
"""The protocol of stage 2's own threshold, chosen on val by fit-cfar (and by each search
trial): the protocol of every figure fit-cfar ranks by and tune reports."""


def eval_columns(logits: SplitLogits) -> np.ndarray:
    """Indices of the evaluated attributes within all attributes (all when none are named)."""
    return eval_positions(logits.attributes, logits.eval_attributes)


def protocol_threshold(protocol: str, val: SplitLogits, probs: np.ndarray) -> float | np.ndarray:
    """``protocol``'s threshold for one source's validation probabilities (N x M).

    One value is chosen over the evaluated attributes, as mA is reported; per-attribute values
    cover all M attributes (each is chosen on its own column, so the evaluated ones are the same
    either way) because predictions name every attribute.
    """
    if protocol == "val-per-attribute":
        return select_threshold(protocol, val.labels, probs)
    columns = eval_columns(val)
    return select_threshold(protocol, val.labels[:, columns], probs[:, columns])


def source_thresholds(
    val: SplitLogits, predict_from: str, cfar: Refiner | None, protocol: str
) -> dict[str, float | np.ndarray]:
    """Each source's threshold under ``protocol`` (per attribute: all M), from its val
    probabilities; stage 1 + CFAR's ``val`` threshold is the one fit-cfar chose."""
    check_protocol(protocol)
    chosen = {
        name: protocol_threshold(protocol, val, values)
        for name, values in source_probabilities(val, predict_from, cfar).items()
    }
    if cfar is not None and protocol == CFAR_PROTOCOL:
        chosen[CFAR_SOURCE] = cfar.threshold
    return chosen


def run_threshold(
    run_dir: str, predict_from: str, cfar: Refiner | None, protocol: str
) -> Threshold:
    """The threshold of a run's final prediction (stage 1 + CFAR when fitted) under ``protocol``.

    ``val`` with CFAR is the threshold fit-cfar chose and stored; every other val-chosen one
    comes from the run's validation logits, never from test data.
    """
    check_protocol(protocol)
    if protocol == FIXED.protocol:
        return FIXED
    val = read_split_logits(RunDir(run_dir).logits("val"))
    value = source_thresholds(val, predict_from, cfar, protocol)[
        final_source(val, predict_from, cfar)
    ]
    final = "stage 1 + CFAR" if cfar is not None else f"stage 1 ({predict_from} logits)"
    if protocol == "val":
        fitter = " (fit-cfar)" if cfar is not None else ""
        return Threshold(float(value), f"val: maximises mA of {final}{fitter}", protocol)
    return Threshold(
        tuple(float(v) for v in value),
        f"val: each maximises its attribute's mA term, of {final}",
        protocol,
    )


def validation_threshold(run_dir: str, predict_from: str, cfar: Refiner | None) -> Threshold:
    """The ``val`` protocol's threshold of a run (the PETA ablation tables' protocol)."""
    return run_threshold(run_dir, predict_from, cfar, "val")
