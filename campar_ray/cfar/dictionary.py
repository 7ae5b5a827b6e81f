"""From stage-1 confidences r to CFAR's reconstruction r_hat (eq. 19), for any image.

ALS gives factors only to the training images. A new image gets one in one of two ways:

- ``dictionary`` (the paper): k-means on the training rows of r gives K keys (centroids, in r
  space, where the lookup happens); the value of key k is the mean image factor of the
  training images in cluster k. An image takes the value of its nearest key.
- ``fold-in`` (beyond the paper): the image's own exact least-squares factor against Y with
  the same confidence weighting, i.e. the ALS image step for that one row.

Either way ``r_hat = f^T Y``. The k-means sees only known entries of the training r: an entry
whose label is unknown takes its attribute's mean r over the known training entries, the same
value for every such image, so that images are told apart by what was annotated only. A new
image has no labels: its lookup uses all of its r.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.metrics import pairwise_distances_argmin

from campar_ray.cfar.als import gram, solve_image_factors
from campar_ray.config import LOOKUPS, AlsSettings

MINIBATCH_ABOVE = 50_000
"""Training rows above which k-means runs in mini-batches (same result shape, bounded time)."""


@dataclass(frozen=True)
class AttributeSetDictionary:
    """K keys in r space (K x M) and their values in factor space (K x D)."""

    keys: np.ndarray
    values: np.ndarray

    def nearest(self, r: np.ndarray) -> np.ndarray:
        """Index of the nearest key (Euclidean, as in k-means) for every row of r."""
        return pairwise_distances_argmin(np.asarray(r, dtype=self.keys.dtype), self.keys)

    def factors(self, r: np.ndarray) -> np.ndarray:
        """The value of each row's nearest key (N x D)."""
        return self.values[self.nearest(r)]


def distinct_rows(r: np.ndarray) -> int:
    r = np.ascontiguousarray(r)
    return len(np.unique(r.view(np.dtype((np.void, r.dtype.itemsize * r.shape[1])))))


def build_dictionary(
    r: np.ndarray, X: np.ndarray, keys: int, seed: int = 0, known: np.ndarray | None = None
) -> AttributeSetDictionary:
    """k-means with ``keys`` clusters on training r (N x M); values = mean X per cluster.
    Entries outside ``known`` (None: all known) are first set to their attribute's mean over
    the known ones (module doc).

    ``keys`` above the number of distinct rows of r is clamped to it with a warning (k-means
    cannot place more distinct centroids). Training images are assigned to their nearest
    final key, exactly as a lookup would; a key that no training image is nearest to has no
    value and is dropped, so every key returned has a value.
    """
    if keys < 1:
        raise ValueError(f"keys must be >= 1, got {keys}")
    if len(r) != len(X):
        raise ValueError(f"r has {len(r)} rows but X has {len(X)}")
    r = np.asarray(r, dtype=np.float32)
    if known is not None:
        r = known_mean_filled(r, known)
    distinct = distinct_rows(r)
    if keys > distinct:
        warnings.warn(
            f"keys={keys} exceeds the {distinct} distinct training rows of r; "
            f"using {distinct} keys",
            stacklevel=2,
        )
        keys = distinct
    if len(r) > MINIBATCH_ABOVE:
        kmeans = MiniBatchKMeans(n_clusters=keys, batch_size=4096, n_init=3, random_state=seed)
    else:
        kmeans = KMeans(n_clusters=keys, n_init=3, random_state=seed)
    centroids = kmeans.fit(r).cluster_centers_.astype(np.float32)
    nearest = pairwise_distances_argmin(r, centroids)
    counts = np.bincount(nearest, minlength=keys)
    sums = np.stack([np.bincount(nearest, X[:, d], minlength=keys) for d in range(X.shape[1])], 1)
    used = counts > 0
    return AttributeSetDictionary(centroids[used], sums[used] / counts[used, None])


def known_mean_filled(r: np.ndarray, known: np.ndarray) -> np.ndarray:
    """``r`` with each entry outside ``known`` replaced by its column's mean over the known
    entries (0 for a column with none), float32."""
    counts = np.maximum(known.sum(axis=0), 1)
    means = (np.where(known, r, 0).sum(axis=0) / counts).astype(np.float32)
    return np.where(known, r, means).astype(np.float32)


def fold_in(r: np.ndarray, Y: np.ndarray, settings: AlsSettings) -> np.ndarray:
    """Each row's own factor: the ALS image step for that row given Y (N x D), with the
    confidences, targets and regularisation the factors were fitted with."""
    return solve_image_factors(
        np.asarray(r, dtype=np.float32),
        Y,
        gram(Y),
        alpha=settings.alpha,
        threshold=settings.threshold,
        lam=settings.lam,
    )


@dataclass(frozen=True)
class ConfidenceEstimator:
    """Everything that turns stage-1 confidences r into ``r_hat = f^T Y`` (eq. 19)."""

    Y: np.ndarray
    dictionary: AttributeSetDictionary
    lookup: str
    als: AlsSettings
    """What Y was fitted with: fold-in solves the same image step."""

    def __post_init__(self) -> None:
        if self.lookup not in LOOKUPS:
            raise ValueError(f"lookup must be one of {', '.join(LOOKUPS)}, got {self.lookup!r}")

    def image_factors(self, r: np.ndarray) -> np.ndarray:
        if self.lookup == "dictionary":
            return self.dictionary.factors(r)
        return fold_in(r, self.Y, self.als)

    def reconstruct(self, r: np.ndarray) -> np.ndarray:
        """r_hat (N x M) for rows of r."""
        return self.image_factors(r) @ self.Y.T
