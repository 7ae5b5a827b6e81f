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
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import json
import logging
import os
import tempfile
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
from campar_ray.config import Config, ConfigError
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
    build_optimizer,
    build_scheduler,
    evaluate,
    make_grad_scaler,
    merge_predictions,
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
        "config": config.to_dict(),
        "seed": config.seed,
        "progress": progress,
    }
    gpus = cfg.num_workers if cfg.use_gpu else 0
    return ray.train.torch.TorchTrainer(
        _worker_loop,
        train_loop_config=setup,
        scaling_config=ScalingConfig(  # use_gpu adds one GPU per worker
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
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
            data_execution_options(cfg.num_workers * cfg.cpus_per_worker, gpus)
        ),
    )


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
        ("train.num_workers", cfg.num_workers, 1),
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
    gpus = cfg.num_workers if cfg.use_gpu else 0
    free = data_execution_options(cfg.num_workers * cfg.cpus_per_worker, gpus).resource_limits.cpu
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


def _worker_loop(setup: dict[str, Any]) -> None:
    """One Ray Train worker: resume, then per epoch train, validate, report + checkpoint."""
    cfg, device = setup["train"], ray.train.torch.get_device()
    torch.manual_seed(setup["seed"])
    model = build_model(setup["model"], len(setup["attributes"]))
    ratio = torch.tensor(setup["positive_ratio"], device=device)
    if setup["model"].prior_bias:
        init_bias_from_prior(model.head.classifier, ratio)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ddp_model = ray.train.torch.prepare_model(model)
    optimizer = build_optimizer(ddp_model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = build_scheduler(optimizer, name=cfg.scheduler, epochs=cfg.epochs)
    scaler = make_grad_scaler(device, cfg.amp)
    meta = _restore(ray.train.get_checkpoint(), model, optimizer, scheduler, scaler)
    history = meta["history"] if meta else []
    loss_fn = functools.partial(
        stage1_loss, positive_ratio=ratio if cfg.loss == "weighted_bce" else None
    )
    logits_fn = functools.partial(prediction_logits, predict_from=setup["model"].predict_from)
    options = {"device": device, "amp": cfg.amp, "channels_last": cfg.channels_last}
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    batches = {"batch_size": cfg.batch_size, "prefetch_batches": setup["data"].prefetch_batches}
    monitor = None
    if ray.train.get_context().get_world_rank() == 0:
        monitor = EpochMonitor.open(
            setup["tracking"],
            run_dir=setup["run_dir"],
            config=setup["config"],
            data=setup["data"],
            history=history,
        )
    for epoch in range(len(history) + 1, cfg.epochs + 1):
        stats = train_one_epoch(
            ddp_model,
            train_shard.iter_torch_batches(**batches),
            optimizer,
            loss_fn,
            grad_clip=cfg.grad_clip,
            scaler=scaler,
            **options,
        )
        predictions = evaluate(model, val_shard.iter_torch_batches(**batches), logits_fn, **options)
        metrics = _epoch_metrics(epoch, stats, predictions, setup["eval_indices"], history)
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        step_scheduler(scheduler, metrics["val_mA"])
        history.append(metrics)
        _report(metrics, history, setup, model, optimizer, scheduler, scaler)
        if monitor:  # after the checkpoint: a restart re-logs exactly the checkpointed epochs
            monitor.epoch(metrics, train_shard.stats())
    if monitor:
        monitor.finish(history)


def _epoch_metrics(
    epoch: int,
    stats: EpochStats,
    predictions: Predictions,
    eval_indices: list[int],
    history: list[dict[str, float]],
) -> dict[str, float]:
    """Combine every worker's share of the epoch into one set of metrics (same on all ranks)."""
    all_stats: list[EpochStats] = _all_gather(stats)
    merged = merge_predictions(_all_gather(predictions))
    images = sum(s.images for s in all_stats)
    seconds = max(s.seconds for s in all_stats)
    train_skipped = sum(s.skipped for s in all_stats)
    return {
        "epoch": epoch,
        "step": (history[-1]["step"] if history else 0) + all_stats[0].steps,
        "train_loss": sum(s.loss_sum for s in all_stats) / max(images, 1),
        **validation_metrics(merged.labels, merged.probs, eval_indices),
        "images_per_s": images / max(seconds, 1e-9),
        "data_wait_fraction": float(np.mean([s.data_wait_fraction for s in all_stats])),
        "epoch_seconds": seconds,
        "train_images": images,
        "val_images": len(merged.probs),
        "train_skipped_images": train_skipped,
        "val_skipped_images": merged.skipped,
        "skipped_images": train_skipped + merged.skipped,
    }


def _all_gather(value: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _report(
    metrics: dict[str, float],
    history: list[dict[str, float]],
    setup: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
) -> None:
    """Every rank reports (Ray Train needs equal report counts); only rank 0 saves."""
    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            meta = {
                "epoch": metrics["epoch"],
                "attributes": list(setup["attributes"]),
                "eval_attributes": list(setup["eval_attributes"]),
                "config": setup["config"],
                "metrics": metrics,
                "history": history,
            }
            save_checkpoint(folder, model, optimizer, scheduler, scaler, meta)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
            if setup["progress"]:  # Ray Train forwards worker logs to the driver
                logger.info(_progress_line(metrics, history, setup["train"].epochs))
        ray.train.report(metrics, checkpoint=checkpoint)


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
