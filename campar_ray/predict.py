"""Batch inference over folders, globs and manifests: in this process, or with Ray Data.

A few images (at most :data:`~campar_ray.config.PREDICT_IN_PROCESS_MAX`, no cluster address
given) are scored in this process, batch by batch: starting Ray would take longer than the
whole job. Above that, or on a named cluster, ``list -> decode + resize (tasks) -> predict
(an actor pool, each actor loading the bundle's predictor once)`` runs on Ray Data, streamed
block by block, so any number of images runs in bounded memory and on as many actors (and
GPUs) as the cluster offers; the driver receives only probabilities, never pixels. Both
paths run the same steps (training's own decode, ``decode_batch``, then the actors'
``ScoringActor``) and say in one line which one they took. The result has one row per input
in input order: ``path``, ``error`` (null when the image was read), ``prob_<attribute>`` for
every attribute and ``predicted`` (the attribute names at or above their threshold under the
chosen threshold protocol: 0.5 by default, as PAR papers report, or the bundle's
validation-chosen ``val`` / ``val-per-attribute`` thresholds; a Parquet file names the
protocol, threshold and its source in its schema metadata). An image that cannot be read or
decoded gets its error message and null probabilities; the run goes on. Images of any size
are resized as in training.
"""

from __future__ import annotations

import functools
import glob
import io
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch
from ray.data import ActorPoolStrategy, TaskPoolStrategy

from campar_ray import storage
from campar_ray.bundle import ParPredictor, load_model
from campar_ray.config import PREDICT_IN_PROCESS_MAX, DataConfig
from campar_ray.data.concurrency import decode_tasks
from campar_ray.data.images import STRICT, ImageLimits
from campar_ray.data.manifest import BINARY_COLUMN, check_images, read_manifest
from campar_ray.data.ray_pipeline import decode_batch
from campar_ray.decision import Threshold
from campar_ray.model.scoring import ScoringActor
from campar_ray.progress import Progress
from campar_ray.runtime import cluster_address, init_ray

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
OUTPUT_SUFFIXES = (".parquet", ".csv")
BLOCK_ROWS = 64
PROB_PREFIX = "prob_"


@dataclass(frozen=True)
class PredictResult:
    path: str
    images: int
    errors: int
    table: pa.Table
    threshold: Threshold

    def summary(self) -> str:
        """One line for the command line."""
        return (
            f"{self.images} images ({self.errors} unreadable) -> {self.path}; "
            f"threshold protocol {self.threshold.protocol} ({self.threshold.source})"
        )


@dataclass(frozen=True)
class Route:
    """Where :func:`predict` scores its images (``on_ray``) and why, in one line."""

    on_ray: bool
    line: str


def choose_route(images: int, address: str | None = None) -> Route:
    """Ray for a cluster address (``address``, else ``RAY_ADDRESS``: the work belongs there)
    or more than :data:`~campar_ray.config.PREDICT_IN_PROCESS_MAX` images, else this
    process."""
    cluster = cluster_address(address)
    if cluster:
        return Route(True, f"predict: {images} images on Ray (cluster {cluster})")
    if images > PREDICT_IN_PROCESS_MAX:
        return Route(
            True, f"predict: {images} images on Ray (over {PREDICT_IN_PROCESS_MAX} images)"
        )
    return Route(
        False,
        f"predict: {images} images in-process (at most {PREDICT_IN_PROCESS_MAX}; pass "
        "--address or more images for Ray)",
    )


@dataclass(frozen=True)
class Inputs:
    """What to predict: one row per image (``image`` reference, optional encoded bytes)."""

    table: pa.Table
    root: str
    """Folder that relative references resolve against ('' when they are absolute)."""
    stored: tuple[int, int] | None = None
    """``(H, W)`` of the pixels a decoded manifest stores (``ManifestInfo.pixels``)."""


