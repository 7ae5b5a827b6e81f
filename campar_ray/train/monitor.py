"""What rank 0 records of each stage-1 epoch besides the checkpoint.

- Tracking (:mod:`campar_ray.tracking`): the config, every epoch's metrics, the best epoch's
  metrics and a short report; a restarted worker group re-logs the checkpointed history, which
  the tracker turns into "nothing new" for MLflow and a clean event file for TensorBoard.
- Data starvation: when the training step waited for data longer than
  ``data.starvation_threshold`` of an epoch, a warning names the knobs that feed it faster.
- Ray Data's own statistics of the epoch (per-operator task times, bytes, backpressure, the
  iterator's wait times) in ``<run.dir>/data_stats/epoch_NNN.txt``: what to read before
  turning those knobs.

Only rank 0 logs: every rank reports the same merged metrics, and one writer per run keeps
the MLflow run and the event files single-threaded.

On the driver, :func:`epoch_lines` prints one line per epoch while a run trains quietly
(Ray's worker logs, rank 0's line among them, then stay off the terminal): a Ray Train
callback on the controller posts each report to a small actor the driver reads every second.
Rank 0 also posts the epoch's progress to that actor about once a second
(:class:`StepPoster`), which the driver shows as a progress bar inside the epoch when its
stdout is a terminal, else as a line at the progress interval: a ResNet-50 epoch on CPUs
takes an hour, and a silent hour looks hung.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TextIO

import ray
from ray.train import UserCallback

from campar_ray import storage
from campar_ray.config import DataConfig, TrackingConfig
from campar_ray.progress import Progress
from campar_ray.run.checkpoints import SCORE_KEY
from campar_ray.run.layout import RunDir
from campar_ray.runtime import is_quiet
from campar_ray.tracking import RUN_DIR_TAG, Tracker, markdown_table, open_tracker, run_key
from campar_ray.train.progress import PROGRESS_KEY, progress_line

logger = logging.getLogger(__name__)

VAL_METRICS = ("val_mA", "val_accuracy", "val_precision", "val_recall", "val_f1", "val_auc")
ROWS_KEY = "rows_trained"
"""Marks rank 0's progress post inside an epoch: the group's rows trained so far."""
POST_EVERY_SECONDS = 1.0


class EpochMonitor:
    """Rank 0's record of one stage-1 run (see the module doc)."""

    def __init__(self, tracker: Tracker, run_dir: str, data: DataConfig) -> None:
        self._tracker, self._run_dir, self._data = tracker, run_dir, data

    @classmethod
    def open(
        cls,
        tracking: TrackingConfig,
        *,
        run_dir: str,
        config: Mapping[str, Any],
        data: DataConfig,
        history: list[dict[str, float]],
    ) -> EpochMonitor:
        """Open the run's tracker (continuing its MLflow run) and log what it already holds."""
        tracker = open_tracker(
            tracking,
            log_dir=RunDir(run_dir).tensorboard("stage1"),
            experiment=tracking.experiment,
            run_name=os.path.basename(run_dir.rstrip("/")),
            key=run_key(run_dir),
            tags={RUN_DIR_TAG: run_dir, "campar.stage": "stage1"},
        )
        tracker.log_config(config)
        for metrics in history:
            tracker.log_metrics(metrics, step=int(metrics["epoch"]))
        return cls(tracker, run_dir, data)

    def epoch(self, metrics: Mapping[str, float], data_stats: str) -> None:
        """Log one finished (checkpointed) epoch, save Ray Data's stats, warn on starvation."""
        epoch = int(metrics["epoch"])
        self._tracker.log_metrics(metrics, step=epoch)
        path = RunDir(self._run_dir).data_stats(epoch)
        storage.write_bytes(path, data_stats.encode())
        warning = starvation_warning(metrics, self._data)
        if warning:
            logger.warning("%s Ray Data's stats of the epoch: %s", warning, path)

    def finish(self, history: list[dict[str, float]]) -> None:
        """The kept epoch's metrics (the checkpoint whose logits are written) and the report."""
        best = max(history, key=lambda metrics: (metrics[SCORE_KEY], -metrics["epoch"]))
        self._tracker.log_final(best)
        self._tracker.log_report(stage1_report(best, history))
        self._tracker.close()


