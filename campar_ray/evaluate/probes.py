"""What the trained network does on real images: Fig. 7 angles and CAM overlays.

Both need pixels, so they read the run's manifest and decode a bounded number of images of
the split (evenly spaced in manifest order, so the sample is the same every time) with the
same decode + resize + normalise as training. They run locally in plain PyTorch: a report
needs hundreds of images, not the whole split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from campar_ray.bundle import ParPredictor
from campar_ray.data.images import STRICT, ImageLimits, read_image
from campar_ray.data.manifest import BINARY_COLUMN, labels_matrix, read_manifest
from campar_ray.data.transforms import BILINEAR
from campar_ray.model import feature_weight_angles
from campar_ray.model.inputs import normalize
from campar_ray.progress import Progress

BATCH = 32


@dataclass(frozen=True)
class SplitImages:
    """Decoded, resized images of a split with their labels (all attributes), names and
    persons."""

    names: list[str]
    pixels: np.ndarray
    """uint8 N x H x W x 3."""
    labels: np.ndarray
    identities: list[str]
    """Each image's person (the manifest's ``identity``)."""

    def take(self, indices: Sequence[int]) -> SplitImages:
        return SplitImages(
            [self.names[i] for i in indices],
            self.pixels[list(indices)],
            self.labels[list(indices)],
            [self.identities[i] for i in indices],
        )

    def first(self, count: int) -> SplitImages:
        return self.take(range(min(count, len(self.names))))

    def distinct_persons(self, count: int) -> SplitImages:
        """Up to ``count`` images, each of another person, spread over the split: a data set
        lists a person's images together, so the first few are often one person. With fewer
        persons than ``count``, further images of theirs fill the rest."""
        firsts, seen = [], set()
        for index, person in enumerate(self.identities):
            if person not in seen:
                seen.add(person)
                firsts.append(index)
        spread = np.unique(np.linspace(0, len(firsts) - 1, min(count, len(firsts))).astype(int))
        chosen = [firsts[i] for i in spread] if firsts else []
        taken = set(chosen)
        rest = [i for i in range(len(self.names)) if i not in taken]
        return self.take(chosen + rest[: max(0, count - len(chosen))])


@dataclass(frozen=True)
class CamSample:
    """One image of the CAM grid: pixels, final probabilities, labels and upsampled CAMs."""

    name: str
    pixels: np.ndarray
    probs: np.ndarray
    labels: np.ndarray
    cams: np.ndarray
    """M x H x W in [0, 1], at the network's input size."""


def load_split_images(
    manifest: str,
    split: str,
    size: tuple[int, int],
    limit: int,
    limits: ImageLimits = STRICT,
    interpolation: str = BILINEAR,
) -> SplitImages:
    """Up to ``limit`` decodable images of ``split``, evenly spaced over the split, resized
    with ``interpolation`` (the run's encoder's filter) and read
    through the manifest guard under ``limits`` (the run's ``data``)."""
    if not manifest:
        raise FileNotFoundError("the run's config names no manifest (data.manifest is empty)")
    table, info = read_manifest(manifest)
    rows = table.filter(pc.equal(table.column("split"), split))
    if rows.num_rows == 0:
        raise ValueError(f"manifest {manifest} has no {split!r} images")
    picked = np.unique(np.linspace(0, rows.num_rows - 1, min(limit, rows.num_rows)).astype(int))
    rows = rows.take(picked)
    sources = rows.column(BINARY_COLUMN if BINARY_COLUMN in rows.column_names else "image")
    names, pixels, keep = [], [], []
    identities = rows.column("identity").to_pylist()
    options = {"size": size, "stored": info.pixels, "interpolation": interpolation}
    for index, (name, source) in enumerate(
        zip(rows.column("image").to_pylist(), sources.to_pylist(), strict=True)
    ):
        try:
            pixels.append(read_image(source, info.root, limits, **options))
        except (ValueError, OSError):
            continue
        names.append(name)
        keep.append(index)
    labels = labels_matrix(rows)[keep]
    empty = np.zeros((0, *size, 3), dtype=np.uint8)
    persons = [identities[i] for i in keep]
    return SplitImages(names, np.stack(pixels) if pixels else empty, labels, persons)


def eval_mask(predictor: ParPredictor) -> np.ndarray:
    """Boolean mask of the evaluated attributes among all attributes."""
    evaluated = set(predictor.eval_attributes)
    return np.array([name in evaluated for name in predictor.attributes])


def angles(predictor: ParPredictor, images: SplitImages, kind: str = "decision") -> np.ndarray:
    """Fig. 7: angle (degrees) between feature vector and classifier for every (image, present
    evaluated attribute) pair; ``kind`` as in :func:`campar_ray.model.feature_weight_angles`
    (``decision``: 90 degrees is the 0.5 boundary for either head)."""
    labels = images.labels * eval_mask(predictor)
    chunks = [np.zeros(0, dtype=np.float32)]
    with Progress("[evaluate] Fig. 7 angles", len(images.names)) as progress:
        for start in range(0, len(images.names), BATCH):
            x = _normalized(predictor, images.pixels[start : start + BATCH])
            y = torch.from_numpy(labels[start : start + BATCH])
            chunks.append(feature_weight_angles(predictor.model, x.to(predictor.device), y, kind))
            progress.update(len(y))
    return np.concatenate(chunks)


def cam_samples(predictor: ParPredictor, images: SplitImages, count: int) -> list[CamSample]:
    """CAMs and final probabilities of the first ``count`` images, upsampled to input size."""
    pixels = images.pixels[:count]
    if len(pixels) == 0:
        return []
    output = predictor.stage1(_normalized(predictor, pixels), return_cams=True)
    probs = predictor.probabilities(output)
    cams = F.interpolate(
        output.cams.float(), size=pixels.shape[1:3], mode="bilinear", align_corners=False
    )
    cams = cams.clamp(0, 1).cpu().numpy()
    return [
        CamSample(images.names[i], pixels[i], probs[i], images.labels[i], cams[i])
        for i in range(len(pixels))
    ]


def _normalized(predictor: ParPredictor, pixels: np.ndarray) -> torch.Tensor:
    """uint8 images as the predictor's encoder takes them (its own mean and std)."""
    encoder = predictor.model.backbone
    return normalize(torch.from_numpy(pixels), mean=encoder.mean, std=encoder.std)


def angle_summary(values: np.ndarray) -> dict[str, float]:
    """Count, quartiles, mean and the share of pairs on the right side of 90 degrees."""
    if len(values) == 0:
        return {"count": 0}
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {
        "count": len(values),
        "mean": float(values.mean()),
        "median": float(median),
        "q1": float(q1),
        "q3": float(q3),
        "below_90": float(np.mean(values < 90.0)),
    }
