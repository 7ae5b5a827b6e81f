"""Decode every image of a manifest once, before a long training run finds the broken one.

The report also counts, per attribute, the labels nobody annotated (value -1), so a corpus
whose annotation rounds missed an attribute shows it before training.

Reading and decoding run on a small thread pool: file reads and Pillow's codecs release the
GIL, and on object stores the reads dominate.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from campar_ray.data.images import STRICT, UNREADABLE, ImageLimits, read_image
from campar_ray.data.manifest import BINARY_COLUMN, labels_matrix, read_manifest, unknown_counts

CHUNK = 256


@dataclass(frozen=True)
class VerifyReport:
    """How many images were checked and which ones could not be read or decoded."""

    total: int
    bad: list[tuple[str, str]] = field(default_factory=list)
    """``(image, error)`` for each unreadable or corrupt image, in manifest order."""
    unknown: dict[str, int] = field(default_factory=dict)
    """Images whose label is unknown (-1), per attribute that has any."""

    @property
    def ok(self) -> bool:
        return not self.bad

    def summary(self) -> str:
        lines = [f"verified {self.total} images: {len(self.bad)} unreadable or corrupt"]
        lines += [f"  {image}: {error}" for image, error in self.bad]
        if self.unknown:
            counts = ", ".join(f"{name} {count}" for name, count in self.unknown.items())
            lines.append(f"unknown labels (-1) per attribute, of {self.total} images: {counts}")
        return "\n".join(lines)


def verify_manifest(
    path: str,
    progress: Callable[[int, int], None] | None = None,
    threads: int = 4,
    limits: ImageLimits = STRICT,
) -> VerifyReport:
    """Read and decode every image of the manifest at ``path``.

    An image outside the manifest's folder (unless ``limits`` allow it) or above its pixel
    cap is reported like a corrupt one, and never read or decoded. ``progress(done, total)``
    is called from the calling thread after each chunk of images.
    """
    table, info = read_manifest(path)
    images = table.column("image").to_pylist()
    packed = BINARY_COLUMN in table.column_names
    total = len(images)
    bad: list[tuple[str, str]] = []

    def check(row: int) -> str | None:
        source = table.column(BINARY_COLUMN)[row].as_py() if packed else images[row]
        try:
            read_image(source, info.root, limits, stored=info.pixels)
        except UNREADABLE as error:
            return str(error)
        return None

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for start in range(0, total, CHUNK):
            rows = range(start, min(start + CHUNK, total))
            for row, error in zip(rows, pool.map(check, rows), strict=True):
                if error is not None:
                    bad.append((images[row], error))
            if progress is not None:
                progress(rows.stop, total)
    unknown = unknown_counts(labels_matrix(table), info.attributes)
    return VerifyReport(total=total, bad=bad, unknown=unknown)
