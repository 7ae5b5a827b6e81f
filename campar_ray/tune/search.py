"""``run_search``: Ray Tune + Optuna (TPE) over stage 2 or the whole two-stage pipeline.

The searcher is Optuna's seeded TPE sampler (``OptunaSearch``) behind a ``ConcurrencyLimiter``
sized from the cluster's free resources; scope ``full`` adds ASHA, which stops trials whose
stage-1 validation metric lags after an epoch. The first trial is the base config itself
when it lies in the space, so the best found is never worse than where the search started.

Everything lands in ``<run_dir>/tune/``: ``trials.json`` (campar's record of every trial,
rewritten as trials start and end: the only trial state ``--resume`` reads, see
:mod:`.record`), ``search.json`` (what was searched), Tune's own experiment folders
(``search-<random>/``, one per session, never read back: Ray's pickles there would run
whatever a run directory's writer put in them), one folder per trial (``trials/<trial_id>/``),
``trials.parquet``/``.csv``, ``best.yaml`` (a full config, accepted by ``campar
train --config`` and ``campar fit-cfar --config``), ``history.png``, ``importances.png`` and
``summary.json``. Only validation data ranks trials and chooses thresholds; the test split is
scored once, by fitting the best configuration's stage 2 with ``fit_cfar`` when the search
is complete (into ``<run_dir>/cfar/`` for scope ``cfar``, the best trial's ``cfar/`` for
scope ``full``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
import ray
import ray.tune
import yaml
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from campar_ray import storage
from campar_ray.cfar.fit import fit_cfar
from campar_ray.config import Config, ConfigError
from campar_ray.decision import CFAR_PROTOCOL, CFAR_SOURCE, SOURCE_LABELS, figure_line
from campar_ray.progress import Progress
from campar_ray.run.layout import RunDir, SearchDir
from campar_ray.runtime import init_ray, is_quiet
from campar_ray.tracking import (
    ensure_experiment,
    resolve_tracking,
    retire_trials,
    search_experiment,
)
from campar_ray.train.stage1 import resolve_config
from campar_ray.tune import report
from campar_ray.tune.full_trial import FullTrial
from campar_ray.tune.record import Replay, read_json_object, read_record, write_record
from campar_ray.tune.space import SCOPES, SearchSpace, load_search_space
from campar_ray.tune.trials import (
    TrialContext,
    cfar_trial,
    max_concurrent_trials,
    trial_bundles,
    trial_footprint,
)

METRICS = ("val_mA", "val_accuracy", "val_precision", "val_recall", "val_f1")
EXPERIMENT = "search"
ASHA_REDUCTION = 3
"""ASHA keeps the top third at each rung (grace period: one epoch)."""


@dataclass(frozen=True)
class SearchResult:
    """Where a search left its outputs and what it found."""

    tune_dir: str
    scope: str
    metric: str
    num_samples: int
    complete: bool
    """False when the search was interrupted; ``--resume`` continues it."""
    counts: dict[str, int]
    """Trials by status: complete, stopped (by ASHA), error, unfinished."""
    table: str
    """``trials.parquet`` (``trials.csv`` lies next to it)."""
    seconds: float
    """Wall time of this call (a resumed search counts only its own part)."""
    best_trial: str | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_val: dict[str, float] = field(default_factory=dict)
    best_config: str | None = None
    """``best.yaml``: the base config with the best values (run.dir set to where to fit)."""
    test: dict[str, float] = field(default_factory=dict)
    """The best configuration's stage 1 + CFAR on test (scored once, after the search, at its
    ``val`` threshold: ``campar evaluate --threshold val`` prints the same figures)."""
    refit: str | None = None
    """The stage-2 folder the best configuration was refitted into (``<run_dir>/cfar`` for
    scope ``cfar``): the model evaluate, bundle and predict then use."""
    importances: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """A few lines for a terminal: trial counts, the best trial, its single test score."""
        counts = ", ".join(f"{n} {status}" for status, n in self.counts.items() if n)
        lines = [f"[tune] {counts} of {self.num_samples} trials in {self.seconds:.0f} s"]
        if not self.complete:
            lines.append("[tune] search interrupted; run the same command with --resume")
        elif self.best_trial is None:
            lines.append("[tune] no trial completed the pipeline; see the table's error column")
        else:
            metric, label = self.metric.removeprefix("val_"), SOURCE_LABELS[CFAR_SOURCE]
            val = self.best_val[self.metric]
            test = self.test[f"test_{metric}"]
            lines += [
                f"[tune] best trial {self.best_trial}: "
                + figure_line("val", metric, label, val, CFAR_PROTOCOL),
                f"[tune] best config {self.best_config}, refitted into {self.refit}, test "
                "scored once: " + figure_line("test", metric, label, test, CFAR_PROTOCOL),
            ]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Plan:
    """One search's fixed settings, shared by the steps below."""

    context: TrialContext
    scope: str
    metric: str
    num_samples: int
    seed: int
    tune_dir: str


