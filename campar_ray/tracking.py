"""Experiment tracking: a run's config, metrics, result and report, to TensorBoard and MLflow.

One :class:`Tracker` per run fans out to TensorBoard event files (by default, in the run
directory) and to MLflow (when ``tracking.mlflow_uri`` is set). The code that does the work
logs, not a callback: Ray Train V2 refuses Tune's logger callbacks, so the stage-1 worker
loop logs on rank 0, a CFAR fit in its own process and a search trial from its trial
function.

Resuming. A run keyed by a name (its run directory) is found again in MLflow by the tag
``campar.run_key``, a hash of that name: a stage-1 run restarted after a failure, or re-run
in the same directory, continues the same MLflow run, and a metric already stored for a step
is not sent again; ``campar train --fresh`` starts a new one (:func:`retire_runs`), and a
new search starts new trial runs (:func:`retire_trials`).
TensorBoard cannot look back into its files, so every (re)start writes a new event file that
begins by purging all earlier steps (TensorBoard's restart marker), and the caller re-logs
what the run holds (stage 1: its checkpointed history): a restart never leaves a duplicated
or orphaned point.

Credentials come only from the environment of the process that logs (``MLFLOW_TRACKING_TOKEN``,
``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``, read by MLflow itself); a URI that carries them is
refused. They are not copied into a Ray ``runtime_env`` either, which Ray Train shows on its
dashboard: a local Ray inherits them from the shell that starts it, a cluster's nodes need them
in their own environment.

Only the tensorboard package is needed for event files (this module does not import torch, so
search trials stay light); MLflow is the optional ``tracking`` extra (``mlflow-skinny``: its
``sqlite:`` store uses SQLAlchemy and Alembic, which Optuna already installs).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlparse

from campar_ray import storage
from campar_ray.config import ConfigError, TrackingConfig

logger = logging.getLogger(__name__)

KEY_TAG = "campar.run_key"
SUPERSEDED_TAG = "campar.superseded_run_key"
"""Where :func:`retire_runs` keeps the key of a run that ``--fresh`` started over."""
RUN_DIR_TAG = "campar.run_dir"
NOTE_TAG = "mlflow.note.content"
"""MLflow shows this tag as the run's description (markdown): where the report goes, so that
tracking needs no artifact store."""


def run_key(name: str) -> str:
    """The id a run is found again by: a hash of its name (safe in an MLflow filter)."""
    return hashlib.sha256(name.encode()).hexdigest()[:32]


def resolve_tracking(cfg: TrackingConfig) -> TrackingConfig:
    """Refuse credentials in the URI; make a local store's path absolute.

    Ray Train workers and Tune trials run in other working directories than the command,
    so ``sqlite:///mlflow.db`` must name one file for all of them.
    """
    uri = cfg.mlflow_uri.strip()
    if not uri:
        return cfg
    if storage.has_credentials(uri):
        raise ConfigError(
            "tracking.mlflow_uri must not carry credentials; set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment instead"
        )
    parsed = urlparse(uri)
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///")
        uri = uri if path.startswith("/") else f"sqlite:///{os.path.abspath(path)}"
    elif parsed.scheme == "file":
        uri = f"file://{os.path.abspath(parsed.path)}"
    elif not parsed.scheme:
        uri = f"file://{os.path.abspath(uri)}"
    if not cfg.experiment:
        raise ConfigError("tracking.experiment must not be empty")
    return TrackingConfig(tensorboard=cfg.tensorboard, mlflow_uri=uri, experiment=cfg.experiment)


def search_experiment(cfg: TrackingConfig, run_dir: str) -> str:
    """The MLflow experiment holding one search's trials (one MLflow run per trial)."""
    return f"{cfg.experiment}-search-{os.path.basename(run_dir.rstrip('/'))}"


def ensure_experiment(cfg: TrackingConfig, experiment: str) -> None:
    """Create the experiment (and a new ``sqlite:`` store's tables) before workers log to it.

    Called by drivers: a bad URI or missing credentials fail the command at once, and
    concurrent trials do not race to create the same experiment.
    """
    if cfg.mlflow_uri:
        _experiment_id(_client(cfg.mlflow_uri), experiment)


def retire_runs(cfg: TrackingConfig, run_dir: str) -> list[str]:
    """For ``campar train --fresh``: the MLflow runs of ``run_dir`` stop being continued.

    The stage-1 run keyed by ``run_dir`` and the search trials keyed by folders under it lose
    their :data:`KEY_TAG` (kept as :data:`SUPERSEDED_TAG`), so the run started in their place
    opens new MLflow runs; the old ones stay in MLflow as they ended (one still RUNNING, left
    by an interrupted run, is marked KILLED). Returns the retired run ids.
    """
    if not cfg.mlflow_uri:
        return []
    client = _client(cfg.mlflow_uri)
    runs = _runs(client, cfg.experiment, f"tags.`{KEY_TAG}` = '{run_key(run_dir)}'")
    return _retire(client, runs + _trial_runs(client, cfg, run_dir, run_dir))


