"""The numbers of an evaluation: every prediction source of a run, scored on one split.

Sources, side by side: stage-1 shared logits, stage-1 specific logits (CAM-PAR head), their
mean when the run predicts from it, and stage 1 + CFAR when the run has CFAR artefacts. All
come from the stored logits (no network, no images), over the dataset's evaluated
attributes. Every source follows one threshold protocol
(:data:`campar_ray.metrics.THRESHOLD_PROTOCOLS`): 0.5, as PAR papers report; ``val``, its own
threshold chosen on the validation split (maximising mA, as stage 2 chooses CFAR's); or
``val-per-attribute``, its own threshold per attribute, chosen on validation likewise.

When the split's images come from several data sources (the manifest's ``source`` column: the
datasets of a merged corpus, PETA's subsets), each prediction source is also scored on each
data source's images alone (:func:`campar_ray.metrics.metrics_by_group`).

Next to them, always: the final source (the one predictions use) under every decision
protocol (0.5, ``val``, ``val-per-attribute`` and calibrated,
:mod:`campar_ray.decision.calibration`), side by side: the figures fit-cfar and tune print are
among them, under the same names. Probabilities, thresholds and the scoring of each source are
:mod:`campar_ray.decision`'s (:func:`~campar_ray.decision.score_sources`, which fit-cfar uses
too); this module only tabulates them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from campar_ray import storage
from campar_ray.bounded import load_yaml
from campar_ray.cfar.fit import CfarPredictor
from campar_ray.config import Config
from campar_ray.data.manifest import ManifestError, read_manifest
from campar_ray.decision import (
    CALIBRATED,
    DECISION_PROTOCOLS,
    FIXED,
    SOURCE_LABELS,
    Calibration,
    calibrated_probabilities,
    eval_columns,
    figure_table,
    final_logits,
    final_source,
    run_calibration,
    score_sources,
)
from campar_ray.metrics import (
    SUMMARY_KEYS,
    THRESHOLD_PROTOCOLS,
    check_protocol,
    metrics_by_group,
    par_metrics,
    summary,
)
from campar_ray.run.layout import RunDir
from campar_ray.run.logits import SplitLogits, read_split_logits

SPLITS = ("val", "test")
ATTRIBUTE_KEYS = {
    "accuracy": "attr_accuracy",
    "positive_rate": "attr_positive_rate",
    "predicted_rate": "attr_predicted_rate",
    "precision": "attr_precision",
    "recall": "attr_recall",
    "f1": "attr_f1",
}


@dataclass(frozen=True)
class Scored:
    """One prediction source on one split."""

    name: str
    threshold: float | np.ndarray
    """One value, or one per evaluated attribute."""
    threshold_source: str
    metrics: dict[str, Any]
    """``par_metrics`` over the evaluated attributes (fractions, per-attribute arrays)."""
    by_source: dict[str, dict[str, float]] | None = None
    """The five headline figures on each data source's images (None: one source)."""


def run_config(run_dir: str) -> Config:
    """The resolved config a run was trained with (the one stage 1 wrote)."""
    path = RunDir(run_dir).config_file
    return Config().override(load_yaml(storage.read_bytes(path), path))


def check_split(split: str) -> None:
    """Evaluation reads the val or test logits (train is what the model was fitted on)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")


def score_split(
    run_dir: str,
    split: str,
    predict_from: str,
    cfar: CfarPredictor | None,
    threshold: str = "0.5",
    manifest: str | None = None,
) -> tuple[list[Scored], SplitLogits]:
    """Score every source of a run on ``split`` under the threshold protocol ``threshold``;
    with the run's ``manifest``, also on each of its data sources (module doc)."""
    check_split(split)
    check_protocol(threshold)
    logits = read_split_logits(RunDir(run_dir).logits(split))
    labels = logits.labels[:, eval_columns(logits)]
    groups = row_sources(manifest, logits.images) if manifest else None
    val = read_split_logits(RunDir(run_dir).logits("val"))
    scored = []
    for name, item in score_sources(logits, val, predict_from, cfar, threshold).items():
        by_source = (
            None if groups is None else metrics_by_group(labels, item.probs, item.threshold, groups)
        )
        scored.append(
            Scored(name, item.threshold, _source_text(name, threshold), item.metrics, by_source)
        )
    return scored, logits


