"""Stage 1 on Ray Train: a TorchTrainer around the plain loops of :mod:`campar_ray.train.loop`.

The driver (:func:`train_stage1`) resolves the config, builds the streaming datasets, runs a
``TorchTrainer`` whose storage lives inside the run directory, then writes the logits of
every split with the best checkpoint (highest validation mA: model selection never sees
test data).

Each epoch every worker reports the same metrics, rank 0 with the checkpoint: model weights
(``model.pt``), optimiser/scheduler/scaler state (``train_state.pt``), both ``torch.save``d
tensors loaded with ``weights_only=True``, and ``meta.json`` (epoch, resolved config,
attribute names, this epoch's metrics and the whole history). A restarted worker group
and a re-run of the same run directory both resume at the epoch after the latest
checkpoint: Ray Train V2 restores it from the run's snapshot in ``<run.dir>/ray/stage1``.

``train.num_workers: MIN..MAX`` makes the group elastic (Ray Train restarts it with fewer
workers when nodes are lost and with more when they return, each time from the latest
checkpoint); ``train.lr`` is the full group's rate, scaled by ``lr_scale`` for smaller
groups. ``train.checkpoint_every_minutes`` adds mid-epoch checkpoints (see
:func:`_report_progress`), from which a restart finishes the interrupted epoch.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import itertools
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import yaml
from ray.data import ExecutionOptions
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig

from campar_ray import storage
from campar_ray.artifacts import load_tensors
from campar_ray.config import Config, ConfigError, TrainConfig
from campar_ray.data.manifest import ManifestInfo, labels_matrix, read_manifest
from campar_ray.data.ray_pipeline import build_dataset, data_execution_options
from campar_ray.model import (
    ParModel,
    build_model,
    init_bias_from_prior,
    positive_ratio,
    prediction_logits,
    stage1_loss,
)
from campar_ray.preflight import check_cluster
from campar_ray.runtime import init_ray
from campar_ray.tracking import ensure_experiment, resolve_tracking
from campar_ray.train.checkpoints import (
    META_FILE,
    MODEL_FILE,
    STATE_FILE,
    check_resumable,
    read_meta,
)
from campar_ray.train.inference import write_logits
from campar_ray.train.loop import (
    SCHEDULERS,
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
from campar_ray.train.monitor import EpochMonitor

logger = logging.getLogger(__name__)

RUN_NAME = "stage1"
LOSSES = ("bce", "weighted_bce")


@dataclass(frozen=True)
class Stage1Result:
    """Where a finished stage-1 run left its artefacts, and how it went."""

    run_dir: str
    checkpoint: str
    """The best checkpoint (highest validation mA); its weights produced the logits."""
    metrics: dict[str, float]
    """The best checkpoint's epoch metrics."""
    history: list[dict[str, float]]
    """One metrics dict per epoch, epochs 1..E in order (across restarts and re-runs)."""
    logits: dict[str, str]
    """Split -> logits Parquet path."""
    skipped: dict[str, list[str]]
    """Split -> images left out of the logits because they could not be decoded."""