def retire_trials(cfg: TrackingConfig, run_dir: str, folder: str) -> list[str]:
    """For a new search in ``run_dir``: the trial runs keyed by folders under ``folder`` (the
    search's own folder, where an earlier search that was deleted to start over left them)
    are retired as :func:`retire_runs` retires them; the stage-1 run searched from is not.
    """
    if not cfg.mlflow_uri:
        return []
    client = _client(cfg.mlflow_uri)
    return _retire(client, _trial_runs(client, cfg, run_dir, folder))


def _trial_runs(client: Any, cfg: TrackingConfig, run_dir: str, folder: str) -> list[Any]:
    """The keyed runs of ``run_dir``'s search experiment whose folder lies under ``folder``
    (the experiment is named after ``run_dir``'s last part, which other run dirs may share)."""
    inside = folder.rstrip("/") + "/"
    trials = _runs(client, search_experiment(cfg, run_dir), f"tags.`{KEY_TAG}` != ''")
    return [run for run in trials if run.data.tags.get(RUN_DIR_TAG, "").startswith(inside)]


def _retire(client: Any, runs: list[Any]) -> list[str]:
    for run in runs:
        client.set_tag(run.info.run_id, SUPERSEDED_TAG, run.data.tags[KEY_TAG])
        client.delete_tag(run.info.run_id, KEY_TAG)
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="KILLED")
    return [run.info.run_id for run in runs]


def open_tracker(
    cfg: TrackingConfig,
    *,
    log_dir: str,
    experiment: str,
    run_name: str,
    key: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Tracker:
    """The tracker of one run: event files in ``log_dir``, an MLflow run in ``experiment``.

    With ``key`` the MLflow run tagged with it is continued when there is one; without, every
    call starts a new MLflow run.
    """
    events = _EventWriter(log_dir) if cfg.tensorboard else None
    mlflow = None
    if cfg.mlflow_uri:
        mlflow = _MlflowRun(cfg.mlflow_uri, experiment, run_name, key, dict(tags or {}))
    return Tracker(events, mlflow)


class Tracker:
    """Sends one run's config, metrics and report to every sink that is on."""

    def __init__(self, events: _EventWriter | None, mlflow: _MlflowRun | None) -> None:
        self._events = events
        self._mlflow = mlflow

    @property
    def mlflow_run_id(self) -> str | None:
        return self._mlflow.run_id if self._mlflow else None

    def log_config(self, config: Mapping[str, Any]) -> None:
        """A nested config: MLflow params under dotted keys, TensorBoard text as YAML-ish lines."""
        flat = flatten(config)
        if self._mlflow:
            self._mlflow.log_params(flat)
        if self._events:
            self._events.text("config", "\n".join(f"    {k}: {v}" for k, v in flat.items()))

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """The numeric values of ``metrics`` at ``step`` (others, such as paths, are left out)."""
        values = numeric(metrics)
        if self._mlflow:
            self._mlflow.log_metrics(values, step)
        if self._events:
            self._events.scalars(values, step)

    def log_final(self, metrics: Mapping[str, Any], prefix: str = "final") -> None:
        """The run's result as ``<prefix>/<name>`` at step 0, apart from the per-step curves.

        A search trial's result uses its own prefix: in scope ``full`` it shares the MLflow
        run with its stage-1 run, whose ``final/`` is stage 1's best epoch.
        """
        self.log_metrics({f"{prefix}/{key}": value for key, value in metrics.items()}, step=0)

    def log_report(self, markdown: str) -> None:
        """A short markdown report: the MLflow run's description, a TensorBoard text."""
        if self._mlflow:
            self._mlflow.set_note(markdown)
        if self._events:
            self._events.text("report", markdown)

    def close(self, finished: bool = True) -> None:
        """Flush; an MLflow run is marked FINISHED (``finished``) or left RUNNING to resume."""
        if self._events:
            self._events.close()
        if self._mlflow and finished:
            self._mlflow.finish()


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The int and float values of ``metrics`` as floats (flags and strings left out)."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def markdown_table(rows: Mapping[str, Mapping[str, float]], percent: bool = True) -> str:
    """``{row: {column: value}}`` as a markdown table (values x100 when ``percent``)."""
    columns = list(next(iter(rows.values()), {}))
    scale = 100.0 if percent else 1.0
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, values in rows.items():
        cells = " | ".join(f"{scale * values[column]:.2f}" for column in columns)
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


class _EventWriter:
    """One TensorBoard event file per (re)start, which first purges every earlier step.

    A URI log directory is written through a local file mirrored to it after each write
    (event files are small: a few scalars per epoch).
    """

    def __init__(self, log_dir: str) -> None:
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._target = log_dir
        self._local = tempfile.mkdtemp(prefix="campar-tb-") if storage.is_uri(log_dir) else log_dir
        self._writer = EventFileWriter(self._local)
        start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        self._add(step=0, session_log=start)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        from tensorboard.compat.proto import summary_pb2

        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()]
        )
        self._add(step=step, summary=summary)

    def text(self, tag: str, text: str) -> None:
        from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2
        from tensorboard.plugins.text import metadata

        tensor = tensor_pb2.TensorProto(
            dtype="DT_STRING",
            string_val=[text.encode()],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(),
        )
        value = summary_pb2.Summary.Value(
            tag=tag, metadata=metadata.create_summary_metadata(tag, ""), tensor=tensor
        )
        self._add(step=0, summary=summary_pb2.Summary(value=[value]))

    def close(self) -> None:
        self._writer.close()
        self._mirror()

    def _add(self, step: int, **fields: Any) -> None:
        from tensorboard.compat.proto import event_pb2

        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, **fields))
        self._writer.flush()
        self._mirror()

    def _mirror(self) -> None:
        if self._local == self._target:
            return
        for name in os.listdir(self._local):
            with open(os.path.join(self._local, name), "rb") as handle:
                storage.write_bytes(storage.join(self._target, name), handle.read())


