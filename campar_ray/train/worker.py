"""One Ray Train worker of stage 1: resume, then per epoch train, validate, report + checkpoint.

Each epoch every worker reports the same metrics (Ray Train needs equal report counts), rank 0
with the checkpoint (see :mod:`campar_ray.run.checkpoints` for its files). A restarted
worker group resumes at the epoch after the latest checkpoint, with learning rates rescaled
to its size (``lr_scale``: ``train.lr`` is the full group's). With
``train.checkpoint_every_minutes`` the ranks also checkpoint mid-epoch (see
:func:`_report_progress`), and a restart finishes the interrupted epoch from there. An error
a restart would meet again (bad data or config, a diverged loss) leaves the worker as
:class:`InputError`: not retried.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import logging
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.exceptions import RayTaskError

from campar_ray import storage
from campar_ray.config import Config, DataConfig, ModelConfig, TrackingConfig, TrainConfig
from campar_ray.decision import prediction_logits
from campar_ray.model import (
    ParModel,
    build_model,
    init_bias_from_prior,
    stage1_loss,
)
from campar_ray.run.checkpoints import (
    SCORE_KEY,
    UNSCORED,
    checkpoint_score,
    restore_checkpoint,
    save_checkpoint,
)
from campar_ray.run.layout import RunDir
from campar_ray.train.loop import (
    EpochStats,
    Predictions,
    add_stats,
    batches_left,
    build_optimizer,
    build_scheduler,
    evaluate,
    lr_scale,
    make_grad_scaler,
    merge_predictions,
    reduce_stats,
    rescale_lr,
    step_scheduler,
    train_one_epoch,
    validation_metrics,
)
from campar_ray.train.monitor import EpochMonitor, StepPoster
from campar_ray.train.persist import persist_checkpoint
from campar_ray.train.progress import PROGRESS_KEY, progress_line

logger = logging.getLogger(__name__)

CHECK_EVERY_BATCHES = 8
"""With ``train.checkpoint_every_minutes``, the ranks agree whether a checkpoint is due after
every this many batches: often enough to stay close to the interval, rarely enough that the
agreement (one tiny collective) costs nothing next to the training steps."""


SETUP_KEY = "setup"
"""The one key of Ray Train's ``train_loop_config``: the :class:`WorkerSetup`."""


@dataclass(frozen=True)
class WorkerSetup:
    """What every training worker starts from, built once on the driver
    (:func:`campar_ray.train.stage1.train_stage1`) and handed to each worker by Ray Train: the
    run's resolved config and what the manifest says about its attributes and rows."""

    config: Config
    attributes: tuple[str, ...]
    eval_attributes: tuple[str, ...]
    eval_indices: tuple[int, ...]
    positive_ratio: tuple[float, ...]
    """Per attribute, the fraction of positive training labels (the prior of the bias)."""
    epoch_rows: int
    """Training rows per epoch (all workers together)."""
    progress: bool = False
    mailbox: Any = None
    """Where rank 0 posts its step counts for the driver's progress bar (or None)."""

    @property
    def model(self) -> ModelConfig:
        return self.config.model

    @property
    def train(self) -> TrainConfig:
        return self.config.train

    @property
    def data(self) -> DataConfig:
        return self.config.data

    @property
    def tracking(self) -> TrackingConfig:
        return self.config.tracking

    @property
    def run_dir(self) -> str:
        return self.config.run.dir


@dataclass
class _Run:
    """One worker's training: the objects a checkpoint saves and what feeds them."""

    setup: WorkerSetup
    model: ParModel
    ddp_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    loss_fn: Any
    options: dict[str, Any]
    batches: dict[str, int]
    world: int
    rank: int
    clock: _CheckpointClock
    steps: StepPoster


class _CheckpointClock:
    """When a time-based checkpoint is due; rank 0's clock decides for every rank."""

    def __init__(self, minutes: float) -> None:
        self._seconds = minutes * 60
        self._last = time.monotonic()

    def restart(self) -> None:
        self._last = time.monotonic()

    def due(self) -> bool:
        """A collective: every rank calls it at the same point of the epoch."""
        return self._seconds > 0 and _all_gather(time.monotonic() - self._last >= self._seconds)[0]


class InputError(ValueError):
    """An error of a worker that a restart from the checkpoint would raise again (see
    :func:`recurs`): the run's data or config is wrong (every validation image corrupt, labels
    that do not fit, a manifest row no reader can open, a value our checks refuse) or the loss
    diverged (the rate is too high). Ray Train's controller ends the run on it at once
    (:class:`~campar_ray.train.stage1.StopAtInputErrors`), keeping ``train.max_failures`` for
    crashes (a killed process, a lost node, memory).

    ``cause`` is the worker's error; the message adds its traceback, which an exception loses
    on its way to the driver.
    """

    def __init__(self, cause: BaseException, trace: str) -> None:
        super().__init__(f"a worker's input or config error, not retried: {cause}\n{trace}")
        self.cause, self.trace = cause, trace

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.cause, self.trace))