def train_stage1(
    config: Config,
    progress: bool = True,
    callbacks: list[Any] | None = None,
    address: str | None = None,
) -> Stage1Result:
    """Train stage 1 as ``config`` says, resuming the run in ``run.dir`` when there is one.

    ``callbacks`` are Ray Train callbacks for the run's controller (``RunConfig.callbacks``):
    how a caller such as a Tune trial follows the run epoch by epoch. Ray is joined at
    ``address`` (see :func:`init_ray`) only after the inputs have been checked.
    """
    config = resolve_config(config)
    # Everything that can be checked is checked before the first byte is written.
    table, info = read_manifest(config.data.manifest, with_bytes=False)
    for split in ("train", "val"):
        if not pc.any(pc.equal(table.column("split"), split)).as_py():
            raise ValueError(f"manifest {config.data.manifest} has no {split!r} images")
    storage.check_writable(config.run.dir)
    check_resumable(config.run.dir, info.attributes)
    init_ray(address)
    check_cluster(config)
    storage.write_bytes(
        storage.join(config.run.dir, "config.yaml"),
        yaml.safe_dump(config.to_dict(), sort_keys=False).encode(),
    )
    ensure_experiment(config.tracking, config.tracking.experiment)
    config = _with_decode_tasks(config)
    result = _trainer(config, table, info, progress, callbacks or []).fit()
    best = result.get_best_checkpoint(metric="val_mA", mode="max")
    if best is None or result.checkpoint is None:
        raise RuntimeError(f"stage-1 run in {config.run.dir} finished without a checkpoint")
    history = read_meta(_location(result.checkpoint, config.run.dir))["history"]
    best_path = _location(best, config.run.dir)
    best_meta = read_meta(best_path)
    logits, skipped = write_logits(
        best_path, table, info, config.run.dir, config.data, config.train, progress=progress
    )
    if progress:
        _print_summary(best_meta, best_path, skipped)
    return Stage1Result(
        run_dir=config.run.dir,
        checkpoint=best_path,
        metrics=best_meta["metrics"],
        history=history,
        logits=logits,
        skipped=skipped,
    )


def _trainer(
    config: Config, table: pa.Table, info: ManifestInfo, progress: bool, callbacks: list[Any]
) -> ray.train.torch.TorchTrainer:
    """The TorchTrainer of a run: worker loop, scaling, storage in the run dir, datasets."""
    cfg = config.train
    train_labels = labels_matrix(table.filter(pc.equal(table.column("split"), "train")))
    setup = {
        "model": config.model,
        "train": cfg,
        "data": config.data,
        "tracking": config.tracking,
        "run_dir": config.run.dir,
        "attributes": info.attributes,
        "eval_attributes": info.eval_attributes,
        "eval_indices": info.eval_indices().tolist(),
        "positive_ratio": positive_ratio(train_labels).tolist(),
        "epoch_rows": len(train_labels),
        "config": config.to_dict(),
        "seed": config.seed,
        "progress": progress,
    }
    gpus = cfg.max_workers if cfg.use_gpu else 0
    return ray.train.torch.TorchTrainer(
        _worker_loop,
        train_loop_config=setup,
        scaling_config=ScalingConfig(  # use_gpu adds one GPU per worker
            num_workers=_scaling_workers(cfg),
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
            elastic_resize_monitor_interval_s=cfg.resize_check_seconds,
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=storage.join(config.run.dir, "ray"),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute="val_mA",
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks,
        ),
        datasets={
            "train": build_dataset(info, "train", config.data, train=True, seed=config.seed),
            "val": build_dataset(info, "val", config.data, train=False),
        },
        dataset_config=ShardConfig(
            data_execution_options(cfg.max_workers * cfg.cpus_per_worker, gpus)
        ),
    )


def _scaling_workers(cfg: TrainConfig) -> int | tuple[int, int]:
    """A fixed group size, or Ray Train's elastic ``(min, max)`` for a range."""
    if cfg.min_workers == cfg.max_workers:
        return cfg.max_workers
    return (cfg.min_workers, cfg.max_workers)


def resolve_config(config: Config) -> Config:
    """Check what stage 1 needs and make local paths absolute (Ray wants absolute storage)."""
    cfg = config.train
    if not config.data.manifest:
        raise ConfigError("data.manifest is empty; give the manifest to train on (--manifest)")
    if cfg.loss not in LOSSES:
        raise ConfigError(f"unknown train.loss {cfg.loss!r}; valid: {', '.join(LOSSES)}")
    for key, value, low in (
        ("train.epochs", cfg.epochs, 1),
        ("train.batch_size", cfg.batch_size, 1),
        ("train.resize_check_seconds", cfg.resize_check_seconds, 0),
        ("train.checkpoint_every_minutes", cfg.checkpoint_every_minutes, 0),
        ("data.decode_concurrency", config.data.decode_concurrency, 0),
        ("data.prefetch_batches", config.data.prefetch_batches, 0),
    ):
        if value < low:
            raise ConfigError(f"{key} must be at least {low}, got {value}")
    if cfg.cpus_per_worker <= 0 or config.data.decode_cpus <= 0:
        raise ConfigError(
            "train.cpus_per_worker and data.decode_cpus must be positive, got "
            f"{cfg.cpus_per_worker} and {config.data.decode_cpus}"
        )
    if cfg.scheduler not in SCHEDULERS:
        raise ConfigError(
            f"unknown train.scheduler {cfg.scheduler!r}; valid: {', '.join(SCHEDULERS)}"
        )
    return config.override(
        {
            "run.dir": _absolute(config.run.dir),
            "data.manifest": _absolute(config.data.manifest),
            "tracking": dataclasses.asdict(resolve_tracking(config.tracking)),
        }
    )