def row_sources(manifest: str, images: list[str]) -> np.ndarray | None:
    """Each image's ``source`` in ``manifest``; None when they share one (nothing to break
    down) or the manifest can no longer be read (the logits alone still score the split)."""
    try:
        table, _ = read_manifest(manifest, with_bytes=False)
    except ManifestError:
        return None
    source = dict(zip(table.column("image").to_pylist(), table.column("source").to_pylist(),
                      strict=True))  # fmt: skip
    sources = np.array([source.get(image, "") for image in images])
    return sources if len(np.unique(sources)) > 1 else None


def _source_text(name: str, protocol: str) -> str:
    """Where a source's threshold came from, for the report's table."""
    if protocol == "0.5":
        return "fixed (0.5)"
    if protocol == "val-per-attribute":
        return "val, per attribute (maximises each mA term)"
    return (
        "val (maximises mA, chosen by fit-cfar)" if name == "stage1_cfar" else "val (maximises mA)"
    )


def score_protocols(
    run_dir: str, logits: SplitLogits, predict_from: str, cfar: CfarPredictor | None
) -> tuple[Calibration, dict[str, dict[str, float]]]:
    """The run's calibration and its final source's five figures on ``logits`` under every
    decision protocol: each threshold protocol (:func:`~campar_ray.decision.score_sources`)
    and calibrated (read at 0.5), over the evaluated attributes."""
    val = read_split_logits(RunDir(run_dir).logits("val"))
    final = final_source(logits, predict_from, cfar)
    figures = {
        protocol: summary(score_sources(logits, val, predict_from, cfar, protocol)[final].metrics)
        for protocol in THRESHOLD_PROTOCOLS
    }
    calibration = run_calibration(run_dir, predict_from, cfar)
    columns = eval_columns(logits)
    probs = calibrated_probabilities(final_logits(logits, predict_from, cfar), calibration)
    figures[CALIBRATED] = summary(par_metrics(logits.labels[:, columns], probs[:, columns]))
    return calibration, figures


def figures_text(document: dict[str, Any]) -> str:
    """The terminal's table of an evaluation (``campar evaluate``, the demo): every source
    under the report's protocol, then the final source under each other decision protocol,
    as the report's tables show them."""
    protocol = document["threshold_protocol"]
    rows = [(source["label"], protocol, source) for source in document["sources"].values()]
    label = SOURCE_LABELS[document["final"]]
    rows += [
        (label, other, document["protocols"][other])
        for other in DECISION_PROTOCOLS
        if other != protocol
    ]
    return figure_table(document["split"], rows)


def metrics_document(
    run_dir: str,
    split: str,
    config: Config,
    scored: list[Scored],
    logits: SplitLogits,
    cfar: CfarPredictor | None,
    protocol: str,
) -> dict[str, Any]:
    """The JSON-ready content of ``metrics.json`` (fractions in [0, 1]); ``protocol`` is the
    threshold protocol the sources were scored under. Its ``protocols`` block is the final
    source's figures under every decision protocol; its ``calibration`` block is the final
    source raw at 0.5 (``0.5``) next to calibrated (``calibrated``), with each evaluated
    attribute's offset."""
    columns = eval_columns(logits)
    names = [logits.attributes[index] for index in columns]
    predict_from = config.model.predict_from
    final = final_source(logits, predict_from, cfar)
    calibration, protocols = score_protocols(run_dir, logits, predict_from, cfar)
    sources = {}
    for item in scored:
        per_attribute = np.broadcast_to(item.threshold, len(names))
        sources[item.name] = {
            "label": SOURCE_LABELS[item.name],
            "threshold": np.asarray(item.threshold, dtype=float).tolist(),
            "threshold_source": item.threshold_source,
            **{key: float(item.metrics[key]) for key in SUMMARY_KEYS},
            "attributes": {
                name: {
                    "threshold": float(per_attribute[i]),
                    **{key: float(item.metrics[array][i]) for key, array in ATTRIBUTE_KEYS.items()},
                }
                for i, name in enumerate(names)
            },
        }
        if item.by_source is not None:
            sources[item.name]["by_source"] = item.by_source
    return {
        "run_dir": run_dir,
        "split": split,
        "images": len(logits.images),
        "model": {
            "backbone": config.model.backbone,
            "head": config.model.head,
            "fusion": config.model.fusion,
            "predict_from": config.model.predict_from,
            "image_size": list(config.data.image_size),
        },
        "cfar": cfar is not None,
        "threshold_protocol": protocol,
        "eval_attributes": names,
        "final": final,
        "sources": sources,
        "protocols": protocols,
        "calibration": {
            "source": calibration.source,
            "how": calibration.threshold.source,
            "offsets": dict(zip(names, calibration.array[columns].tolist(), strict=True)),
            **{name: protocols[name] for name in (FIXED.protocol, CALIBRATED)},
        },
    }
