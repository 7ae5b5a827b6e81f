"""Stage-1 logits of every image by distributed batch inference (Ray Data, actor pool).

One pass over the whole manifest: the same decode + resize as validation, then a fixed pool
of :class:`~campar_ray.model.scoring.ScoringActor` (batch prediction's actors too) that each
load the checkpoint's :class:`~campar_ray.model.Scorer` once and score batches. The driver
only receives the logits (two ``M``-wide float rows per image, never pixels) and writes one
logits file per split in manifest order.

Images that cannot be decoded get no logits row: they are left out of the file, and listed
(by manifest image reference) in the returned ``skipped`` mapping and in the run's
:attr:`~campar_ray.run.layout.RunDir.skipped_images`, so every row of a logits file is a real
prediction and the row count equals the number of decodable images.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
import pyarrow as pa
from ray.data import ActorPoolStrategy

from campar_ray import storage
from campar_ray.config import DataConfig, TrainConfig
from campar_ray.data.manifest import SPLITS, ManifestInfo, labels_matrix, subset_rows
from campar_ray.data.ray_pipeline import build_dataset
from campar_ray.model import Scorer
from campar_ray.model.scoring import ScoringActor
from campar_ray.progress import Progress
from campar_ray.run.checkpoints import load_stage1_checkpoint
from campar_ray.run.layout import RunDir
from campar_ray.run.logits import SplitLogits, write_split_logits


def checkpoint_scorer(checkpoint: str, *, amp: bool, channels_last: bool) -> Scorer:
    """The scorer of a stage-1 checkpoint (folder or URI), on the CPU."""
    model, _ = load_stage1_checkpoint(checkpoint)
    return Scorer(model, amp=amp, channels_last=channels_last)


def write_logits(
    checkpoint: str,
    table: pa.Table,
    info: ManifestInfo,
    run_dir: str,
    data: DataConfig,
    train: TrainConfig,
    progress: bool = True,
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Score every manifest image with ``checkpoint``; write the logits of every split.

    Returns the path of each split's file and the images each split left out. Decoding
    follows ``data`` (as in validation); scoring uses ``train.num_workers`` actors (between
    the bounds of a range, as many as the cluster holds then) with the training workers'
    CPUs (and a GPU each when ``train.use_gpu``), ``train.batch_size`` images per call.
    """
    load = functools.partial(
        checkpoint_scorer, checkpoint, amp=train.amp, channels_last=train.channels_last
    )
    scored = build_dataset(info, None, data, train=False).map_batches(
        ScoringActor,
        fn_constructor_kwargs={"load": load, "use_gpu": train.use_gpu},
        batch_size=train.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=train.min_workers, max_size=train.max_workers),
        num_cpus=train.cpus_per_worker,
        num_gpus=1 if train.use_gpu else 0,
    )
    splits = table.column("split").to_numpy(zero_copy_only=False)
    chosen = subset_rows(splits, data.subset)
    columns = _collect(scored, table.num_rows, int(chosen.sum()))
    labels = labels_matrix(table)
    images = np.asarray(table.column("image").to_pylist(), dtype=object)
    paths: dict[str, str] = {}
    skipped: dict[str, list[str]] = {}
    for split in SPLITS:
        in_split = chosen & (splits == split)
        keep = in_split & columns["valid"]
        skipped[split] = images[in_split & ~columns["valid"]].tolist()
        paths[split] = RunDir(run_dir).logits(split)
        write_split_logits(
            paths[split],
            SplitLogits(
                images=images[keep].tolist(),
                labels=labels[keep],
                shared=columns["shared"][keep],
                specific=columns["specific"][keep] if "specific" in columns else None,
                attributes=info.attributes,
                eval_attributes=info.eval_attributes,
            ),
        )
        if progress:
            print(
                f"[stage1] logits {split}: {int(keep.sum())} images -> {paths[split]}"
                + (f" ({len(skipped[split])} undecodable left out)" if skipped[split] else ""),
                flush=True,
            )
    storage.write_bytes(RunDir(run_dir).skipped_images, json.dumps(skipped, indent=1).encode())
    return paths, skipped


def _collect(scored: Any, rows: int, scoring: int) -> dict[str, np.ndarray]:
    """Stream the scored batches (``scoring`` rows of the manifest's ``rows``) into
    manifest-ordered arrays (``valid`` False if unscored)."""
    columns: dict[str, np.ndarray] = {"valid": np.zeros(rows, dtype=bool)}
    with Progress("[stage1] logits", scoring) as progress:
        for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
            _store(columns, batch, rows)
            progress.update(len(batch["row"]))
    return columns


def _store(columns: dict[str, np.ndarray], batch: dict[str, np.ndarray], rows: int) -> None:
    """One scored batch into ``columns``, at its manifest rows."""
    index = batch["row"]
    columns["valid"][index] = batch["valid"]
    for name in ("shared", "specific"):
        if name in batch:
            if name not in columns:
                columns[name] = np.full((rows, batch[name].shape[1]), np.nan, np.float32)
            columns[name][index] = batch[name]
