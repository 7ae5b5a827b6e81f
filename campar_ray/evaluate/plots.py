"""The report's figures, each returned as PNG bytes.

Figures are drawn with Matplotlib's object API on the Agg canvas (``Figure.savefig``), never
through ``pyplot``: no global state, no display needed, safe in Ray workers and threads.
Bytes (not files) so that the report can write them anywhere ``storage`` reaches and embed
the very same bytes in its HTML page.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from campar_ray.evaluate.probes import CamSample

DPI = 110
BOUNDARY = 90.0
"""Angle at which ``w_j^T v`` changes sign: the decision boundary of eq. 1-4 at p_t = 0.5."""


def per_attribute_chart(
    names: Sequence[str], accuracy: np.ndarray, positive_rate: np.ndarray, f1: np.ndarray
) -> bytes:
    """Grouped horizontal bars per attribute, worst accuracy (mA term) at the top."""
    order = np.argsort(accuracy, kind="stable")
    figure = Figure(figsize=(7.5, 1.2 + 0.32 * len(names)), dpi=DPI)
    axes = figure.add_subplot()
    positions = np.arange(len(names))[::-1]
    height = 0.27
    for offset, values, label in (
        (height, accuracy, "accuracy (mA term)"),
        (0.0, f1, "F1"),
        (-height, positive_rate, "positive rate"),
    ):
        axes.barh(positions + offset, 100 * np.asarray(values)[order], height=height, label=label)
    axes.set_yticks(positions, [names[i] for i in order], fontsize=8)
    axes.set_xlim(0, 100)
    axes.set_xlabel("%")
    axes.axvline(50, color="grey", linewidth=0.8, linestyle=":")
    axes.legend(loc="lower right", fontsize=8)
    axes.set_title("Per-attribute results, worst first")
    figure.tight_layout()
    return _png(figure)


ANGLE_AXES = {
    "decision": "angle between [feature, 1] and [weight, bias] (°)",
    "weight": "angle between feature and classifier weight (°)",
}


def angle_boxplot(groups: dict[str, np.ndarray], kind: str = "decision") -> bytes:
    """Paper Fig. 7: one box of angles per run, with the 90-degree line.

    For ``decision`` angles (bias included) 90 degrees is exactly the 0.5 decision boundary;
    for the thesis's ``weight`` angle it is not, and CAM-PAR's cannot exceed it."""
    labels = list(groups)
    figure = Figure(figsize=(1.8 + 1.6 * len(labels), 4.2), dpi=DPI)
    axes = figure.add_subplot()
    axes.boxplot([groups[label] for label in labels], showfliers=True, widths=0.5)
    axes.set_xticks(np.arange(1, len(labels) + 1), labels, fontsize=8)
    axes.axhline(BOUNDARY, color="crimson", linestyle="--", linewidth=1.2)
    line = "decision boundary (90°)" if kind == "decision" else "90°"
    axes.text(0.55, BOUNDARY + 1.0, line, color="crimson", fontsize=8)
    low = min([float(np.min(v)) for v in groups.values() if len(v)] + [BOUNDARY])
    high = max([float(np.max(v)) for v in groups.values() if len(v)] + [BOUNDARY])
    axes.set_ylim(max(0.0, low - 5), min(180.0, high + 8))
    axes.set_ylabel(ANGLE_AXES[kind], fontsize=8)
    axes.set_title("Angles of present attributes (Fig. 7)")
    return _png(figure)


def cam_grid(
    samples: Sequence[CamSample],
    attributes: Sequence[str],
    shown: Sequence[Sequence[int]],
) -> bytes:
    """One row per image: the image, then a CAM overlay for each attribute in ``shown``.

    Each overlay's title gives the attribute, its final probability and its label.
    """
    columns = 1 + max((len(row) for row in shown), default=0)
    height, width = samples[0].pixels.shape[:2]
    cell_width = max(1.5, 2.2 * width / height)  # inches; room for two lines of title
    cell_height = cell_width * height / width + 0.5
    figure = Figure(figsize=(cell_width * columns, cell_height * len(samples)), dpi=DPI)
    grid = figure.subplots(len(samples), columns, squeeze=False)
    for row, (sample, picked) in enumerate(zip(samples, shown, strict=True)):
        grid[row, 0].imshow(sample.pixels)
        grid[row, 0].set_title(image_caption(sample.name), fontsize=7)
        for column, index in enumerate(picked, start=1):
            axes = grid[row, column]
            axes.imshow(sample.pixels)
            axes.imshow(sample.cams[index], cmap="jet", alpha=0.45, vmin=0, vmax=1)
            label = {1: "present", 0: "absent"}.get(int(sample.labels[index]), "unknown")
            axes.set_title(
                f"{attributes[index]}\np={sample.probs[index]:.2f} ({label})", fontsize=7
            )
        for axes in grid[row]:
            axes.axis("off")
    figure.tight_layout()
    return _png(figure)


def training_curves(history: Sequence[dict[str, float]]) -> bytes:
    """Training and validation loss, validation mA/F1 and learning rate per epoch (runs
    trained before the validation loss was recorded show the training loss alone)."""
    epochs = [entry["epoch"] for entry in history]
    figure = Figure(figsize=(10, 3.4), dpi=DPI)
    loss, quality, rate = figure.subplots(1, 3)
    for key, label in (("train_loss", "training"), ("val_loss", "validation")):
        if all(key in entry for entry in history):
            loss.plot(epochs, [entry[key] for entry in history], marker="o", label=label)
    loss.set_title("loss")
    loss.legend(fontsize=8)
    for key, label in (("val_mA", "val mA"), ("val_f1", "val F1"), ("val_accuracy", "val Acc")):
        if all(key in entry for entry in history):
            quality.plot(epochs, [100 * entry[key] for entry in history], marker="o", label=label)
    quality.set_title("validation (%)")
    quality.legend(fontsize=8)
    if all("lr" in entry for entry in history):
        rate.plot(epochs, [entry["lr"] for entry in history], marker="o")
        rate.set_yscale("log")
    rate.set_title("learning rate")
    for axes in (loss, quality, rate):
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    figure.tight_layout()
    return _png(figure)


def image_caption(name: str, width: int = 24) -> str:
    """An image's file name whole, with the two folders above it (PETA's subset and
    ``archive``), on lines of ``width`` characters: a cut name can be told from no other."""
    tail = "/".join(name.replace("\\", "/").split("/")[-3:])
    return "\n".join(tail[start : start + width] for start in range(0, len(tail), width))


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
