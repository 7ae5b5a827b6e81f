"""Stage 2 of a run: ``campar fit-cfar`` on a run's stage-1 logits, with its metrics.

Reads a run's train, val and test logits, fits stage 2 with
:func:`campar_ray.cfar.model.fit_model` for both lookups (fc2 takes seconds) and saves the
configured one with :func:`~campar_ray.cfar.model.save_model` into the run's ``cfar/``
(``factors.npz``, ``dictionary.npz``, ``fc2.npz``, ``cfar.json``; loaded by
:func:`load_cfar`), next to:

- ``metrics.json``: stage 1 alone (shared and specific logits) next to stage 1 + CFAR with
  either lookup, on val and test, over the evaluated attributes, under the threshold
  protocols ``val`` and ``0.5``;
- ``probabilities.npz``: the probabilities every figure of ``metrics.json`` came from.

Every figure is scored by :func:`campar_ray.decision.score_sources`, as ``campar evaluate``
scores it, so the saved lookup's figures are the ones evaluate prints for stage 1 + CFAR under
the same protocol. Every ``val`` threshold is chosen on validation data only, one per column,
by mA.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

from campar_ray import storage
from campar_ray.artifacts import save_arrays
from campar_ray.cfar.als import AlsResult
from campar_ray.cfar.model import (
    MODEL_FILE,
    CfarModel,
    CfarPredictor,
    Progress,
    check_cfar_config,
    check_same_attributes,
    fit_model,
    load_predictor,
    save_model,
)
from campar_ray.cfar.solver import choose_solver
from campar_ray.config import LOOKUPS, CfarConfig, TrackingConfig
from campar_ray.decision import (
    CFAR_FROM,
    CFAR_PROTOCOL,
    CFAR_SOURCE,
    FIXED,
    SOURCE_LABELS,
    SourceFigures,
    eval_columns,
    figure_table,
    fit_run_calibration,
    score_sources,
)
from campar_ray.metrics import summary
from campar_ray.progress import Progress as PhaseProgress
from campar_ray.run.layout import RunDir
from campar_ray.run.logits import SplitLogits, read_split_logits
from campar_ray.tracking import RUN_DIR_TAG, Tracker, markdown_table, open_tracker, resolve_tracking

STAGE = "cfar"
"""The stage's name in tracking: its TensorBoard folder, its MLflow run name and tag."""
SPLITS = ("train", "val", "test")
REPORTED = ("val", "test")

PROBABILITIES_FILE = "probabilities.npz"
"""``<column>.<split>``: the probabilities every figure of ``metrics.json`` was computed from."""


@dataclass(frozen=True)
class CfarResult:
    """What :func:`fit_cfar` wrote (``output_dir``) and the in-memory results behind it."""

    output_dir: str
    model: CfarModel
    metrics: dict[str, Any]

    @property
    def als(self) -> AlsResult:
        return self.model.als

    @property
    def predictor(self) -> CfarPredictor:
        """The configured lookup's predictor, the one saved."""
        return self.model.predictor


