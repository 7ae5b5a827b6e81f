"""The numbers of an evaluation: every prediction source of a run, scored on one split.

Sources, side by side: stage-1 shared logits, stage-1 specific logits (CAM-PAR head), their
mean when the run predicts from it, and stage 1 + CFAR when the run has CFAR artefacts. All
come from the stored logits (no network, no images), over the dataset's evaluated
attributes. Each source is scored at its own threshold, chosen on the validation split
(maximising mA, as stage 2 chooses CFAR's), or at one fixed value when asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import yaml

from campar_ray import storage
from campar_ray.bundle import stage1_probabilities
from campar_ray.cfar.fit import CfarPredictor, eval_columns
from campar_ray.config import Config
from campar_ray.metrics import SUMMARY_KEYS, choose_threshold, par_metrics
from campar_ray.train.logits import SplitLogits, logits_path, read_split_logits

SPLITS = ("val", "test")
LABELS = {
    "stage1_shared": "Stage 1, shared logits",
    "stage1_specific": "Stage 1, specific logits",
    "stage1_mean": "Stage 1, mean of both logits",
    "stage1_cfar": "Stage 1 + CFAR",
}
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
    threshold: float
    threshold_source: str
    metrics: dict[str, Any]
    """``par_metrics`` over the evaluated attributes (fractions, per-attribute arrays)."""


def run_config(run_dir: str) -> Config:
    """The resolved config a run was trained with (``<run>/config.yaml``)."""
    return Config().override(
        yaml.safe_load(storage.read_bytes(storage.join(run_dir, "config.yaml")))
    )


def check_split(split: str) -> None:
    """Evaluation reads the val or test logits (train is what the model was fitted on)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")


def source_probabilities(
    logits: SplitLogits, predict_from: str, cfar: CfarPredictor | None
) -> dict[str, np.ndarray]:
    """Probabilities of each source (all attributes), in the order they are reported."""
    probs = {"stage1_shared": stage1_probabilities(logits, "shared")}
    if logits.specific is not None:
        probs["stage1_specific"] = stage1_probabilities(logits, "specific")
        if predict_from == "mean":
            probs["stage1_mean"] = stage1_probabilities(logits, "mean")
    if cfar is not None:
        probs["stage1_cfar"] = cfar.probabilities(logits.prediction)
    return probs


def final_source(names: list[str], predict_from: str) -> str:
    """The source a run's predictions come from: CFAR when fitted, else ``predict_from``."""
    if "stage1_cfar" in names:
        return "stage1_cfar"
    preferred = f"stage1_{predict_from}"
    return preferred if preferred in names else "stage1_shared"


def score_split(
    run_dir: str,
    split: str,
    predict_from: str,
    cfar: CfarPredictor | None,
    threshold: float | None = None,
) -> tuple[list[Scored], SplitLogits]:
    """Score every source of a run on ``split``; thresholds from val unless ``threshold``."""
    check_split(split)
    logits = read_split_logits(logits_path(run_dir, split))
    columns = eval_columns(logits)
    probs = source_probabilities(logits, predict_from, cfar)
    thresholds = _thresholds(run_dir, predict_from, cfar, threshold, list(probs))
    scored = [
        Scored(
            name,
            thresholds[name][0],
            thresholds[name][1],
            par_metrics(logits.labels[:, columns], values[:, columns], thresholds[name][0]),
        )
        for name, values in probs.items()
    ]
    return scored, logits


def _thresholds(
    run_dir: str,
    predict_from: str,
    cfar: CfarPredictor | None,
    fixed: float | None,
    names: list[str],
) -> dict[str, tuple[float, str]]:
    if fixed is not None:
        return dict.fromkeys(names, (float(fixed), "fixed by the caller"))
    val = read_split_logits(logits_path(run_dir, "val"))
    columns = eval_columns(val)
    probs = source_probabilities(val, predict_from, None)
    chosen = {
        name: (
            float(choose_threshold(val.labels[:, columns], values[:, columns])),
            "val (maximises mA)",
        )
        for name, values in probs.items()
    }
    if cfar is not None:
        chosen["stage1_cfar"] = (cfar.threshold, "val (maximises mA, chosen by fit-cfar)")
    return chosen


def metrics_document(
    run_dir: str,
    split: str,
    config: Config,
    scored: list[Scored],
    logits: SplitLogits,
    has_cfar: bool,
) -> dict[str, Any]:
    """The JSON-ready content of ``metrics.json`` (fractions in [0, 1])."""
    columns = eval_columns(logits)
    names = [logits.attributes[index] for index in columns]
    final = final_source([s.name for s in scored], config.model.predict_from)
    sources = {}
    for item in scored:
        sources[item.name] = {
            "label": LABELS[item.name],
            "threshold": item.threshold,
            "threshold_source": item.threshold_source,
            **{key: float(item.metrics[key]) for key in SUMMARY_KEYS},
            "attributes": {
                name: {key: float(item.metrics[array][i]) for key, array in ATTRIBUTE_KEYS.items()}
                for i, name in enumerate(names)
            },
        }
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
        "cfar": has_cfar,
        "eval_attributes": names,
        "final": final,
        "sources": sources,
    }