def _with_decode_tasks(config: Config) -> Config:
    """``data.decode_concurrency`` 0 (auto) made concrete from the CPUs training leaves free."""
    cfg = config.train
    gpus = cfg.max_workers if cfg.use_gpu else 0
    free = data_execution_options(cfg.max_workers * cfg.cpus_per_worker, gpus).resource_limits.cpu
    tasks = decode_tasks(config.data.decode_concurrency, config.data.decode_cpus, free)
    return config.override({"data.decode_concurrency": tasks})


def decode_tasks(concurrency: int, decode_cpus: float, free_cpus: float) -> int:
    """``concurrency``, or for 0 as many as ``free_cpus`` hold (at least one).

    A training set passes through two task pools of this size (decode + resize, then
    augment), so auto gives each pool half of the free CPUs.
    """
    if concurrency > 0:
        return concurrency
    return max(1, int(free_cpus // (2 * decode_cpus)))


def _absolute(path: str) -> str:
    return path if storage.is_uri(path) else os.path.abspath(path)


def _location(checkpoint: ray.train.Checkpoint, run_dir: str) -> str:
    """A checkpoint's folder spelled like the run directory: a URI stays a URI.

    ``Checkpoint.path`` is relative to its filesystem (``bucket/...`` on S3), which the
    storage helpers would take for a local path.
    """
    if not storage.is_uri(run_dir):
        return checkpoint.path
    return f"{run_dir.split('://', 1)[0]}://{checkpoint.path}"


class ShardConfig(DataConfig):
    """Equal training shards, lossless evaluation shards.

    DDP needs every rank to take the same number of steps, so ``train`` is split with
    ``equal=True`` (which may drop up to ``num_workers - 1`` rows an epoch). Evaluation has
    no such constraint and must see every image, so other datasets are split without
    dropping rows.
    """

    def __init__(self, execution_options: ExecutionOptions):
        super().__init__(execution_options=execution_options)
        self._options = execution_options

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        shards: list[dict[str, Any]] = [{} for _ in range(world_size)]
        for name, dataset in datasets.items():
            dataset = dataset.copy(dataset)
            dataset.context.execution_options = copy.deepcopy(self._options)
            iterators = dataset.streaming_split(
                world_size, equal=name == "train", locality_hints=worker_node_ids
            )
            for rank, iterator in enumerate(iterators):
                shards[rank][name] = iterator
        return shards


CHECK_EVERY_BATCHES = 8
"""With ``train.checkpoint_every_minutes``, the ranks agree whether a checkpoint is due after
every this many batches: often enough to stay close to the interval, rarely enough that the
agreement (one tiny collective) costs nothing next to the training steps."""
PROGRESS_KEY = "epoch_progress"
"""Marks a mid-epoch report: the fraction of the epoch's rows trained so far."""
UNSCORED_MA = -1.0
"""``val_mA`` of a mid-epoch report: below every real score (mA lies in [0, 1]), so Ray Train
ranks it last; finite, because Ray's run snapshot stores -inf as null and a resumed run
could then not rank its checkpoints."""


@dataclass
class _Run:
    """One worker's training: the objects a checkpoint saves and what feeds them."""

    setup: dict[str, Any]
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


def _worker_loop(setup: dict[str, Any]) -> None:
    """One Ray Train worker: resume, then per epoch train, validate, report + checkpoint."""
    run = _start(setup)
    meta = _restore(ray.train.get_checkpoint(), run.model, run.optimizer, run.scheduler, run.scaler)
    history = meta["history"] if meta else []
    _scale_lr_to_world(run, meta)
    logits_fn = functools.partial(prediction_logits, predict_from=setup["model"].predict_from)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    monitor = None
    if run.rank == 0:
        monitor = EpochMonitor.open(
            setup["tracking"],
            run_dir=setup["run_dir"],
            config=setup["config"],
            data=setup["data"],
            history=history,
        )
    resumed = meta.get("partial") if meta else None
    for epoch in range(len(history) + 1, setup["train"].epochs + 1):
        stats = _train_epoch(run, train_shard, epoch, history, resumed)
        resumed = None
        predictions = evaluate(
            run.model, val_shard.iter_torch_batches(**run.batches), logits_fn, **run.options
        )
        metrics = _epoch_metrics(epoch, stats, predictions, setup["eval_indices"], history)
        metrics["world_size"] = run.world
        metrics["lr"] = run.optimizer.param_groups[0]["lr"]
        step_scheduler(run.scheduler, metrics["val_mA"])
        history.append(metrics)
        if run.rank == 0 and setup["progress"]:  # Ray Train forwards worker logs to the driver
            logger.info(_progress_line(metrics, history, setup["train"].epochs))
        _report(run, metrics, {"epoch": epoch, "metrics": metrics, "history": history})
        if monitor:  # after the checkpoint: a restart re-logs exactly the checkpointed epochs
            monitor.epoch(metrics, train_shard.stats())
    if monitor:
        monitor.finish(history)


def _start(setup: dict[str, Any]) -> _Run:
    """The model (prior bias, DDP), optimiser, scheduler, scaler and loss of a fresh worker."""
    cfg, device = setup["train"], ray.train.torch.get_device()
    context = ray.train.get_context()
    torch.manual_seed(setup["seed"])
    model = build_model(setup["model"], len(setup["attributes"]))
    ratio = torch.tensor(setup["positive_ratio"], device=device)
    if setup["model"].prior_bias:
        init_bias_from_prior(model.head.classifier, ratio)
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
        batches={"batch_size": cfg.batch_size, "prefetch_batches": setup["data"].prefetch_batches},
        world=context.get_world_size(),
        rank=context.get_world_rank(),
        clock=_CheckpointClock(cfg.checkpoint_every_minutes),
    )


def _scale_lr_to_world(run: _Run, meta: dict[str, Any] | None) -> None:
    """Learning rates for this group's size (see ``lr_scale``): ``train.lr`` is the full
    group's, and a checkpoint's rates are those of the group that saved it."""
    full = run.setup["train"].max_workers
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
    cfg = run.setup["train"]
    done = EpochStats(**resumed["stats"]) if resumed else _NO_STATS
    limit = None  # a fresh epoch takes the whole pass
    if resumed:
        limit = batches_left(run.setup["epoch_rows"], done.rows, run.world, cfg.batch_size)
    chunk = CHECK_EVERY_BATCHES if cfg.checkpoint_every_minutes > 0 else None
    batches = iter(shard.iter_torch_batches(**run.batches))
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
    progress under ``partial`` (no ``metrics``); Ray Train sees ``val_mA`` = ``UNSCORED_MA``,
    so it ranks last and is dropped first once later epochs are kept.
    """
    progress = done.rows / run.setup["epoch_rows"]
    metrics = {"epoch": epoch, PROGRESS_KEY: progress, "val_mA": UNSCORED_MA}
    meta = {
        "epoch": len(history),
        "history": history,
        "partial": {"epoch": epoch, "stats": dataclasses.asdict(done)},
    }
    if run.rank == 0 and run.setup["progress"]:
        logger.info("[stage1] epoch %d: checkpoint at %.0f%% of the epoch", epoch, 100 * progress)
    _report(run, metrics, meta)


def _epoch_metrics(
    epoch: int,
    stats: EpochStats,
    predictions: Predictions,
    eval_indices: list[int],
    history: list[dict[str, float]],
) -> dict[str, float]:
    """One epoch's metrics from the group's training stats and every worker's predictions."""
    merged = merge_predictions(_all_gather(predictions))
    return {
        "epoch": epoch,
        "step": (history[-1]["step"] if history else 0) + stats.steps,
        "train_loss": stats.loss,
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
                "attributes": list(run.setup["attributes"]),
                "eval_attributes": list(run.setup["eval_attributes"]),
                "config": run.setup["config"],
                "world_size": run.world,
                **meta,
            }
            save_checkpoint(folder, run.model, run.optimizer, run.scheduler, run.scaler, meta)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)
    run.clock.restart()