def fit_cfar(
    run_dir: str,
    cfg: CfarConfig,
    seed: int = 0,
    progress: Progress | None = None,
    tracking: TrackingConfig | None = None,
    address: str | None = None,
) -> CfarResult:
    """Fit stage 2 on a run's stage-1 logits and write its artefacts (see module doc).

    ``cfg.solver="auto"`` becomes the solver :func:`~campar_ray.cfar.solver.choose_solver`
    picks for this run's r and the cluster ``address`` (else ``RAY_ADDRESS``), said in one
    line on stderr and saved as the solver used. The fit is tracked as ``tracking`` says
    (default: TensorBoard files in ``<run_dir>/tensorboard/cfar``): its config, the ALS
    objective per iteration, the val and test metrics of every column and a short report.
    Each fit is a new MLflow run.
    """
    check_cfar_config(cfg)
    run = RunDir(run_dir)
    splits = {name: read_split_logits(run.logits(name)) for name in SPLITS}
    check_same_attributes(splits)
    choice = choose_solver(cfg.solver, splits["train"].labels.size, address)
    print(choice.line(), file=sys.stderr, flush=True)
    cfg = dataclasses.replace(cfg, solver=choice.solver)
    tracker = _open_tracker(run_dir, cfg, seed, resolve_tracking(tracking or TrackingConfig()))
    with PhaseProgress("[cfar] ALS, dictionary, fc2", _steps(cfg), unit="steps") as steps:
        model = fit_model(
            splits["train"],
            splits["val"],
            cfg,
            seed=seed,
            compare_lookups=True,
            train_path=run.logits("train"),
            progress=_counted(_tracked(progress or (lambda stage, values: None), tracker), steps),
        )
    figures = _figures(splits, model.predictors)
    metrics = _metrics(splits, figures, selected=cfg.lookup)

    output_dir = run.cfar
    save_model(output_dir, model)
    fit_run_calibration(run_dir, CFAR_FROM, model.predictor)  # the final prediction changed
    save_arrays(  # the evidence behind metrics.json, so any protocol can be re-scored later
        storage.join(output_dir, PROBABILITIES_FILE),
        **{
            f"{column}.{split}": scored.probs
            for split in REPORTED
            for column, scored in figures[split, CFAR_PROTOCOL].items()
        },
    )
    storage.write_json(run.cfar_metrics, metrics)
    tracker.log_final(
        {
            f"{split}/{column}/{name}": value
            for split in REPORTED
            for column, values in metrics[split].items()
            for name, value in values.items()
        }
    )
    tracker.log_report(cfar_report(metrics))
    tracker.close()
    return CfarResult(output_dir, model, metrics)


def load_cfar(run_dir: str) -> CfarPredictor:
    """The saved stage-2 predictor of a run (the configured lookup, fc2, threshold)."""
    return load_predictor(RunDir(run_dir).cfar)


def load_cfar_if_fitted(path: str) -> CfarPredictor | None:
    """The stage-2 predictor of a run or a bundle (both keep it in ``cfar/``), or None when
    ``fit-cfar`` has not run."""
    if storage.exists(storage.join(RunDir(path).cfar, MODEL_FILE)):
        return load_cfar(path)
    return None


def cfar_figures_text(metrics: dict[str, Any]) -> str:
    """What ``campar fit-cfar`` prints: each column's figures on val (``val`` thresholds) and
    on test (``0.5``, then ``val``), named as ``campar evaluate`` names them; the saved lookup
    is the stage 1 + CFAR that evaluate, predict and tune's refit report."""
    tables = []
    for split in REPORTED:
        protocols = (CFAR_PROTOCOL,) if split == "val" else (FIXED.protocol, CFAR_PROTOCOL)
        rows = [
            (_label(column, metrics["selected"]), protocol, values)
            for protocol in protocols
            for column, values in metrics[_key(split, protocol)].items()
        ]
        tables.append(figure_table(split, rows))
    return "\n".join(tables)


def cfar_report(metrics: dict[str, Any]) -> str:
    """Markdown: stage 1 alone and stage 1 + CFAR, on val and test (thresholds from val)."""
    tables = "\n\n".join(f"{split}\n\n{markdown_table(metrics[split])}" for split in REPORTED)
    return f"**CFAR** (saved: {metrics['selected']}; thresholds chosen on val)\n\n{tables}\n"


def _open_tracker(run_dir: str, cfg: CfarConfig, seed: int, tracking: TrackingConfig) -> Tracker:
    # Each fit gets its own event folder: a refit restarts at ALS iteration 1, which in the
    # same folder TensorBoard would read as out-of-order steps and drop.
    fit = time.strftime("fit-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    tracker = open_tracker(
        tracking,
        log_dir=storage.join(RunDir(run_dir).tensorboard(STAGE), fit),
        experiment=tracking.experiment,
        run_name=f"{os.path.basename(run_dir.rstrip('/'))}/{STAGE}",
        tags={RUN_DIR_TAG: run_dir, "campar.stage": STAGE},
    )
    tracker.log_config({"cfar": dataclasses.asdict(cfg), "seed": seed})
    return tracker


