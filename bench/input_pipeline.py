"""Does the training pipeline deliver images as fast as its CPUs decode them? (real PETA, 256x192)

Measured side by side in one run, on the same images:

(a) the decoder: a plain single-process loop of the project's own decode + resize
    (``read_image(..., size=)``), from the image files (what a path manifest's tasks do) and
    from encoded bytes already in memory (what a packed manifest's tasks do);
(b) the pipeline: a real Ray Train worker (``TorchTrainer``, one worker of one CPU, the
    datasets split by the trainer's own ``ShardConfig``) taking ``iter_torch_batches`` with
    prefetch over an epoch of the training pipeline, augmentation included (on a GPU it also
    runs ``prepare_batch`` there, as training does; on a CPU it only counts the valid rows:
    normalising to float is the step's first op, and on this CPU it alone costs 0.6-0.9 ms
    an image, as much as decoding), with the CPUs the worker leaves given to decode tasks
    (``--decode-cpus`` each). The epoch is the training split of PETA repeated ``--copies``
    times (two copies: 22,871 images), so Ray Data's start-up (planning, first block) is
    counted but is a small share; each epoch is timed from the request of its first batch to
    its last.

``per_cpu_efficiency`` = (b) images/s per decode CPU / (a) images/s from files, for a path
manifest, a packed one and a decoded one (``campar pack --decode``: pixels stored at the
training size, so its figure is how many times the decoder's rate a decode CPU delivers
once nothing is decoded); ``per_cpu_efficiency_against_own_source`` divides the packed
figure by the bytes loop instead (stricter: the loop then skips the file reads that packing
saves too). (a) is the mean of a loop before and one after the pipelines, since other
users' load drifts. The copies are symbolic links to the one PETA folder, so both (a) and
(b) read the same files from the page cache.

    python -m bench.input_pipeline                       # 2 copies, 2 epochs each, all CPUs
    python -m bench.input_pipeline --decode-cpus 1 0.5   # also fractional decode tasks
    python -m bench.input_pipeline --copies 1 --epochs 1 --loop-images 500
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import RunConfig, ScalingConfig

from bench.common import write_results
from campar_ray.config import DataConfig
from campar_ray.data import read_manifest
from campar_ray.data.concurrency import decode_tasks
from campar_ray.data.converters import prepare
from campar_ray.data.images import decode_image, load_image_bytes, read_image
from campar_ray.data.manifest import resolve_image, write_manifest
from campar_ray.data.pack import pack_manifest
from campar_ray.data.ray_pipeline import build_dataset, data_execution_options
from campar_ray.train.loop import prepare_batch
from campar_ray.train.stage1 import ShardConfig

NAME = "input_pipeline"
KINDS = ("path", "packed", "decoded")
OWN_SOURCE = {"path": "files", "packed": "bytes", "decoded": "files"}
"""The decoder loop each pipeline is also compared with: the decoded manifest replaces
decoding files, so it is compared with that."""
PETA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "peta"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=add_help)
    parser.add_argument("--peta-root", default=str(PETA_ROOT), help="PETA folder (raw layout)")
    parser.add_argument("--copies", type=int, default=2, help="PETA repeats in the epoch")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per manifest")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 192), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=64, help="training batch size")
    parser.add_argument("--prefetch", type=int, default=DataConfig.prefetch_batches)
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="Ray's CPUs")
    parser.add_argument(
        "--loop-images", type=int, default=4000, help="images the decoder loop times"
    )
    parser.add_argument(
        "--decode-cpus",
        type=float,
        nargs="+",
        default=[DataConfig.decode_cpus],
        help="data.decode_cpus values to run (the first one is the headline)",
    )
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=KINDS,
        default=list(KINDS),
        help="manifests to run the pipeline on (path, packed bytes, decoded pixels)",
    )
    parser.add_argument("--work", default=None, help="folder for the manifests (else a temp one)")
    parser.add_argument(
        "--manifest-only", action="store_true", help="write the manifests to --work and stop"
    )
    return parser


def repeated_peta(peta_root: str, copies: int, folder: str) -> str:
    """A path manifest whose training split is PETA ``copies`` times over (all rows but the
    first copy's validation split, kept for ``bench.stage1_scaling``), its images under
    ``folder/c<k>`` links to ``peta_root``."""
    source = os.path.join(folder, "peta.parquet")
    prepare("peta", peta_root, source)
    table, info = read_manifest(source)
    relative = [
        os.path.relpath(resolve_image(image, info.root), peta_root)
        for image in table.column("image").to_pylist()
    ]
    parts = []
    for copy in range(copies):
        link = os.path.join(folder, f"c{copy}")
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(peta_root), link)
        parts.append(table.set_column(0, "image", pa.array([f"c{copy}/{p}" for p in relative])))
    repeated = pa.concat_tables(parts)
    val = np.zeros(repeated.num_rows, dtype=bool)
    val[: table.num_rows] = pc.equal(table.column("split"), "val").to_numpy(zero_copy_only=False)
    split = pa.array(np.where(val, "val", "train"))
    repeated = repeated.set_column(repeated.column_names.index("split"), "split", split)
    path = os.path.join(folder, "repeated.parquet")
    write_manifest(path, repeated, info)
    return path


def decoder_loop(manifest: str, count: int, size: tuple[int, int]) -> dict[str, float]:
    """(a): images/s of one process decoding + resizing ``count`` random rows, from files and
    from bytes held in memory."""
    table, info = read_manifest(manifest)
    picked = np.random.default_rng(0).choice(table.num_rows, min(count, table.num_rows), False)
    images = [table.column("image")[int(row)].as_py() for row in picked]
    start = time.perf_counter()
    for image in images:
        read_image(image, info.root, size=size)
    files = len(images) / (time.perf_counter() - start)
    encoded = [load_image_bytes(image, info.root) for image in images]
    start = time.perf_counter()
    for data in encoded:
        decode_image(data, size=size)
    in_memory = len(images) / (time.perf_counter() - start)
    figures = {"files_images_per_s": round(files, 1), "bytes_images_per_s": round(in_memory, 1)}
    print(f"(a) decoder loop, one process: {figures}", flush=True)
    return figures


def consume(config: dict[str, Any]) -> None:
    """The Ray Train worker: ``--epochs`` passes over its shard, as ``train_one_epoch`` takes it."""
    shard = ray.train.get_dataset_shard("train")
    device = ray.train.torch.get_device()
    epochs = []
    for _ in range(config["epochs"]):
        start, first, images = time.perf_counter(), None, 0
        batches = shard.iter_torch_batches(
            batch_size=config["batch"], prefetch_batches=config["prefetch"]
        )
        for batch in batches:
            if device.type == "cuda":
                images += len(prepare_batch(batch, device)[0])
            else:
                images += int(batch["valid"].sum())
            first = first or time.perf_counter() - start
        seconds = time.perf_counter() - start
        epochs.append(
            {
                "images": images,
                "seconds": round(seconds, 2),
                "first_batch_seconds": round(first or 0.0, 2),
                "images_per_s": round(images / seconds, 1),
            }
        )
        # Train V2 keeps a report's metrics only with a checkpoint: the figures go to a file
        # (one machine) and the report keeps the workers in step.
        Path(config["out"]).write_text(json.dumps({"epochs": epochs, "stats": shard.stats()}))
        ray.train.report({"epoch": len(epochs)})


def pipeline(
    manifest: str, args: argparse.Namespace, folder: str, decode_cpus: float
) -> dict[str, Any]:
    """(b): images/s a Ray Train worker receives, per decode CPU (the CPUs the worker
    leaves, all given to decode tasks of ``decode_cpus`` each, as ``train_stage1`` does)."""
    cpus = args.cpus - 1
    data = DataConfig(
        manifest=manifest,
        image_size=tuple(args.size),
        decode_concurrency=decode_tasks(0, decode_cpus, cpus),
        decode_cpus=decode_cpus,
        prefetch_batches=args.prefetch,
    )
    info = read_manifest(manifest, with_bytes=False)[1]
    out = os.path.join(folder, f"consumed-{Path(manifest).stem}-{decode_cpus}.json")
    trainer = ray.train.torch.TorchTrainer(
        consume,
        train_loop_config={
            "epochs": args.epochs,
            "batch": args.batch,
            "prefetch": args.prefetch,
            "out": out,
        },
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="consume", storage_path=folder),
        datasets={"train": build_dataset(info, "train", data, train=True)},
        dataset_config=ShardConfig(data_execution_options(1)),
    )
    trainer.fit()
    metrics = json.loads(Path(out).read_text())
    epochs = metrics["epochs"]
    rate = epochs[-1]["images_per_s"]
    figures = {
        "decode_cpus": decode_cpus,
        "decode_tasks": data.decode_concurrency,
        "epochs": epochs,
        "images_per_s": rate,
        "images_per_s_per_decode_cpu": round(rate / cpus, 1),
        "ray_data_stats_last_epoch": metrics["stats"],
    }
    print(f"(b) {manifest}, decode_cpus {decode_cpus}: {figures['epochs']}", flush=True)
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    if args.cpus < 2:
        raise SystemExit("--cpus must leave at least one CPU for decoding next to the worker")
    size = tuple(args.size)
    folder = args.work or tempfile.mkdtemp(prefix="input-pipeline-")
    os.makedirs(folder, exist_ok=True)
    path = repeated_peta(args.peta_root, args.copies, folder)
    manifests = {"path": path}
    for kind, decode in (("packed", None), ("decoded", size)):
        manifests[kind] = os.path.join(
            folder, kind if decode is None else f"{kind}-{size[0]}x{size[1]}"
        )
        if not os.path.exists(manifests[kind]):
            print(pack_manifest(path, manifests[kind], decode=decode).summary(), flush=True)
    manifests = {kind: manifests[kind] for kind in args.kinds}
    if args.manifest_only:
        return {"manifests": manifests}
    load_before = os.getloadavg()
    loops = [decoder_loop(path, args.loop_images, size)]
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        runs = {
            f"{kind}@{cpus:g}": pipeline(path, args, folder, cpus)
            for cpus in args.decode_cpus
            for kind, path in manifests.items()
        }
    finally:
        ray.shutdown()
    loops.append(decoder_loop(path, args.loop_images, size))  # load drifts
    decoder = {
        "files": statistics.mean(loop["files_images_per_s"] for loop in loops),
        "bytes": statistics.mean(loop["bytes_images_per_s"] for loop in loops),
    }
    efficiency, against_own_source = {}, {}
    for run, figures_of_run in runs.items():
        rate = figures_of_run["images_per_s_per_decode_cpu"]
        efficiency[run] = round(rate / decoder["files"], 3)
        against_own_source[run] = round(rate / decoder[OWN_SOURCE[run.split("@")[0]]], 3)
    headline = {kind: efficiency[f"{kind}@{args.decode_cpus[0]:g}"] for kind in manifests}
    table = read_manifest(path, with_bytes=False)[0]
    rows = int(pc.sum(pc.equal(table.column("split"), "train")).as_py())
    figures: dict[str, Any] = {
        "image_size": list(size),
        "epoch_images": rows,
        "peta_copies": args.copies,
        "batch": args.batch,
        "prefetch_batches": args.prefetch,
        "ray_cpus": args.cpus,
        "decoder_loop_before_and_after": loops,
        "decoder_images_per_s": {source: round(rate, 1) for source, rate in decoder.items()},
        "stored_mb": {
            kind: round(sum(f.stat().st_size for f in Path(manifests[kind]).glob("*")) / 2**20)
            for kind in ("packed", "decoded")
            if kind in manifests
        },
        "pipeline": runs,
        "per_cpu_efficiency": headline,
        "per_cpu_efficiency_by_run": efficiency,
        "per_cpu_efficiency_against_own_source": against_own_source,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    for run, figures_of_run in runs.items():
        print(
            f"{run}: {figures_of_run['images_per_s_per_decode_cpu']} images/s per decode CPU; "
            f"per_cpu_efficiency {efficiency[run]} (against decoding its own source "
            f"{against_own_source[run]})",
            flush=True,
        )
    path = write_results(NAME, figures, variant="gpu" if torch.cuda.is_available() else None)
    print(f"wrote {path} (explained in bench/RESULTS.md)", flush=True)
    return figures


if __name__ == "__main__":
    main()
