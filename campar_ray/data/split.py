"""Seeded, person-disjoint train/val/test splits.

Images of one person look alike, so a person whose images sit in both train and test inflates
test scores. Whole identities are therefore assigned to one split. Identities are shuffled
with the seed, and each goes to the split in which the midpoint of its images falls on the
cumulative image count, so the *image* fractions follow the ratios closely even when some
people have many more images than others.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from campar_ray.data.manifest import SPLITS

Ratios = tuple[float, float, float]


def parse_ratios(value: str | Sequence[float]) -> Ratios:
    """``"0.5,0.1,0.4"`` or three numbers -> (train, val, test) fractions summing to 1."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        ratios = tuple(float(part) for part in parts)
    except ValueError:
        raise ValueError(f"split ratios {value!r} must be three numbers like 0.6,0.2,0.2") from None
    if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) <= 0:
        raise ValueError(
            f"split ratios {value!r} must be three non-negative numbers (train,val,test) "
            "with a positive sum, like 0.6,0.2,0.2"
        )
    total = sum(ratios)
    return (ratios[0] / total, ratios[1] / total, ratios[2] / total)


def split_by_identity(identities: Sequence[str], ratios: Ratios, seed: int) -> np.ndarray:
    """One split name per row such that every identity lies in exactly one split.

    The result depends only on the set of identities, their image counts and the seed, not on
    row order. Every split with a positive ratio gets at least one identity; ``ValueError``
    when there are fewer identities than such splits.
    """
    names, inverse, counts = np.unique(
        np.asarray(identities, dtype=object).astype(str), return_inverse=True, return_counts=True
    )
    order = np.random.default_rng(seed).permutation(len(names))
    midpoints = np.empty(len(names))
    midpoints[order] = (np.cumsum(counts[order]) - counts[order] / 2) / max(counts.sum(), 1)
    edges = np.concatenate([[0.0], np.cumsum(ratios)])
    assigned = np.searchsorted(edges[1:3], midpoints, side="right")
    for index, name in enumerate(SPLITS):
        if ratios[index] > 0 and not np.any(assigned == index):
            centre = (edges[index] + edges[index + 1]) / 2
            assigned[_donor(assigned, midpoints, centre, name)] = index
    return np.asarray(SPLITS, dtype=object)[assigned[inverse.reshape(-1)]]


def _donor(assigned: np.ndarray, midpoints: np.ndarray, centre: float, split: str) -> int:
    """With few people a split can come out empty: move the identity nearest to its share,
    taken from a split that keeps at least one."""
    sizes = np.bincount(assigned, minlength=len(SPLITS))
    candidates = np.flatnonzero(sizes[assigned] > 1)
    if candidates.size == 0:
        raise ValueError(
            f"{len(assigned)} identities are too few to fill split {split!r}; "
            "use more data, other ratios, or give the split explicitly"
        )
    return int(candidates[np.argmin(np.abs(midpoints[candidates] - centre))])