def starvation_warning(metrics: Mapping[str, float], data: DataConfig) -> str | None:
    """Why and how to feed the step faster, when it waited too long for data; else None."""
    wait = metrics["data_wait_fraction"]
    if wait <= data.starvation_threshold:
        return None
    return (
        f"[stage1] epoch {int(metrics['epoch'])}: training waited for data {wait:.0%} of the "
        f"time at {metrics['images_per_s']:.0f} images/s "
        f"(data.starvation_threshold={data.starvation_threshold:g}). To feed it faster: more "
        f"decode tasks (data.decode_concurrency, now {data.decode_concurrency or '0 = auto'}), "
        f"more batches ready ahead of each worker (data.prefetch_batches, now "
        f"{data.prefetch_batches}), "
        f"more CPUs left to decoding (data.decode_cpus, now {data.decode_cpus:g}; fewer "
        "train.cpus_per_worker), or a packed manifest (campar prepare ... --pack: a few large "
        "files instead of one read per image)."
    )


def stage1_report(best: Mapping[str, float], history: list[dict[str, float]]) -> str:
    """Markdown: the best epoch, then every epoch's validation metrics and input speed."""
    rows = {
        f"epoch {int(m['epoch'])}": {
            key.removeprefix("val_"): m.get(key, float("nan")) for key in VAL_METRICS
        }
        for m in history
    }
    speed = "\n".join(
        f"- epoch {int(m['epoch'])}: {m['images_per_s']:.1f} images/s, "
        f"waiting for data {m['data_wait_fraction']:.1%} of the time"
        for m in history
    )
    return (
        f"**Stage 1**: kept epoch {int(best['epoch'])} of {len(history)}, "
        f"val AUC {100 * best['val_auc']:.2f}, val mA {100 * best['val_mA']:.2f} "
        "(its checkpoint writes the logits).\n\n"
        f"{markdown_table(rows)}\n\n{speed}\n"
    )


@contextlib.contextmanager
def epoch_lines(epochs: int, data: DataConfig) -> Iterator[list[UserCallback]]:
    """Print each epoch's line on the driver while the ``with`` block trains a quiet run, with
    a progress bar inside each epoch when stdout is a terminal.

    Yields the Ray Train callbacks to pass to the run (none when Ray's output reaches the
    terminal, where rank 0's own line shows). The data-starvation advice is printed once.
    """
    if not is_quiet():
        yield []
        return
    name = f"campar-epochs-{uuid.uuid4().hex[:12]}"
    stop = threading.Event()
    printer = EpochPrinter(epochs, data, sys.stdout, bar=sys.stdout.isatty())
    thread = threading.Thread(
        target=_serve_mailbox, args=(name, printer, stop), name="campar-epochs", daemon=True
    )
    thread.start()
    try:
        yield [EpochReports(name)]
    finally:
        stop.set()
        thread.join()


class EpochReports(UserCallback):
    """Runs on Ray Train's controller: posts rank 0's report of each epoch (or mid-epoch
    checkpoint) to the driver's mailbox actor ``mailbox``, without waiting on it.

    :func:`~campar_ray.train.stage1.train_stage1` also hands ``mailbox`` to rank 0, whose
    :class:`StepPoster` posts the progress inside each epoch there.
    """

    def __init__(self, mailbox: str) -> None:
        self.mailbox, self._box = mailbox, None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        if self._box is None:
            self._box = _find_mailbox(self.mailbox)
            if self._box is None:  # the driver is gone: the line stays in the logs
                return
        self._box.put.remote(dict(metrics[0]))


class StepPoster:
    """Rank 0's side of the progress bar: counts the rows of the batches it trains and posts
    the group's estimate to the driver's mailbox at most once per ``every`` seconds.

    Posting is a fire-and-forget actor call, so the step never waits on the driver; a run
    without a mailbox (verbose, a search trial) posts nothing.
    """

    def __init__(
        self, mailbox: str | None, world: int, epoch_rows: int, every: float = POST_EVERY_SECONDS
    ) -> None:
        self._box = _find_mailbox(mailbox) if mailbox else None
        self._world, self._epoch_rows, self._every = world, epoch_rows, every

    def count(self, batches: Iterable[dict[str, Any]], epoch: int, done: int) -> Iterator[Any]:
        """Yield ``batches`` unchanged; ``done`` rows of the epoch were trained before them
        (a resumed epoch). Shards are equal, so the group trained ``world`` times rank 0's."""
        if self._box is None:
            yield from batches
            return
        rows, last = 0, time.monotonic()
        for batch in batches:
            yield batch
            rows += len(next(iter(batch.values())))
            if time.monotonic() - last >= self._every:
                last = time.monotonic()
                trained = min(done + rows * self._world, self._epoch_rows)
                self._box.put.remote(
                    {"epoch": epoch, ROWS_KEY: trained, "epoch_rows": self._epoch_rows}
                )


