"""Stage 1 on Ray Train: the driver that runs a ``TorchTrainer`` of :mod:`~.worker` loops.

:func:`train_stage1` checks the inputs, resolves the config, builds the streaming datasets,
runs a ``TorchTrainer`` whose storage lives inside the run directory, then writes the logits
of every split with the best checkpoint (highest validation mA: model selection never sees
test data). A re-run of the same run directory resumes at the epoch after the latest
checkpoint (Ray Train V2 restores it from the run's snapshot in ``<run.dir>/ray/stage1``), but
only when the stored config matches on :data:`RUN_KEYS`; ``existing_run`` says what to do
otherwise (see :func:`check_run_dir`).

``train.num_workers: MIN..MAX`` makes the group elastic: Ray Train restarts it with fewer
workers when nodes are lost and with more when they return, each time from the latest
checkpoint (mid-epoch ones with ``train.checkpoint_every_minutes``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import posixpath
import sys
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import yaml
from ray.data import ExecutionOptions
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig

from campar_ray import storage
from campar_ray.config import Config, ConfigError, TrainConfig
from campar_ray.data.manifest import (
    ManifestInfo,
    check_images,
    is_packed,
    labels_matrix,
    read_manifest,
    subset_rows,
)
from campar_ray.data.ray_pipeline import build_dataset, data_execution_options
from campar_ray.decision import fit_run_calibration
from campar_ray.model import check_backbone, positive_ratio, resolve_inputs
from campar_ray.preflight import RunSections, check_cluster
from campar_ray.run.checkpoints import (
    SCORE_KEY,
    check_resumable,
    check_weights,
    read_meta,
    stored_config,
)
from campar_ray.run.layout import DERIVED, STAGE1_RUN, RunDir
from campar_ray.runtime import init_ray
from campar_ray.tracking import ensure_experiment, resolve_tracking, retire_runs
from campar_ray.train.inference import write_logits
from campar_ray.train.monitor import EpochReports
from campar_ray.train.worker import SETUP_KEY, InputError, WorkerSetup, worker_loop

logger = logging.getLogger(__name__)

RUN_KEYS = (
    "model", "data.manifest", "data.image_size", "data.interpolation", "data.pad", "train.loss",
    "seed",
)  # fmt: skip
"""Config keys (a section name: all its keys) that shape the network and what it learns from.
A run directory resumes only when its stored config matches on all of them (``--resume``
keeps the stored values); the manifest's attribute list is checked against the checkpoint.
The resize filter is compared as resolved (``encoder`` is the encoder's own filter), so a
run saved with either spelling matches the same filter."""
STATE_KEYS = ("train.lr", "train.weight_decay", "train.scheduler")
"""Keys a checkpoint's optimiser and scheduler state fix: a resume keeps the stored values, so
new ones are refused (so is a new ``train.epochs`` under ``cosine``, whose length is stored)."""
EXISTING_RUN = ("match", "resume", "fresh")


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
    existing_run: str = "match",
    insecure: bool = False,
) -> Stage1Result:
    """Train stage 1 as ``config`` says, resuming the run in ``run.dir`` when there is one.

    ``callbacks`` are Ray Train callbacks for the run's controller (``RunConfig.callbacks``):
    how a caller such as a Tune trial follows the run epoch by epoch. Ray is joined at
    ``address`` (see :func:`init_ray`, which ``insecure`` is passed to) only after the inputs
    have been checked. ``existing_run`` is ``match``, ``resume`` or ``fresh`` (see
    :func:`check_run_dir`). ``data.decode_concurrency`` 0 (automatic) is made concrete by the
    preflight for the cluster the run gets; ``config.yaml`` keeps the 0, so a resume on
    another cluster decides again.
    """
    config = resolve_config(config)
    # Everything that can be checked is checked before the first byte is written.
    stored = None if existing_run == "fresh" else stored_config(config.run.dir)
    if existing_run == "resume":  # the stored manifest and sizes are the ones to check
        config = check_run_dir(config, stored, existing_run)
    table, info = read_manifest(config.data.manifest, with_bytes=False)
    for split in ("train", "val"):
        if not pc.any(pc.equal(table.column("split"), split)).as_py():
            raise ValueError(f"manifest {config.data.manifest} has no {split!r} images")
    # An attribute no training image annotates has no positive rate and no loss term: refused
    # here, before Ray starts (_trainer computes the same rates for the workers).
    positive_ratio(labels_matrix(_split_rows(table, "train")), info.attributes)
    if not is_packed(config.data.manifest):
        # Refused here, in one line, rather than every image skipped by the decode tasks.
        images = table.column("image").to_pylist()
        check_images(images, info.root, allow_outside_root=config.data.allow_outside_root)
    if existing_run != "fresh":  # a damaged checkpoint is named before a config difference
        checkpoint = check_resumable(config.run.dir, info.attributes)
        config = check_run_dir(config, stored, existing_run)
        check_weights(config.run.dir, checkpoint, config.model, len(info.attributes))
    config = resolve_inputs(config)  # the encoder's resize filter, saved in config.yaml
    storage.check_writable(config.run.dir)
    init_ray(address, insecure=insecure)
    decode_tasks = check_cluster(RunSections.of(config))
    if existing_run == "fresh":
        _clear_run(config.run.dir)
        retire_runs(config.tracking, config.run.dir)  # the new run is a new MLflow run
    storage.write_bytes(
        RunDir(config.run.dir).config_file,
        yaml.safe_dump(config.to_dict(), sort_keys=False).encode(),
    )
    ensure_experiment(config.tracking, config.tracking.experiment)
    # config.yaml keeps an automatic 0; the run uses the planned number
    config = config.override({"data.decode_concurrency": decode_tasks})
    result = _trainer(config, table, info, progress, callbacks or []).fit()
    best = result.get_best_checkpoint(metric=SCORE_KEY, mode="max")
    if best is None or result.checkpoint is None:
        raise RuntimeError(f"stage-1 run in {config.run.dir} finished without a checkpoint")
    history = read_meta(_location(result.checkpoint, config.run.dir))["history"]
    best_path = _location(best, config.run.dir)
    best_meta = read_meta(best_path)
    logits, skipped = write_logits(
        best_path, table, info, config.run.dir, config.data, config.train, progress=progress
    )
    fit_run_calibration(config.run.dir, config.model.predict_from, None)  # fit-cfar refits it
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
    splits = table.column("split").to_numpy(zero_copy_only=False)
    train_rows = subset_rows(splits, config.data.subset) & (splits == "train")
    train_labels = labels_matrix(table.filter(pa.array(train_rows)))
    setup = WorkerSetup(
        config=config,
        attributes=info.attributes,
        eval_attributes=info.eval_attributes,
        eval_indices=tuple(info.eval_indices().tolist()),
        positive_ratio=tuple(positive_ratio(train_labels, info.attributes).tolist()),
        epoch_rows=len(train_labels),
        progress=progress,
        mailbox=next((c.mailbox for c in callbacks if isinstance(c, EpochReports)), None),
    )
    gpus = cfg.max_workers if cfg.use_gpu else 0
    return ray.train.torch.TorchTrainer(
        worker_loop,
        train_loop_config={SETUP_KEY: setup},
        scaling_config=ScalingConfig(  # use_gpu adds one GPU per worker
            num_workers=_scaling_workers(cfg),
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
            elastic_resize_monitor_interval_s=cfg.resize_check_seconds,
        ),
        run_config=RunConfig(
            name=STAGE1_RUN,
            storage_path=RunDir(config.run.dir).ray_storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute=SCORE_KEY,
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=[*callbacks, StopAtInputErrors()],
        ),
        datasets={
            "train": build_dataset(info, "train", config.data, train=True, seed=config.seed),
            "val": build_dataset(info, "val", config.data, train=False),
        },
        dataset_config=ShardConfig(
            data_execution_options(cfg.max_workers * cfg.cpus_per_worker, gpus)
        ),
    )


class StopAtInputErrors(ray.train.UserCallback):
    """Ends a run at a worker's :class:`~.worker.InputError` instead of restarting it.

    Ray Train V2 restarts the worker group on any worker error, up to
    ``FailureConfig.max_failures``, and takes no policy of ours; an error raised by a
    controller callback is not retried. So a run whose data or config is wrong fails on its
    first try, and ``train.max_failures`` is spent only on crashes.
    """

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for rank in sorted(worker_exceptions):
            if isinstance(worker_exceptions[rank], InputError):
                raise worker_exceptions[rank]


def check_run_dir(config: Config, stored: dict[str, Any] | None, existing_run: str) -> Config:
    """The config to train with, given the one ``stored`` in the run directory.

    ``match`` (a plain re-run) resumes when ``stored`` agrees on :data:`RUN_KEYS` and
    :data:`STATE_KEYS`, and refuses in one line naming the keys that differ; ``resume`` keeps
    the stored :data:`RUN_KEYS` and refuses only what a resume cannot honour; ``fresh`` starts
    over whatever the directory holds. Keys such as ``train.epochs`` or scaling may differ.
    """
    if existing_run not in EXISTING_RUN:
        raise ValueError(f"unknown existing_run {existing_run!r}; valid: {', '.join(EXISTING_RUN)}")
    run_dir = config.run.dir
    if stored is None:
        if existing_run == "resume":
            raise ValueError(f"cannot --resume {run_dir}: it holds no run (drop --resume)")
        return config
    try:
        old = _flat(resolve_inputs(Config().override(stored)))
    except ConfigError as error:
        raise ConfigError(f"cannot resume {run_dir}: its stored config: {error}") from None
    new = _flat(resolve_inputs(config))
    state = [*STATE_KEYS, *(["train.epochs"] if old["train.scheduler"] == "cosine" else [])]
    run_diff, state_diff = _changed(old, new, RUN_KEYS), _changed(old, new, state)
    if existing_run == "resume" and state_diff:
        raise ValueError(
            f"cannot --resume {run_dir} with {_show(old, new, state_diff)}: the checkpoint's "
            "optimiser and scheduler state keep the stored values; set them back, or use "
            "--fresh to start over in place"
        )
    if existing_run == "resume":
        if run_diff:
            print(
                f"[stage1] --resume keeps the stored {_show(new, old, run_diff)}", file=sys.stderr
            )
        return config.override({key: old[key] for key in run_diff})
    if run_diff or state_diff:
        resume = "set them back" if state_diff else "--resume to continue with the stored values"
        changes = _show(old, new, run_diff + state_diff)
        raise ValueError(
            f"{run_dir} holds a run with another config ({changes}); use --fresh to start "
            "over in place (deletes its checkpoints, logits, cfar and tune) "
            f"or {resume}"
        )
    return config


def _flat(config: Config) -> dict[str, Any]:
    """``{"model.backbone": ..., "seed": ...}``: every key of ``config``, dotted."""
    flat = {}
    for section, values in config.to_dict().items():
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": value for key, value in values.items()})
        else:
            flat[section] = values
    return flat


def _changed(
    old: dict[str, Any], new: dict[str, Any], keys: list[str] | tuple[str, ...]
) -> list[str]:
    """The dotted keys under ``keys`` (a key or a section) whose values differ."""
    return [
        key
        for key in old
        if any(key == k or key.startswith(f"{k}.") for k in keys) and old[key] != new.get(key)
    ]


def _show(old: dict[str, Any], new: dict[str, Any], keys: list[str]) -> str:
    return ", ".join(f"{key}: {_value(old[key])} -> {_value(new.get(key))}" for key in keys)


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _clear_run(run_dir: str) -> None:
    """Delete what a previous run left in ``run_dir`` (:data:`~campar_ray.run.layout.DERIVED`),
    for ``--fresh``."""
    filesystem, inner = storage.resolve(run_dir)
    for name in DERIVED:
        path = posixpath.join(inner, name)
        kind = filesystem.get_file_info(path).type
        if kind == pafs.FileType.Directory:
            filesystem.delete_dir(path)
        elif kind == pafs.FileType.File:
            filesystem.delete_file(path)


def _scaling_workers(cfg: TrainConfig) -> int | tuple[int, int]:
    """A fixed group size, or Ray Train's elastic ``(min, max)`` for a range."""
    if cfg.min_workers == cfg.max_workers:
        return cfg.max_workers
    return (cfg.min_workers, cfg.max_workers)


def resolve_config(config: Config) -> Config:
    """Check what stage 1 needs and make local paths absolute (Ray wants absolute storage)."""
    if not config.data.manifest:
        raise ConfigError("data.manifest is empty; give the manifest to train on (--manifest)")
    try:  # here, not in a worker minutes after the cluster started
        check_backbone(config.model.backbone)
    except ValueError as error:
        raise ConfigError(f"model.backbone: {error}") from None
    return config.override(
        {
            "run.dir": _absolute(config.run.dir),
            "data.manifest": _absolute(config.data.manifest),
            "tracking": dataclasses.asdict(resolve_tracking(config.tracking)),
        }
    )


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


def _print_summary(meta: dict[str, Any], path: str, skipped: dict[str, list[str]]) -> None:
    metrics = meta["metrics"]
    print(
        f"[stage1] kept epoch {meta['epoch']} ({meta['config']['train']['checkpoint_rule']}): "
        f"val AUC {100 * metrics['val_auc']:.2f} mA {100 * metrics['val_mA']:.2f} "
        f"acc {100 * metrics['val_accuracy']:.2f} prec {100 * metrics['val_precision']:.2f} "
        f"rec {100 * metrics['val_recall']:.2f} F1 {100 * metrics['val_f1']:.2f}\n"
        f"[stage1] checkpoint {path}\n"
        f"[stage1] images left out of the logits (undecodable): "
        + ", ".join(f"{split} {len(images)}" for split, images in skipped.items()),
        flush=True,
    )


def _split_rows(table: pa.Table, split: str) -> pa.Table:
    return table.filter(pc.equal(table.column("split"), split))
