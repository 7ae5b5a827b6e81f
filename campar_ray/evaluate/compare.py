"""``campar compare``: the ablation table of several runs, in the shape of the paper's Table 2.

One row per run and prediction source: the run's stage-1 prediction (head x fusion), and,
when the run has CFAR artefacts, a second row for stage 1 + CFAR. Every row follows one
threshold protocol (0.5 by default, as PAR papers report; or chosen on each run's validation
split), which the table's header names. Writes ``compare.md`` and ``compare.csv`` (metrics in
percent) and, unless ``angle_images`` is 0, ``angles.png``: Fig. 7 with one box per run.
"""

from __future__ import annotations

import csv
import io
import posixpath
from typing import Any

import numpy as np

from campar_ray import storage
from campar_ray.bundle import load_model
from campar_ray.cfar.fit import load_cfar_if_fitted
from campar_ray.data.images import ImageLimits
from campar_ray.decision import CFAR_SOURCE, final_source
from campar_ray.evaluate.metrics_table import run_config, score_split
from campar_ray.evaluate.plots import angle_boxplot
from campar_ray.evaluate.probes import angles, load_split_images
from campar_ray.evaluate.report import run_label
from campar_ray.metrics import SUMMARY_HEADERS, check_protocol, protocol_statement

METRIC_COLUMNS = {header: key for key, header in SUMMARY_HEADERS.items()}
COLUMNS = ("run", "head", "fusion", "CFAR", *METRIC_COLUMNS)


def compare_runs(
    run_dirs: list[str],
    out: str,
    split: str = "test",
    *,
    threshold: str = "0.5",
    angle_images: int = 256,
) -> list[dict[str, Any]]:
    """Score every run on ``split`` and write the table (and Fig. 7) into the folder ``out``.

    ``threshold`` is the protocol (:data:`campar_ray.metrics.THRESHOLD_PROTOCOLS`) of every
    row. Returns the rows (metrics as fractions in [0, 1]) in table order.
    """
    if not run_dirs:
        raise ValueError("compare needs at least one run directory")
    check_protocol(threshold)
    rows: list[dict[str, Any]] = []
    groups: dict[str, np.ndarray] = {}
    notes: list[str] = []
    for run_dir in run_dirs:
        config = run_config(run_dir)
        cfar = load_cfar_if_fitted(run_dir)
        scored, logits = score_split(run_dir, split, config.model.predict_from, cfar, threshold)
        by_name = {item.name: item for item in scored}
        stage1 = final_source(logits, config.model.predict_from, None)
        sources = [stage1] + ([CFAR_SOURCE] if cfar is not None else [])
        for source in sources:
            metrics = by_name[source].metrics
            rows.append(
                {
                    "run": posixpath.basename(run_dir.rstrip("/")),
                    "head": config.model.head,
                    "fusion": config.model.fusion,
                    "CFAR": source == CFAR_SOURCE,
                    **{column: float(metrics[key]) for column, key in METRIC_COLUMNS.items()},
                }
            )
        if angle_images > 0:
            predictor = load_model(run_dir)
            try:
                images = load_split_images(
                    config.data.manifest, split, predictor.image_size, angle_images,
                    ImageLimits.of(config.data), predictor.config.data.interpolation,
                )  # fmt: skip
            except (FileNotFoundError, ValueError) as error:
                notes.append(f"No angles for {run_dir}: its images cannot be read ({error}).")
                continue
            groups[run_label(config, run_dir)] = angles(predictor, images)
    storage.write_bytes(
        storage.join(out, "compare.md"), _markdown(rows, split, threshold, notes).encode()
    )
    storage.write_bytes(storage.join(out, "compare.csv"), _csv(rows).encode())
    if groups:
        storage.write_bytes(storage.join(out, "angles.png"), angle_boxplot(groups))
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table, metrics in percent with two decimals."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for row in rows:
        cells = [_cell(column, row[column]) for column in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(column: str, value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if column in METRIC_COLUMNS:
        return f"{100 * value:.2f}"
    return str(value)


def _markdown(rows: list[dict[str, Any]], split: str, threshold: str, notes: list[str]) -> str:
    parts = [
        f"# Ablation ({split} split, threshold {threshold})",
        "",
        "Metrics in percent over the evaluated attributes. " + protocol_statement(threshold),
        "",
        markdown_table(rows),
    ]
    return "\n".join([*parts, "", *notes, ""])


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow(
            [round(100 * row[c], 4) if c in METRIC_COLUMNS else row[c] for c in COLUMNS]
        )
    return buffer.getvalue()