def list_inputs(source: str, limits: ImageLimits = STRICT) -> Inputs:
    """The images named by a manifest (``.parquet``), a folder (recursive) or a glob pattern.

    A manifest's references are checked as training checks them, all before any is read:
    one outside its folder (unless ``limits`` allow it) or a URI with options stops the
    command in one line naming the row."""
    if source.endswith(".parquet"):
        table, info = read_manifest(source)
        if BINARY_COLUMN not in table.column_names:
            images = table.column("image").to_pylist()
            check_images(images, info.root, allow_outside_root=limits.allow_outside_root)
        columns = ["image", *([BINARY_COLUMN] if BINARY_COLUMN in table.column_names else [])]
        return Inputs(table.select(columns), info.root, info.pixels)
    if any(char in source for char in "*?["):
        if storage.is_uri(source):
            raise ValueError(f"glob patterns work on local paths only, got {source!r}")
        paths = sorted(p for p in glob.glob(source, recursive=True) if os.path.isfile(p))
    else:
        paths = _folder_images(source)
    if not paths:
        raise FileNotFoundError(
            f"no images found at {source!r} (give a folder, a glob or a .parquet manifest; "
            f"image files end with {', '.join(IMAGE_SUFFIXES)})"
        )
    return Inputs(pa.table({"image": pa.array(paths, pa.string())}), "")


def _folder_images(folder: str) -> list[str]:
    filesystem, inner = storage.resolve(folder)
    if filesystem.get_file_info(inner).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"input {folder!r} is not a folder, a glob or a .parquet manifest")
    found = []
    for info in filesystem.get_file_info(pafs.FileSelector(inner, recursive=True)):
        if info.type == pafs.FileType.File and info.path.lower().endswith(IMAGE_SUFFIXES):
            relative = os.path.relpath(info.path, inner).replace(os.sep, "/")
            found.append(storage.join(folder, relative))
    return sorted(found)


def predict(
    model: str,
    source: str,
    out: str,
    *,
    threshold: str = "0.5",
    gpu: bool = False,
    actors: int = 1,
    batch_size: int = 64,
    data: DataConfig | None = None,
    cpus_per_actor: float = 1.0,
    limits: ImageLimits = STRICT,
    address: str | None = None,
    insecure: bool = False,
    on_ray: bool | None = None,
) -> PredictResult:
    """Predict every image of ``source`` with the bundle (or run) ``model``; write ``out``.

    ``out`` ends with ``.parquet`` (``predicted`` as a list) or ``.csv`` (names joined by
    ``;``). ``threshold`` is the protocol (:data:`campar_ray.metrics.DECISION_PROTOCOLS`)
    that decides ``predicted``: ``calibrated`` writes calibrated probabilities, read at 0.5.
    A manifest's rows go through the manifest guard under ``limits``
    (``data.allow_outside_root``: off, its rows stay in its folder).

    Where it runs (:func:`choose_route`, said in one line on stderr; ``on_ray`` overrides):
    in this process for a few images, else on Ray, joining ``address`` (else
    ``RAY_ADDRESS``; ``insecure`` as :func:`~campar_ray.runtime.init_ray` takes it) or
    starting a local cluster when none is joined. On Ray, ``actors`` replicas of
    ``cpus_per_actor`` CPUs score and decoding follows ``data`` as training's does
    (``decode_concurrency`` tasks of ``decode_cpus`` CPUs each; 0: as many as the scoring
    actors leave on the cluster).
    """
    if not out.endswith(OUTPUT_SUFFIXES):
        raise ValueError(f"output {out!r} must end with one of {', '.join(OUTPUT_SUFFIXES)}")
    if actors < 1 or batch_size < 1:
        raise ValueError(f"actors ({actors}) and batch_size ({batch_size}) must be at least 1")
    data = data or DataConfig()
    predictor = load_model(model, threshold)
    inputs = list_inputs(source, limits)
    count = inputs.table.num_rows
    route = choose_route(count, address)
    if on_ray is not None and on_ray != route.on_ray:
        where = "on Ray" if on_ray else "in-process"
        route = Route(on_ray, f"predict: {count} images {where} (as asked)")
    print(route.line, file=sys.stderr, flush=True)
    rows = inputs.table.append_column("row", pa.array(np.arange(count, dtype=np.int64)))
    decode = {
        "root": inputs.root,
        "size": predictor.image_size,
        "interpolation": predictor.interpolation,
        "limits": limits,
        "stored": inputs.stored,
        "reasons": True,
    }
    if route.on_ray:
        init_ray(address, insecure=insecure)
        load = functools.partial(load_model, model, threshold)
        scored = _on_ray(rows, decode, load, gpu, actors, batch_size, data, cpus_per_actor)
    else:
        scored = _in_process(rows, decode, predictor, gpu, batch_size)
    probs = np.full((count, len(predictor.attributes)), np.nan, dtype=np.float32)
    errors = np.full(count, "", dtype=object)
    with Progress("[predict]", count) as progress:
        for batch in scored:
            probs[batch["row"]] = batch["probs"]
            errors[batch["row"]] = batch["error"]
            progress.update(len(batch["row"]))
    table = prediction_table(
        inputs.table.column("image").to_pylist(), errors, probs, predictor.attributes,
        predictor.decision,
    )  # fmt: skip
    write_predictions(out, table)
    failed = int(sum(1 for error in errors if error))
    return PredictResult(out, count, failed, table, predictor.decision)