def worker_loop(loop_config: dict[str, WorkerSetup]) -> None:
    """One Ray Train worker: resume, then per epoch train, validate, report + checkpoint."""
    try:
        _worker_loop(loop_config[SETUP_KEY])
    except Exception as error:
        if not recurs(error):
            raise
        raise InputError(error, traceback.format_exc()) from error


def recurs(error: BaseException) -> bool:
    """True when a restart from the checkpoint would meet ``error`` again: a ``ValueError``
    (bad data or config, or a write the run's disk has no room for: a
    :class:`~campar_ray.storage.WriteError`) or a ``FloatingPointError`` (a diverged loss),
    raised in the worker or in a Ray Data read task feeding it.

    A read task's error reaches the worker as a ``RayTaskError`` holding the task's own
    exception in ``cause``; it is judged by that exception, never by the wrapper's type or
    name, so Ray's own failures (a lost object, a dead task) are still retried.
    """
    while isinstance(error, RayTaskError) and error.cause is not None:
        error = error.cause
    return isinstance(error, ValueError | FloatingPointError)


def _worker_loop(setup: WorkerSetup) -> None:
    run = _start(setup)
    meta = restore_checkpoint(
        ray.train.get_checkpoint(), run.model, run.optimizer, run.scheduler, run.scaler
    )
    history = meta["history"] if meta else []
    _scale_lr_to_world(run, meta)
    logits_fn = functools.partial(prediction_logits, predict_from=setup.model.predict_from)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    monitor = None
    if run.rank == 0:
        monitor = EpochMonitor.open(
            setup.tracking,
            run_dir=setup.run_dir,
            config=setup.config.to_dict(),
            data=setup.data,
            history=history,
        )
    resumed = meta.get("partial") if meta else None
    for epoch in range(len(history) + 1, setup.train.epochs + 1):
        stats = _train_epoch(run, train_shard, epoch, history, resumed)
        resumed = None
        predictions = evaluate(
            run.model,
            val_shard.iter_torch_batches(**run.batches),
            logits_fn,
            loss_fn=run.loss_fn,
            **run.options,
        )
        merged = merge_predictions(_all_gather(predictions))
        metrics = _epoch_metrics(epoch, stats, merged, setup.eval_indices, history)
        metrics["world_size"] = run.world
        metrics["lr"] = run.optimizer.param_groups[0]["lr"]
        metrics[SCORE_KEY] = checkpoint_score(metrics, setup.train.checkpoint_rule)
        if run.rank == 0:
            _keep_epoch_logits(setup.run_dir, epoch, merged)
        step_scheduler(run.scheduler, metrics["val_mA"])
        history.append(metrics)
        if run.rank == 0 and setup.progress:  # Ray Train forwards worker logs to the driver
            logger.info(progress_line(metrics, history, setup.train.epochs))
        _report(run, metrics, {"epoch": epoch, "metrics": metrics, "history": history})
        if monitor:  # after the checkpoint: a restart re-logs exactly the checkpointed epochs
            monitor.epoch(metrics, train_shard.stats())
    if monitor:
        monitor.finish(history)


def _start(setup: WorkerSetup) -> _Run:
    """The model (prior bias, DDP), optimiser, scheduler, scaler and loss of a fresh worker."""
    cfg, device = setup.train, ray.train.torch.get_device()
    context = ray.train.get_context()
    torch.manual_seed(setup.config.seed)
    model = build_model(setup.model, len(setup.attributes))
    ratio = torch.tensor(setup.positive_ratio, device=device)
    if setup.model.prior_bias:
        for bias in model.head.output_biases():
            init_bias_from_prior(bias, ratio)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ddp_model = ray.train.torch.prepare_model(model)
    optimizer = build_optimizer(ddp_model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return _Run(
        setup=setup,
        model=model,
        ddp_model=ddp_model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, name=cfg.scheduler, epochs=cfg.epochs),
        scaler=make_grad_scaler(device, cfg.amp),
        loss_fn=functools.partial(
            stage1_loss, positive_ratio=ratio if cfg.loss == "weighted_bce" else None
        ),
        options={"device": device, "amp": cfg.amp, "channels_last": cfg.channels_last},
        batches={"batch_size": cfg.batch_size, "prefetch_batches": setup.data.prefetch_batches},
        world=context.get_world_size(),
        rank=context.get_world_rank(),
        clock=_CheckpointClock(cfg.checkpoint_every_minutes),
        steps=StepPoster(
            setup.mailbox if context.get_world_rank() == 0 else None,
            context.get_world_size(),
            setup.epoch_rows,
        ),
    )


def _scale_lr_to_world(run: _Run, meta: dict[str, Any] | None) -> None:
    """Learning rates for this group's size (see ``lr_scale``): ``train.lr`` is the full
    group's, and a checkpoint's rates are those of the group that saved it."""
    full = run.setup.train.max_workers
    saved = meta.get("world_size", full) if meta else full
    rescale_lr(run.optimizer, run.scheduler, lr_scale(run.world, full) / lr_scale(saved, full))