def run_search(
    base: Config,
    *,
    run_dir: str,
    scope: str,
    num_samples: int,
    search_space: str | None = None,
    metric: str = "val_mA",
    resume: bool = False,
    seed: int | None = None,
    max_concurrent: int | None = None,
    callbacks: Sequence[ray.tune.Callback] = (),
    progress: bool = True,
) -> SearchResult:
    """Search ``scope`` (``cfar`` or ``full``) with ``num_samples`` trials, in ``run_dir``.

    Scope ``cfar`` needs a finished stage-1 run in ``run_dir`` (its logits); scope ``full``
    needs ``base.data.manifest``. ``resume`` continues an interrupted search with the same
    arguments: finished trials are replayed from ``trials.json`` into a fresh searcher and
    only the rest of the budget runs (unfinished trials again from their start, with the same
    values). ``seed`` seeds the TPE sampler (``base.seed`` when None). At most
    ``max_concurrent`` trials run at once (default: as many as the free resources hold).
    ``callbacks`` are Tune callbacks (e.g. experiment tracking) of this call only: a resume
    passes its own.
    """
    started = time.perf_counter()
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    if scope not in SCOPES:
        raise ConfigError(f"unknown scope {scope!r}; valid: {', '.join(SCOPES)}")
    if num_samples < 1:
        raise ConfigError(f"num_samples must be at least 1, got {num_samples}")
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigError(f"max_concurrent must be at least 1, got {max_concurrent}")
    run_dir = run_dir if storage.is_uri(run_dir) else os.path.abspath(run_dir)
    tracking = resolve_tracking(base.tracking)
    base = base.override({"run.dir": run_dir, "tracking": dataclasses.asdict(tracking)})
    base = resolve_config(base) if scope == "full" else base
    seed = base.seed if seed is None else seed
    if scope == "cfar":
        _require_logits(run_dir)
    space = load_search_space(search_space, base, scope)
    tune_dir = RunDir(run_dir).tune
    settings = {
        "scope": scope,
        "metric": metric,
        "num_samples": num_samples,
        "seed": seed,
        "search_space": search_space,
        "params": space.keys,
        "base": base.to_dict(),
    }
    _record_settings(tune_dir, settings, resume)
    if not resume:  # an earlier search here was deleted: its trials' runs are not continued
        retire_trials(tracking, run_dir, tune_dir)
    trials_dir = SearchDir(tune_dir).trials
    replay = Replay([], [])
    if resume:
        replay = read_record(
            tune_dir, space, metric=metric, num_samples=num_samples, trials_dir=trials_dir
        )
    if progress and space.skipped:
        print(f"[tune] scope {scope} leaves out stage-1 keys: {', '.join(space.skipped)}")

    init_ray()
    experiment = search_experiment(tracking, run_dir)
    ensure_experiment(tracking, experiment)
    context = TrialContext(base, space, run_dir, trials_dir, experiment)
    plan = _Plan(context, scope, metric, num_samples, seed, tune_dir)
    rows = list(replay.finished)
    remaining = num_samples - len(rows)
    if remaining > 0:
        recorder = _RecordTrials(tune_dir, space, rows)
        callbacks = [*callbacks, recorder]
        if progress and is_quiet():  # else Tune's own status tables show the progress
            callbacks.append(_TrialLines(num_samples, len(rows), metric))
        _tuner(plan, replay, max_concurrent, callbacks, progress).fit()
        # The rows by Tune's own trial objects, not by the result grid: a trial that had not
        # reported when the search stopped carries its reused actor's previous trial_id there.
        rows = recorder.rows
    write_record(tune_dir, rows, space)
    rows = report.in_report_order(rows)
    return _finish(rows, plan, started, progress)


