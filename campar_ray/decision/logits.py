"""Which stage-1 logits a prediction is made from, and logits -> probabilities.

Both are written here only (``tests/test_architecture.py`` fails on a second copy it can
recognise): a network's :class:`~campar_ray.model.ParOutput` (torch) and a logits file's
:class:`~campar_ray.run.logits.SplitLogits` (NumPy) both have ``shared`` and ``specific``
(``None`` for the baseline head), so the same functions serve training, the stored logits,
the bundle and the export.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
from scipy.special import expit

from campar_ray.config import PREDICT_FROM

CFAR_FROM = "specific"
"""The logits stage 2 fits on and refines, whatever ``model.predict_from`` says: the
thesis builds CFAR on the specific logits (the baseline head has shared logits only)."""


class StageOneLogits(Protocol):
    """Anything with a batch's shared logits and its specific ones (or ``None``)."""

    @property
    def shared(self) -> Any: ...

    @property
    def specific(self) -> Any | None: ...


def logits_name(outputs: StageOneLogits, predict_from: str) -> str:
    """Which logits ``predict_from`` names for ``outputs``: the choice itself, or ``shared``
    when the head has no specific logits (the baseline) or ``shared`` was chosen."""
    if predict_from not in PREDICT_FROM:
        raise ValueError(f"unknown predict_from {predict_from!r}; valid: {', '.join(PREDICT_FROM)}")
    return "shared" if outputs.specific is None else predict_from


def prediction_logits(outputs: StageOneLogits, predict_from: str) -> Any:
    """The logits whose sigmoid is the stage-1 prediction: ``specific``, ``shared`` or their
    ``mean`` (same type as the inputs: tensors stay tensors, arrays stay arrays)."""
    name = logits_name(outputs, predict_from)
    if name == "mean":
        return (outputs.shared + outputs.specific) / 2
    return outputs.shared if name == "shared" else outputs.specific


def cfar_logits(outputs: StageOneLogits) -> Any:
    """The logits CFAR is fitted on and refines: specific, else shared (:data:`CFAR_FROM`)."""
    return prediction_logits(outputs, CFAR_FROM)


def as_array(values: Any) -> np.ndarray:
    """A float32 NumPy array of logits given as an array or a (possibly GPU) torch tensor."""
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float32)


def probabilities(logits: Any) -> np.ndarray:
    """sigmoid(logits) in float32, the precision the logits are stored in."""
    return expit(as_array(logits))
