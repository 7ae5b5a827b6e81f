"""Stage 2's refinement (eq. 17-20) of stage-1 logits, given its fitted parts.

``r = sigmoid(l)``, ``r_hat`` its reconstruction by the attribute factors (a dictionary or
fold-in lookup), then the final logits ``fc2(concat(r_hat, l))``. The parts are fitted and
stored by :mod:`campar_ray.cfar`; this module only composes them, so that fitting fc2, the
saved predictor and every evaluation refine the same way (and the torch export is checked
against it).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from campar_ray.decision.logits import as_array, probabilities


class Reconstructor(Protocol):
    """A lookup: confidences r (N x M) -> their reconstruction r_hat (N x M)."""

    def reconstruct(self, r: np.ndarray) -> np.ndarray: ...


class Combiner(Protocol):
    """fc2: r_hat and the stage-1 logits -> the final logits (all N x M)."""

    def logits(self, r_hat: np.ndarray, logits: np.ndarray) -> np.ndarray: ...


class Refiner(Protocol):
    """A fitted stage 2 (:class:`campar_ray.cfar.model.CfarPredictor`)."""

    threshold: float
    """Its ``val`` threshold, chosen by fit-cfar."""

    def refined_logits(self, logits: np.ndarray) -> np.ndarray: ...


def reconstruction(logits: np.ndarray, lookup: Reconstructor) -> np.ndarray:
    """r_hat for stage-1 logits l: the lookup applied to r = sigmoid(l)."""
    return lookup.reconstruct(probabilities(logits))


def refine(logits: np.ndarray, lookup: Reconstructor, head: Combiner) -> np.ndarray:
    """The final logits fc2(concat(r_hat, l)) of stage-1 logits l (N x M float32)."""
    logits = as_array(logits)
    return as_array(head.logits(reconstruction(logits, lookup), logits))
