"""The fc2 training-data study (``bench.fc2_heldout``) on data whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from bench.fc2_heldout import halves, study
from campar_ray.run.logits import SplitLogits

ATTRIBUTES = tuple(f"a{j}" for j in range(6))


def _split(labels: np.ndarray, logits: np.ndarray, images: list[str]) -> SplitLogits:
    return SplitLogits(images, labels.astype(np.int8), logits, logits, ATTRIBUTES, ATTRIBUTES)


def test_halves_are_the_recall_and_rejection_of_the_decision_at_half() -> None:
    labels = np.array([[1, 0], [1, 0], [0, 1], [0, 0]])
    logits = np.array([[2.0, -1.0], [-2.0, 1.0], [1.0, 3.0], [-1.0, -3.0]], dtype=np.float32)
    split = _split(labels, logits, ["a", "b", "c", "d"])
    # attribute 0: 1 of 2 positives found, 1 of 2 negatives rejected; attribute 1: 1 of 1
    # found, 2 of 3 rejected.
    assert halves(split, np.arange(2)) == pytest.approx(
        {"recall": 100 * (0.5 + 1) / 2, "tnr": 100 * (0.5 + 2 / 3) / 2}
    )


def test_folds_that_share_persons_promise_what_person_folds_do_not() -> None:
    """Labels are per person and a person's images share their logits up to noise, with no
    relation between logits and labels: fc2 can only memorise persons. Folds by image let it
    meet every person in training, so their cross-validation promises a gain; folds by
    person cannot, and held-out persons (test) gain nothing."""
    rng = np.random.default_rng(0)

    def persons(count: int, prefix: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        labels = rng.integers(0, 2, (count, len(ATTRIBUTES)))
        codes = rng.normal(0, 1, (count, len(ATTRIBUTES)))
        rows = np.repeat(np.arange(count), 6)
        noise = rng.normal(0, 0.05, (len(rows), len(ATTRIBUTES)))
        images = [f"{prefix}/{person}_{k}.png" for person in range(count) for k in range(6)]
        return labels[rows], (codes[rows] + noise).astype(np.float32), images

    splits = {name: _split(*persons(12, name)) for name in ("train", "val", "test")}
    identity = {image: image.split("_")[0] for split in splits.values() for image in split.images}
    figures = study(splits, identity)
    by_image, by_person = figures["val_folds_by_images"], figures["val_folds_by_persons"]
    assert by_image["cv_mA"] > by_image["cv_mA_epoch0"] + 10
    assert by_person["cv_mA"] < by_image["cv_mA"] - 10
    assert by_image["test_mA"] < by_image["cv_mA"] - 10
    assert figures["val_persons"] == 12 and figures["val_images"] == 72