def _tuner(
    plan: _Plan,
    replay: Replay,
    max_concurrent: int | None,
    callbacks: Sequence[ray.tune.Callback],
    progress: bool,
) -> ray.tune.Tuner:
    """A fresh Tuner for the trials still to run; a resume replays the finished ones first.

    Each session gets an experiment folder of its own, under a name nobody can guess
    beforehand, so Tune never meets files planted in the run directory; nothing reads
    those folders back.
    """
    context, scope, metric = plan.context, plan.scope, plan.metric
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(cfar_trial if scope == "cfar" else FullTrial, context=context),
        ray.tune.PlacementGroupFactory(trial_bundles(context.base)),
    )
    remaining = plan.num_samples - len(replay.finished)
    footprint = trial_footprint(context.base, scope)
    fits = max_concurrent_trials(ray.available_resources(), footprint)
    concurrent = min(remaining, fits, max_concurrent or fits)
    if progress:
        resumed = f" (resumed: {len(replay.finished)} finished)" if replay.finished else ""
        print(
            f"[tune] {remaining} trials{resumed}, scope {scope}, up to {concurrent} at once "
            f"({footprint['CPU']:g} CPU each), ranked by {metric} on validation data"
        )
    searcher = _searcher(plan, replay)
    scheduler = None
    if scope == "full":
        # One report per epoch, then one for the two-stage result: max_t leaves that last
        # report to the trial instead of stopping it at the end of stage 1.
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=context.base.train.epochs + 1,
            grace_period=1,
            reduction_factor=ASHA_REDUCTION,
        )
    return ray.tune.Tuner(
        trainable,
        tune_config=ray.tune.TuneConfig(
            metric=metric,
            mode="max",
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrent),
            scheduler=scheduler,
            num_samples=remaining,
            # cfar trials are short: reusing their processes saves starting one per trial.
            reuse_actors=scope == "cfar",
        ),
        run_config=ray.tune.RunConfig(
            name=f"{EXPERIMENT}-{secrets.token_hex(4)}",
            storage_path=plan.tune_dir,
            # Trials keep their own state: stage 1 checkpoints into the trial's run directory.
            checkpoint_config=ray.tune.CheckpointConfig(checkpoint_at_end=False),
            callbacks=list(callbacks),
            verbose=1 if progress and not is_quiet() else 0,
        ),
    )


def _searcher(plan: _Plan, replay: Replay) -> OptunaSearch:
    """Seeded TPE; on resume, a fresh study that holds the finished trials (replayed from
    the record) and reruns the unfinished ones first, with their values.

    The sampler's seed moves on by the number of recorded trials, so a resume does not
    draw the first session's random start-up points again.
    """
    space = plan.context.space
    recorded = len(replay.finished) + len(replay.rerun)
    if recorded == 0:
        start = space.start_point(plan.context.base)
        points = [start] if start else []
    else:
        points = replay.rerun[: plan.num_samples - len(replay.finished)]
    searcher = OptunaSearch(
        space=space.distributions(),
        metric=plan.metric,
        mode="max",
        sampler=optuna.samplers.TPESampler(seed=plan.seed + recorded),
        points_to_evaluate=points or None,
    )
    for row in replay.finished:
        value = row.get(plan.metric)
        params = {key: row[key] for key in space.keys}
        if row["status"] == "complete":
            searcher.add_evaluated_point(params, value)
        elif row["status"] == "stopped":
            last = [value] if value is not None else None
            searcher.add_evaluated_point(params, None, pruned=True, intermediate_values=last)
        else:
            searcher.add_evaluated_point(params, None, error=True)
    return searcher


class _RecordTrials(ray.tune.Callback):
    """Keeps ``trials.json`` current: rewritten when a trial starts, ends or fails; every
    started trial's row (its last result included) is :attr:`rows` when the search ends.

    Runs on the driver. ``earlier`` holds the rows of trials finished before a resume.
    """

    def __init__(self, tune_dir: str, space: SearchSpace, earlier: list[dict[str, Any]]):
        self._tune_dir, self._space = tune_dir, space
        self._rows = {row["trial_id"]: row for row in earlier}

    @property
    def rows(self) -> list[dict[str, Any]]:
        return list(self._rows.values())

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, write=False)  # an interrupted trial keeps its last epoch's row

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, _TrialError(trial.get_error() or "the trial failed"))

    def _update(self, trial: Any, error: BaseException | None = None, write: bool = True) -> None:
        row = report.trial_row(
            trial.trial_id, trial.config or {}, _own_result(trial), error, self._space
        )
        self._rows[trial.trial_id] = row
        if write:
            write_record(self._tune_dir, self.rows, self._space)


def _own_result(trial: Any) -> dict[str, Any]:
    """``trial.last_result`` when it is the trial's own. Before a trial's first report Tune
    fills it from the actor's defaults, which on a reused actor name the previous trial."""
    result = trial.last_result or {}
    return result if result.get("trial_id", trial.trial_id) == trial.trial_id else {}


class _TrialLines(ray.tune.Callback):
    """One line per finished trial and the search's progress lines, or a progress bar when
    stdout is a terminal (driver)."""

    def __init__(self, total: int, done: int, metric: str):
        self._total, self._done, self._metric = total, done, metric
        self._best: float | None = None
        self._bar = sys.stdout.isatty()
        self._progress: Progress | None = None  # started in setup: Tune pickles callbacks

    def setup(self, **info: Any) -> None:
        self._progress = Progress(
            "[tune]", self._total, "trials", initial=self._done, stream=sys.stdout, bar=self._bar
        ).start()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_progress": None}  # a thread and a stream do not pickle

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finished(trial, (trial.last_result or {}).get(self._metric))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finished(trial, None)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._progress is not None:
            self._progress.close()

    def _finished(self, trial: Any, value: float | None) -> None:
        if self._progress is None:
            self.setup()
        assert self._progress is not None
        self._progress.update()
        if value is not None and (self._best is None or value > self._best):
            self._best = value
        best = "" if self._best is None else f"best {self._metric} {100 * self._best:.2f}"
        self._progress.note(best)
        if self._bar:
            return
        result = "failed" if value is None else f"{self._metric} {100 * value:.2f}"
        print(
            f"[tune] trial {self._progress.done}/{self._progress.total} {trial.trial_id}: "
            f"{result}" + (f" ({best})" if best else ""),
            flush=True,
        )