class _MlflowRun:
    """One MLflow run, opened by key when it has one, that never sends a point twice."""

    def __init__(
        self, uri: str, experiment: str, run_name: str, key: str | None, tags: dict[str, str]
    ) -> None:
        client = _client(uri)
        experiment_id = _experiment_id(client, experiment)
        run = _find_run(client, experiment_id, key) if key else None
        if run is None:
            run = client.create_run(
                experiment_id, run_name=run_name, tags={**tags, **({KEY_TAG: key} if key else {})}
            )
        else:
            client.update_run(run.info.run_id, status="RUNNING")
        self._client, self.run_id = client, run.info.run_id
        self._params = dict(run.data.params)
        self._steps = {
            name: {point.step for point in client.get_metric_history(self.run_id, name)}
            for name in run.data.metrics
        }

    def log_params(self, params: Mapping[str, Any]) -> None:
        """New params; a value that changed since the run began stays as first logged
        (MLflow params are immutable), which a warning names."""
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        text = {key: str(value)[:MAX_PARAM_VAL_LENGTH] for key, value in params.items()}
        changed = [k for k, v in text.items() if k in self._params and self._params[k] != v]
        if changed:
            logger.warning(
                "MLflow run %s keeps the params it started with; changed since: %s",
                self.run_id,
                ", ".join(f"{k} ({self._params[k]} -> {text[k]})" for k in changed),
            )
        new = [Param(k, v) for k, v in text.items() if k not in self._params]
        for chunk in _chunks(new, MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=chunk)
        self._params.update({param.key: param.value for param in new})

    def log_metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        stamp = int(time.time() * 1000)
        new = [
            Metric(key, value, stamp, step)
            for key, value in values.items()
            if step not in self._steps.get(key, ())
        ]
        for chunk in _chunks(new, MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=chunk)
        for metric in new:
            self._steps.setdefault(metric.key, set()).add(step)

    def set_note(self, markdown: str) -> None:
        from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

        self._client.set_tag(self.run_id, NOTE_TAG, markdown[:MAX_TAG_VAL_LENGTH])

    def finish(self) -> None:
        self._client.set_terminated(self.run_id, status="FINISHED")


def _client(uri: str) -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError(
            "tracking.mlflow_uri is set but MLflow is not installed; "
            'pip install -e ".[tracking]" in the checkout'
        ) from None
    if urlparse(uri).scheme == "file":
        # MLflow 3 wants an explicit opt-in for its file store; naming a file: URI is one.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client: Any, name: str) -> str:
    """The experiment's id, creating it; another process creating it first is no error."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _find_run(client: Any, experiment_id: str, key: str) -> Any:
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'", max_results=1
    )
    return runs[0] if runs else None


def _runs(client: Any, experiment: str, filter_string: str) -> list[Any]:
    """Every run of ``experiment`` (by name; none if it does not exist) that matches."""
    found = client.get_experiment_by_name(experiment)
    runs, token = [], None
    while found is not None:
        page = client.search_runs(
            [found.experiment_id], filter_string=filter_string, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    return runs


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