def _find_mailbox(name: str) -> Any:
    try:
        return ray.get_actor(name)
    except ValueError:  # the driver created none (or is gone)
        return None


class _Mailbox:
    """An actor holding the reports not yet printed."""

    def __init__(self) -> None:
        self._reports: list[dict[str, Any]] = []

    def put(self, report: dict[str, Any]) -> None:
        self._reports.append(report)

    def take(self) -> list[dict[str, Any]]:
        reports, self._reports = self._reports, []
        return reports


class EpochPrinter:
    """Turns the mailbox's posts into terminal output: one line per finished epoch (or
    mid-epoch checkpoint), the starvation advice once, and the epoch in training as a
    :class:`~campar_ray.progress.Progress`: with ``bar`` a progress bar, cleared before each
    line, else a line at the progress interval."""

    def __init__(self, epochs: int, data: DataConfig, stream: TextIO, bar: bool) -> None:
        self._epochs, self._data, self._stream, self._with_bar = epochs, data, stream, bar
        self._history: list[dict[str, Any]] = []
        self._warned = False
        self._bar: Progress | None = None
        self._bar_epoch = 0

    def show(self, post: dict[str, Any]) -> None:
        if ROWS_KEY in post:
            self._advance(post)
            return
        self.close()
        print(epoch_line(post, self._history, self._epochs), file=self._stream, flush=True)
        finished = "data_wait_fraction" in post  # not a mid-epoch checkpoint
        if finished and not self._warned:
            warning = starvation_warning(post, self._data)
            if warning:
                print(warning, file=sys.stderr, flush=True)
                self._warned = True

    def starting(self) -> None:
        """Until the first post: that the run is starting (Ray, the workers, the first
        batches), at the progress interval, so a slow start does not look hung."""
        self.close()
        self._bar = Progress("[stage1] starting", None, "steps", stream=self._stream, bar=False)
        self._bar.start()
        self._bar_epoch = 0

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _advance(self, post: dict[str, Any]) -> None:
        epoch = int(post["epoch"])
        if self._bar is not None and self._bar_epoch != epoch:
            self.close()
        if self._bar is None:
            self._bar = Progress(
                f"[stage1] epoch {epoch}/{self._epochs}",
                int(post["epoch_rows"]),
                initial=int(post[ROWS_KEY]),  # the rate counts from this post on
                stream=self._stream,
                bar=self._with_bar,
                redraw=0,  # posts come once a second: draw each
            ).start()
            self._bar_epoch = epoch
        self._bar.advance_to(int(post[ROWS_KEY]))


def _serve_mailbox(name: str, printer: EpochPrinter, stop: threading.Event) -> None:
    """The driver's printer thread: creates the mailbox once Ray is joined (the run joins it
    only after checking its inputs), shows what arrives, and a last time after ``stop``."""
    while not ray.is_initialized():
        if stop.wait(0.2):
            return
    box = ray.remote(num_cpus=0)(_Mailbox).options(name=name).remote()
    printer.starting()
    try:
        while True:
            stopping = stop.wait(1.0)
            for post in ray.get(box.take.remote()):
                printer.show(post)
            if stopping:
                break
    except ray.exceptions.RayError as error:  # Ray shut down under the thread
        logger.debug("epoch lines stopped: %s", error)
    finally:
        printer.close()
        if ray.is_initialized():
            ray.kill(box)


def epoch_line(metrics: dict[str, Any], history: list[dict[str, Any]], epochs: int) -> str:
    """The line of one report: a finished epoch (appended to ``history``, whose last epochs
    give the ETA) or a mid-epoch checkpoint."""
    if PROGRESS_KEY in metrics:
        return (
            f"[stage1] epoch {int(metrics['epoch'])}: checkpoint at "
            f"{100 * metrics[PROGRESS_KEY]:.0f}% of the epoch"
        )
    history.append(metrics)
    return progress_line(metrics, history, epochs)