class _TrialError(Exception):
    """A failed trial's error text, as Tune saved it (the table's error column)."""


def _finish(
    rows: list[dict[str, Any]], plan: _Plan, started: float, progress: bool
) -> SearchResult:
    """Table and plots always; best config and its single test score once all trials ran."""
    metric, tune_dir = plan.metric, plan.tune_dir
    counts = {status: sum(row["status"] == status for row in rows) for status in report.STATUSES}
    complete = counts["unfinished"] == 0 and len(rows) == plan.num_samples
    table = report.write_table(rows, tune_dir)["parquet"]
    report.plot_history(rows, metric, SearchDir(tune_dir).plot("history"))
    importances = report.param_importances(rows, plan.context.space, metric, plan.seed)
    if importances:
        report.plot_importances(importances, metric, SearchDir(tune_dir).plot("importances"))
    result = SearchResult(
        tune_dir=tune_dir,
        scope=plan.scope,
        metric=metric,
        num_samples=plan.num_samples,
        complete=complete,
        counts=counts,
        table=table,
        seconds=time.perf_counter() - started,
        importances=importances,
    )
    best = report.best_row(rows, metric) if complete else None
    if best is not None:
        result = _score_best(result, best, plan)
    storage.write_json(SearchDir(tune_dir).summary, _summary(result))
    if progress:
        print(result.summary())
    return result


def _score_best(result: SearchResult, best: dict[str, Any], plan: _Plan) -> SearchResult:
    """Save the best config, fit its stage 2 with ``fit_cfar`` and score test (once).

    Scope ``cfar`` fits into the run's own ``cfar/`` (replacing an earlier stage 2 there, as
    ``campar fit-cfar --config best.yaml`` would); scope ``full`` into the best trial's.
    """
    context = plan.context
    sampled = {key: best[key] for key in context.space.keys}
    config = context.space.apply(context.base, sampled)
    fit_dir = context.run_dir if plan.scope == "cfar" else best["trial_dir"]
    config = config.override({"run.dir": fit_dir})
    best_config = RunDir(context.run_dir).best_config
    storage.write_bytes(best_config, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
    fitted = fit_cfar(fit_dir, config.cfar, seed=config.seed, tracking=config.tracking).metrics
    selected = fitted["selected"]
    return dataclasses.replace(
        result,
        best_trial=best["trial_id"],
        best_params={p.key: p.decode(best[p.key]) for p in context.space.params},
        best_val={key: value for key, value in best.items() if report.is_metric(key)},
        best_config=best_config,
        test={f"test_{key}": value for key, value in fitted["test"][selected].items()},
        refit=RunDir(fit_dir).cfar,
    )


def _require_logits(run_dir: str) -> None:
    for split in ("train", "val"):
        path = RunDir(run_dir).logits(split)
        if not storage.exists(path):
            raise FileNotFoundError(
                f"scope 'cfar' reuses a finished stage-1 run, but {path} does not exist; "
                "train stage 1 into this run directory first (campar train), "
                "or search with scope 'full'"
            )


def _record_settings(tune_dir: str, settings: dict[str, Any], resume: bool) -> None:
    """Write what this search is; a resume must repeat it exactly (same command + --resume)."""
    path = SearchDir(tune_dir).settings
    if not resume:
        if storage.exists(path):
            raise FileExistsError(
                f"a search already exists in {tune_dir}; add --resume to continue it, "
                "or delete that folder to start a new one"
            )
        storage.write_json(path, settings)
        return
    if not storage.exists(path):
        raise FileNotFoundError(f"nothing to resume: no search in {tune_dir}")
    recorded = read_json_object(path, "campar's search settings")
    changed = [key for key in settings if recorded.get(key) != _jsonable(settings[key])]
    if changed:
        raise ConfigError(
            f"--resume must repeat the original search; these differ from {path}: "
            + ", ".join(f"{key} (was {recorded.get(key)!r})" for key in changed)
        )


def _summary(result: SearchResult) -> dict[str, Any]:
    summary = dataclasses.asdict(result)
    summary["test_scored"] = "once, for the best configuration" if result.test else "not yet"
    return summary


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))