def _tracked(progress: Progress, tracker: Tracker) -> Progress:
    """``progress`` that also sends each ALS iteration's objective to the tracker."""

    def report(stage: str, values: dict[str, Any]) -> None:
        if stage == "als":
            als = {"als_objective": values["objective"]}
            if math.isfinite(values["relative_change"]):  # inf on the first iteration
                als["als_relative_change"] = values["relative_change"]
            tracker.log_metrics(als, step=int(values["iteration"]))
        progress(stage, values)

    return report


def _steps(cfg: CfarConfig) -> int:
    """The steps of a fit as :func:`_counted` counts them: the ALS iterations (at most), the
    dictionary, one fc2 per lookup."""
    return cfg.iterations + 1 + len(LOOKUPS)


def _counted(progress: Progress, steps: PhaseProgress) -> Progress:
    """``progress`` that also advances ``steps`` (the fit's progress lines)."""

    def report(stage: str, values: dict[str, Any]) -> None:
        if stage == "als":
            steps.advance_to(int(values["iteration"]))
        elif stage == "dictionary":
            steps.advance_to(steps.total - len(LOOKUPS))  # ALS may have stopped early
        else:
            steps.update()
        progress(stage, values)

    return report


def _figures(
    splits: dict[str, SplitLogits], predictors: dict[str, CfarPredictor]
) -> dict[tuple[str, str], dict[str, SourceFigures]]:
    """(split, protocol) -> column -> figures, on the reported splits under ``val`` and
    ``0.5``: stage 1's shared and specific logits, then stage 1 + CFAR for every lookup."""
    figures = {}
    for split in REPORTED:
        for protocol in (CFAR_PROTOCOL, FIXED.protocol):
            stage1, refined = {}, {}
            for lookup, predictor in predictors.items():
                scored = score_sources(splits[split], splits["val"], CFAR_FROM, predictor, protocol)
                refined[_column(lookup)] = scored.pop(CFAR_SOURCE)
                stage1.update(scored)  # stage 1's sources: the same whichever lookup
            figures[split, protocol] = {**stage1, **refined}
    return figures


def _metrics(
    splits: dict[str, SplitLogits],
    figures: dict[tuple[str, str], dict[str, SourceFigures]],
    selected: str,
) -> dict[str, Any]:
    """Each column at its own validation-chosen threshold and at 0.5, on val and test."""
    chosen = figures["val", CFAR_PROTOCOL]
    result: dict[str, Any] = {
        "selected": _column(selected),
        "eval_attributes": [splits["train"].attributes[i] for i in eval_columns(splits["train"])],
        "thresholds": {column: float(scored.threshold) for column, scored in chosen.items()},
    }
    for split in REPORTED:
        for protocol in (CFAR_PROTOCOL, FIXED.protocol):
            result[_key(split, protocol)] = {
                column: summary(scored.metrics)
                for column, scored in figures[split, protocol].items()
            }
    result["test_attr_mA"] = {
        column: scored.metrics["attr_accuracy"].tolist()
        for column, scored in figures["test", CFAR_PROTOCOL].items()
    }
    return result


def _key(split: str, protocol: str) -> str:
    """``metrics.json``'s key of a split's figures under a protocol: ``test``, ``test_at_0.5``."""
    return split if protocol == CFAR_PROTOCOL else f"{split}_at_{protocol}"


def _label(column: str, selected: str) -> str:
    """A column's name in printed figures: the source's, with the lookup for stage 2's."""
    if column in SOURCE_LABELS:
        return SOURCE_LABELS[column]
    lookup = column.removeprefix("cfar_").replace("_", "-")
    saved = " (saved)" if column == selected else ""
    return f"{SOURCE_LABELS[CFAR_SOURCE]}, {lookup} lookup{saved}"


def _column(lookup: str) -> str:
    return "cfar_" + lookup.replace("-", "_")