def _in_process(
    rows: pa.Table,
    decode: dict[str, Any],
    predictor: ParPredictor,
    gpu: bool,
    batch_size: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Scored batches of ``rows``, decoded and scored here by the Ray path's own steps."""
    if gpu and not torch.cuda.is_available():
        raise ValueError("--gpu asks for a GPU but torch finds none on this machine")
    scorer = ScoringActor(lambda: predictor, use_gpu=gpu)
    for start in range(0, rows.num_rows, batch_size):
        block = rows.slice(start, batch_size)
        batch = {
            name: block.column(name).to_numpy(zero_copy_only=False) for name in block.column_names
        }
        yield scorer(decode_batch(batch, **decode))


def _on_ray(
    rows: pa.Table,
    decode: dict[str, Any],
    load: Callable[[], ParPredictor],
    gpu: bool,
    actors: int,
    batch_size: int,
    data: DataConfig,
    cpus_per_actor: float,
) -> Iterator[dict[str, np.ndarray]]:
    """Scored batches of ``rows`` from Ray Data: decode tasks, then an actor pool that
    ``load``s the predictor once per actor."""
    if gpu and ray.cluster_resources().get("GPU", 0) < 1:
        raise ValueError("--gpu asks for GPU actors but the Ray cluster has no GPU")
    free = ray.cluster_resources().get("CPU", 0) - actors * cpus_per_actor
    tasks = decode_tasks(data.decode_concurrency, data.decode_cpus, free)
    blocks = [rows.slice(start, BLOCK_ROWS) for start in range(0, rows.num_rows, BLOCK_ROWS)]
    scored = (
        ray.data.from_arrow(blocks)
        .map_batches(
            decode_batch,
            fn_kwargs=decode,
            batch_format="numpy",
            batch_size=None,
            compute=TaskPoolStrategy(size=tasks),
            num_cpus=data.decode_cpus,
        )
        .map_batches(
            ScoringActor,
            fn_constructor_kwargs={"load": load, "use_gpu": gpu},
            batch_format="numpy",
            batch_size=batch_size,
            compute=ActorPoolStrategy(size=actors),
            num_cpus=cpus_per_actor,
            num_gpus=1 if gpu else 0,
        )
    )
    return scored.iter_batches(batch_size=None, batch_format="numpy")


def prediction_table(
    paths: list[str],
    errors: np.ndarray,
    probs: np.ndarray,
    attributes: tuple[str, ...],
    threshold: Threshold,
) -> pa.Table:
    """The output rows: path, error (null if none), one probability column per attribute,
    and the names of the predicted attributes (null where the image failed); the schema
    metadata says which threshold decided them."""
    failed = np.array([bool(error) for error in errors], dtype=bool)
    names = np.asarray(attributes, dtype=object)
    cut = np.asarray(threshold.value)
    predicted = [
        None if bad else names[row >= cut].tolist() for row, bad in zip(probs, failed, strict=True)
    ]
    columns = {
        "path": pa.array(paths, pa.string()),
        "error": pa.array([error or None for error in errors], pa.string()),
    }
    for index, name in enumerate(attributes):
        columns[PROB_PREFIX + name] = pa.array(probs[:, index], pa.float32(), mask=failed)
    columns["predicted"] = pa.array(predicted, pa.list_(pa.string()))
    metadata = {
        "threshold_protocol": threshold.protocol,
        "threshold": json.dumps(threshold.value),
        "threshold_source": threshold.source,
    }
    return pa.table(columns).replace_schema_metadata(metadata)


def write_predictions(out: str, table: pa.Table) -> None:
    """Parquet as is; CSV with the predicted names joined by ``;`` (CSV has no lists)."""
    buffer = io.BytesIO()
    if out.endswith(".parquet"):
        pq.write_table(table, buffer)
    else:
        joined = pa.array(
            [
                None if names is None else ";".join(names)
                for names in table["predicted"].to_pylist()
            ],
            pa.string(),
        )
        flat = table.set_column(table.schema.get_field_index("predicted"), "predicted", joined)
        pacsv.write_csv(flat, buffer)
    storage.write_bytes(out, buffer.getvalue())