def save_checkpoint(
    folder: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    meta: dict[str, Any],
) -> None:
    """Weights, training state and JSON metadata into ``folder`` (a local directory)."""
    torch.save(model.state_dict(), os.path.join(folder, MODEL_FILE))
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
    }
    torch.save(state, os.path.join(folder, STATE_FILE))
    with open(os.path.join(folder, META_FILE), "w") as handle:
        json.dump(meta, handle, indent=1)


def _restore(
    checkpoint: ray.train.Checkpoint | None,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
) -> dict[str, Any] | None:
    """Load the latest checkpoint's state into the live objects; return its metadata."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        device = next(model.parameters()).device
        model.load_state_dict(load_tensors(os.path.join(folder, MODEL_FILE), device))
        state = load_tensors(os.path.join(folder, STATE_FILE), device)
        meta = read_meta(folder)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    return meta


def load_stage1_checkpoint(path: str) -> tuple[ParModel, dict[str, Any]]:
    """The trained network (CPU, eval mode) and metadata of a checkpoint folder or URI.

    Needs no Ray: inference, evaluation and export load checkpoints the same way. The
    network is rebuilt from the config stored in the checkpoint, without pretrained
    weights (the checkpoint's weights replace them, so nothing is downloaded).
    """
    meta = read_meta(path)
    model_config = Config().override(meta["config"]).model
    model = build_model(dataclasses.replace(model_config, weights="none"), len(meta["attributes"]))
    model.load_state_dict(load_tensors(storage.join(path, MODEL_FILE)))
    return model.eval(), meta


def _progress_line(metrics: dict[str, float], history: list[dict[str, float]], epochs: int) -> str:
    """``epoch 3/30 step 450 loss 0.213 412 img/s data-wait 8% val mA 71.20 ETA 0:41:10``."""
    this_run = [m["epoch_seconds"] for m in history[-3:]]
    eta = (epochs - metrics["epoch"]) * float(np.mean(this_run))
    return (
        f"[stage1] epoch {metrics['epoch']}/{epochs} step {metrics['step']} "
        f"loss {metrics['train_loss']:.4f} {metrics['images_per_s']:.0f} img/s "
        f"data-wait {metrics['data_wait_fraction']:.0%} skipped {metrics['skipped_images']} "
        f"val mA {100 * metrics['val_mA']:.2f} F1 {100 * metrics['val_f1']:.2f} "
        f"ETA {datetime.timedelta(seconds=round(eta))}"
    )


def _print_summary(meta: dict[str, Any], path: str, skipped: dict[str, list[str]]) -> None:
    metrics = meta["metrics"]
    print(
        f"[stage1] best epoch {meta['epoch']}: val mA {100 * metrics['val_mA']:.2f} "
        f"acc {100 * metrics['val_accuracy']:.2f} prec {100 * metrics['val_precision']:.2f} "
        f"rec {100 * metrics['val_recall']:.2f} F1 {100 * metrics['val_f1']:.2f}\n"
        f"[stage1] checkpoint {path}\n"
        f"[stage1] images left out of the logits (undecodable): "
        + ", ".join(f"{split} {len(images)}" for split, images in skipped.items()),
        flush=True,
    )