def _train_epoch(
    run: _Run,
    shard: Any,
    epoch: int,
    history: list[dict[str, float]],
    resumed: dict[str, Any] | None,
) -> EpochStats:
    """Train one epoch, checkpointing mid-way when due; the whole group's stats of the epoch.

    An epoch resumed from a mid-epoch checkpoint (``resumed``) trains only the rows that were
    left, in batches from a fresh pass over the data (in a new random order), so it trains
    as many rows as an uninterrupted epoch, not exactly the same ones. Shards are equal
    (``ShardConfig``), so every rank takes the same number of batches and meets the same
    checkpoint decisions.
    """
    cfg = run.setup.train
    done = EpochStats(**resumed["stats"]) if resumed else _NO_STATS
    limit = None  # a fresh epoch takes the whole pass
    if resumed:
        limit = batches_left(run.setup.epoch_rows, done.rows, run.world, cfg.batch_size)
    chunk = CHECK_EVERY_BATCHES if cfg.checkpoint_every_minutes > 0 else None
    batches = iter(run.steps.count(shard.iter_torch_batches(**run.batches), epoch, done.rows))
    mine = _NO_STATS
    while True:
        left = None if limit is None else limit - mine.batches
        size = min((n for n in (chunk, left) if n is not None), default=None)
        part = train_one_epoch(
            run.ddp_model,
            itertools.islice(batches, size),
            run.optimizer,
            run.loss_fn,
            grad_clip=cfg.grad_clip,
            scaler=run.scaler,
            **run.options,
        )
        mine = add_stats(mine, part)
        # Over when the pass is (on every rank alike) or the resumed epoch has its rows.
        if size is None or part.batches < size or mine.batches == limit:
            break
        if run.clock.due():
            _report_progress(run, epoch, add_stats(done, reduce_stats(_all_gather(mine))), history)
    return add_stats(done, reduce_stats(_all_gather(mine)))


_NO_STATS = EpochStats(loss_sum=0.0, images=0, steps=0, seconds=0.0, data_seconds=0.0, skipped=0)


def _report_progress(
    run: _Run, epoch: int, done: EpochStats, history: list[dict[str, float]]
) -> None:
    """A mid-epoch checkpoint: never mistaken for a finished epoch, never the best one.

    Its ``meta.json`` keeps ``epoch`` and ``history`` at the last finished epoch and holds the
    progress under ``partial`` (no ``metrics``); Ray Train sees the score ``UNSCORED``,
    so it ranks last and is dropped first once later epochs are kept.
    """
    progress = done.rows / run.setup.epoch_rows
    metrics = {"epoch": epoch, PROGRESS_KEY: progress, "val_mA": UNSCORED, SCORE_KEY: UNSCORED}
    meta = {
        "epoch": len(history),
        "history": history,
        "partial": {"epoch": epoch, "stats": dataclasses.asdict(done)},
    }
    if run.rank == 0 and run.setup.progress:
        logger.info("[stage1] epoch %d: checkpoint at %.0f%% of the epoch", epoch, 100 * progress)
    _report(run, metrics, meta)


def _epoch_metrics(
    epoch: int,
    stats: EpochStats,
    merged: Predictions,
    eval_indices: list[int],
    history: list[dict[str, float]],
) -> dict[str, float]:
    """One epoch's metrics from the group's training stats and every worker's predictions
    (``merged``)."""
    return {
        "epoch": epoch,
        "step": (history[-1]["step"] if history else 0) + stats.steps,
        "train_loss": stats.loss,
        **({} if merged.loss_sum is None else {"val_loss": merged.loss_sum / len(merged.probs)}),
        **validation_metrics(merged.labels, merged.probs, eval_indices),
        "images_per_s": stats.images_per_s,
        "data_wait_fraction": stats.data_wait_fraction,
        "epoch_seconds": stats.seconds,
        "train_images": stats.images,
        "val_images": len(merged.probs),
        "train_skipped_images": stats.skipped,
        "val_skipped_images": merged.skipped,
        "skipped_images": stats.skipped + merged.skipped,
    }


def _keep_epoch_logits(run_dir: str, epoch: int, merged: Predictions) -> None:
    """The epoch's validation prediction logits (float16) and labels, every worker's share in
    rank order: the evidence behind ``train.checkpoint_rule``, whichever epoch it keeps."""
    if merged.logits is None:
        return
    buffer = io.BytesIO()
    np.savez_compressed(buffer, logits=merged.logits.astype(np.float16), labels=merged.labels)
    storage.write_bytes(RunDir(run_dir).epoch_logits(epoch), buffer.getvalue())


def _all_gather(value: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _report(run: _Run, metrics: dict[str, float], meta: dict[str, Any]) -> None:
    """Every rank reports (Ray Train needs equal report counts); only rank 0 saves.

    ``meta`` (epoch, history, metrics or mid-epoch progress) joins what every checkpoint
    records: attribute names, the resolved config and the group size the rates are set for.
    """
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if run.rank == 0:
            meta = {
                "attributes": list(run.setup.attributes),
                "eval_attributes": list(run.setup.eval_attributes),
                "config": run.setup.config.to_dict(),
                "world_size": run.world,
                **meta,
            }
            save_checkpoint(folder, run.model, run.optimizer, run.scheduler, run.scaler, meta)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_fn=persist_checkpoint)
    run.clock.restart()
