"""The ``synthetic`` format: generate the procedural data set into the dataset folder."""

from __future__ import annotations

from campar_ray.data.converters.common import Converted, Option
from campar_ray.data.split import Ratios, parse_ratios
from campar_ray.data.synthetic import parse_size, render_dataset

OPTIONS = (
    Option("n", 600, "number of images", int),
    Option("size", (128, 64), "image size as HEIGHTxWIDTH", parse_size),
    Option(
        "ratios",
        (0.6, 0.2, 0.2),
        "train,val,test fractions of the images (by person)",
        parse_ratios,
    ),
)


def convert(root: str, seed: int, *, n: int, size: tuple[int, int], ratios: Ratios) -> Converted:
    """Write ``n`` synthetic images under ``<root>/images`` and return their manifest rows."""
    table, info = render_dataset(root, n, tuple(size), seed, parse_ratios(ratios))
    return Converted(table, info)
