"""A finished (or interrupted) search as files: the trials table, the best config, the plots.

Plain functions of the trial rows: no Ray, so the outputs can be rebuilt or tested from any
table. Rows come from :func:`trial_rows`, one per trial with its status, sampled values and
last reported metrics.
"""

from __future__ import annotations

import io
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import optuna
import pandas as pd

from campar_ray import storage
from campar_ray.run.layout import SearchDir
from campar_ray.tune.space import SearchSpace

REPORTED = (
    "training_iteration",
    "epoch",
    "threshold",
    "stage1_threshold",
    "als_iterations",
    "keys_used",
    "fc2_best_epoch",
    "time_total_s",
    "timestamp",
    "trial_dir",
)
"""Bookkeeping columns kept next to the metrics (Tune adds many more; these explain a row)."""
STATUSES = ("complete", "stopped", "error", "unfinished")


def trial_row(
    trial_id: str,
    sampled: dict[str, Any],
    metrics: dict[str, Any],
    error: BaseException | None,
    space: SearchSpace,
) -> dict[str, Any]:
    """One trial's row: status, sampled values, last reported metrics and bookkeeping.

    Status: ``complete`` (reported the two-stage result), ``stopped`` (ended by ASHA after a
    stage-1 epoch: Tune marks its last result ``done``), ``error``, or ``unfinished``
    (interrupted or not started; a resumed search runs it).
    """
    if error is not None:
        status = "error"
    elif metrics.get("complete"):
        status = "complete"
    else:
        status = "stopped" if metrics.get("done") else "unfinished"
    row: dict[str, Any] = {"trial_id": trial_id, "status": status}
    row.update({key: sampled.get(key) for key in space.keys})
    row.update({key: value for key, value in metrics.items() if is_metric(key)})
    row.update({key: metrics.get(key) for key in REPORTED})
    row["error"] = None if error is None else f"{type(error).__name__}: {error}"
    return row


def best_row(rows: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The complete trial with the highest ``metric`` (first one on ties), if any."""
    finished = [row for row in rows if row["status"] == "complete" and _finite(row.get(metric))]
    return max(finished, key=lambda row: row[metric]) if finished else None


def in_report_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows by the time of their last report; trials that never reported go last."""
    return sorted(rows, key=lambda row: row["timestamp"] or math.inf)


def write_table(rows: list[dict[str, Any]], tune_dir: str) -> dict[str, str]:
    """``trials.parquet`` and ``trials.csv`` in ``tune_dir``; returns both paths."""
    frame = pd.DataFrame(rows)
    paths = {suffix: SearchDir(tune_dir).table(suffix) for suffix in ("parquet", "csv")}
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    storage.write_bytes(paths["parquet"], buffer.getvalue())
    storage.write_bytes(paths["csv"], frame.to_csv(index=False).encode())
    return paths


def plot_history(rows: list[dict[str, Any]], metric: str, path: str) -> None:
    """Each trial's ``metric`` in the order of ``rows``, and the best so far among complete
    trials (rows come in order of their last report: see :func:`in_report_order`)."""
    figure, axes = plt.subplots(figsize=(7, 4))
    best, running = -math.inf, []
    for number, row in enumerate(rows, start=1):
        value = row.get(metric)
        if row["status"] == "complete" and _finite(value):
            best = max(best, value)
        running.append(best if math.isfinite(best) else math.nan)
        if _finite(value):
            complete = row["status"] == "complete"
            axes.scatter(
                number,
                value,
                marker="o" if complete else "x",
                color="tab:blue" if complete else "tab:gray",
                label="stage 1 + CFAR" if complete else "stopped (stage 1 only)",
            )
    axes.plot(range(1, len(rows) + 1), running, color="tab:red", label="best so far")
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    axes.legend(unique.values(), unique.keys(), loc="best")
    axes.set_xlabel("trial (in order of completion)")
    axes.set_ylabel(f"{metric} (validation)")
    axes.set_title("Optimisation history")
    _save(figure, path)


def param_importances(
    rows: list[dict[str, Any]], space: SearchSpace, metric: str, seed: int
) -> dict[str, float]:
    """fANOVA importance of each searched key for ``metric`` over the complete trials.

    Empty when fewer than two complete trials differ in ``metric`` (nothing to explain).
    """
    finished = [row for row in rows if row["status"] == "complete" and _finite(row.get(metric))]
    if len({row[metric] for row in finished}) < 2:
        return {}
    distributions = space.distributions()
    study = optuna.create_study(direction="maximize")
    study.add_trials(
        optuna.trial.create_trial(
            params={key: row[key] for key in space.keys},
            distributions=distributions,
            value=row[metric],
        )
        for row in finished
    )
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    return optuna.importance.get_param_importances(study, evaluator=evaluator)


def plot_importances(importances: dict[str, float], metric: str, path: str) -> None:
    names = list(importances)[::-1]
    figure, axes = plt.subplots(figsize=(7, 0.4 * len(names) + 1.5))
    axes.barh(names, [importances[name] for name in names], color="tab:blue")
    axes.set_xlabel(f"importance for {metric} (fANOVA, sums to 1)")
    axes.set_title("Parameter importances")
    _save(figure, path)


def _save(figure: plt.Figure, path: str) -> None:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    storage.write_bytes(path, buffer.getvalue())


def is_metric(key: str) -> bool:
    return key.startswith(("val_", "stage1_val_"))


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
