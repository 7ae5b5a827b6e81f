"""A run's figures: computed by one function, printed in one form.

fit-cfar, tune, evaluate, the demo and the report all show test figures of a run. They score
them with :func:`score_sources` and print them with :func:`figure_line` or
:func:`figure_table`, which name the split, the source and the threshold protocol by the names
``--threshold`` takes (:data:`campar_ray.metrics.DECISION_PROTOCOLS`). So the same protocol on
the same model prints the same number everywhere, and two numbers that differ say why (a
validation-chosen threshold against 0.5, or another model after a refit).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from campar_ray.decision.calibration import check_decision
from campar_ray.decision.refine import Refiner
from campar_ray.decision.sources import source_probabilities
from campar_ray.decision.thresholds import eval_columns, source_thresholds
from campar_ray.metrics import SUMMARY_HEADERS, SUMMARY_KEYS, par_metrics
from campar_ray.run.logits import SplitLogits

PROTOCOL_HEADER = "threshold"
"""How a figure names its protocol: ``threshold <name>``, as ``--threshold <name>`` asks for it."""


@dataclass(frozen=True)
class SourceFigures:
    """One source scored on one split under one protocol, over the evaluated attributes."""

    threshold: float | np.ndarray
    """One value, or one per evaluated attribute."""
    probs: np.ndarray
    """N x evaluated attributes: what the figures were computed from."""
    metrics: dict[str, Any]
    """:func:`campar_ray.metrics.par_metrics` of ``probs`` at ``threshold``."""


def score_sources(
    logits: SplitLogits,
    val: SplitLogits,
    predict_from: str,
    cfar: Refiner | None,
    protocol: str,
) -> dict[str, SourceFigures]:
    """Every source of ``logits`` (one split) under the threshold ``protocol``, each at its own
    threshold chosen on ``val`` (stage 1 + CFAR's ``val`` one is the one fit-cfar chose)."""
    columns = eval_columns(logits)
    labels = logits.labels[:, columns]
    thresholds = source_thresholds(val, predict_from, cfar, protocol)
    scored = {}
    for name, values in source_probabilities(logits, predict_from, cfar).items():
        threshold = thresholds[name]
        threshold = threshold if np.ndim(threshold) == 0 else np.asarray(threshold)[columns]
        probs = values[:, columns]
        scored[name] = SourceFigures(threshold, probs, par_metrics(labels, probs, threshold))
    return scored


def figure_line(split: str, metric: str, source: str, value: float, protocol: str) -> str:
    """One figure, named: ``test mA, Stage 1 + CFAR: 78.89 (threshold val)`` (``value`` is a
    fraction, printed as a percentage)."""
    check_decision(protocol)
    return f"{split} {metric}, {source}: {100 * value:.2f} ({PROTOCOL_HEADER} {protocol})"


def figure_table(split: str, rows: Sequence[tuple[str, str, Mapping[str, float]]]) -> str:
    """The five headline figures of each row ``(source, protocol, summary)`` on ``split``, one
    line each, under a header that names the split and the protocol column."""
    title = f"{split} split"
    width = max(len(title), *(len(source) for source, _, _ in rows)) + 2
    lines = [
        f"{title:<{width}}{PROTOCOL_HEADER:<19}"
        + "".join(f"{header:>8}" for header in SUMMARY_HEADERS.values())
    ]
    for source, protocol, figures in rows:
        check_decision(protocol)
        lines.append(
            f"{source:<{width}}{protocol:<19}"
            + "".join(f"{100 * figures[key]:8.2f}" for key in SUMMARY_KEYS)
        )
    return "\n".join(lines)
