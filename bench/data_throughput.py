"""Input pipeline throughput on real PETA images: Ray Data against a torch DataLoader.

Both pipelines do the same work with the same code: blocks of ``BLOCK_ROWS`` manifest rows go
through ``decode_batch`` (read, decode, resize to the network size, pad 10 + random crop,
flip), in ``--workers`` parallel workers (Ray Data tasks of 1 CPU on a Ray
cluster of ``--workers`` CPUs; DataLoader worker processes), and the main process consumes
uint8 torch batches. After one untimed warm-up pass each (worker processes started), the two
are timed in alternating order for ``--rounds`` rounds, so load from other users of the
machine falls on both alike; the ratio is of the median passes.

Then the training loop itself: ResNet-18 (CAM-PAR head, fusion) at 128 x 64 runs
``train_one_epoch`` fed by the Ray Data training pipeline, exactly as a Ray Train worker
consumes it (``iter_torch_batches`` with prefetch), and reports which fraction of the step
time it waited for data (the same run with the DataLoader is recorded next to it).

    python -m bench.data_throughput                   # whole train split, 2 workers, 5 rounds
    python -m bench.data_throughput --images 256 --rounds 1 --train-images 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from ray.data import DataContext

from bench.common import write_results
from campar_ray.config import DataConfig, ModelConfig
from campar_ray.data import ManifestInfo, read_manifest
from campar_ray.data.converters import prepare
from campar_ray.data.images import ImageLimits
from campar_ray.data.manifest import rebase_images, write_manifest
from campar_ray.data.ray_pipeline import BLOCK_ROWS, build_dataset, decode_batch
from campar_ray.model import build_model, stage1_loss
from campar_ray.train.loop import build_optimizer, train_one_epoch

PETA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "peta"
PETA_ELSEWHERE = ImageLimits(allow_outside_root=True)
"""The sample manifests live in a temporary folder and name the PETA images where they are."""


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=add_help)
    parser.add_argument("--peta-root", default=str(PETA_ROOT), help="PETA folder (raw layout)")
    parser.add_argument("--manifest", default=None, help="existing PETA manifest (else built)")
    parser.add_argument(
        "--images", type=int, default=0, help="training images per pass (0: the whole split)"
    )
    parser.add_argument("--workers", type=int, default=2, help="decode workers in both pipelines")
    parser.add_argument("--rounds", type=int, default=5, help="timed passes per pipeline")
    parser.add_argument("--size", type=int, nargs=2, default=(128, 64), metavar=("H", "W"))
    parser.add_argument("--pad", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32, help="training batch size")
    parser.add_argument("--train-images", type=int, default=256, help="images for the train loop")
    return parser


class BlockDataset(torch.utils.data.Dataset):
    """The DataLoader twin of the Ray pipeline: item ``i`` is block ``i``, decoded + augmented."""

    def __init__(self, rows: pa.Table, root: str, size: tuple[int, int], pad: int):
        self.blocks = [rows.slice(s, BLOCK_ROWS) for s in range(0, rows.num_rows, BLOCK_ROWS)]
        self.root, self.size, self.pad = root, size, pad

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        block = self.blocks[index]
        batch = {
            "row": block.column("row").to_numpy(),
            "image": np.asarray(block.column("image").to_pylist(), dtype=object),
            "labels": np.asarray(block.column("labels").to_pylist(), dtype=np.int8),
        }
        return decode_batch(
            batch, root=self.root, size=self.size, limits=PETA_ELSEWHERE, pad=self.pad
        )


def _subset(table: pa.Table, count: int, seed: int = 0) -> pa.Table:
    """``count`` random training rows (all for 0), the same sample for both pipelines."""
    train = table.filter(pc.equal(table.column("split"), "train"))
    count = min(count or train.num_rows, train.num_rows)
    picked = np.random.default_rng(seed).choice(train.num_rows, count, replace=False)
    return train.take(np.sort(picked))


def _sample_manifest(table: pa.Table, info: ManifestInfo) -> ManifestInfo:
    """The sample as a manifest of its own (absolute image paths): what Ray Data streams."""
    folder = tempfile.mkdtemp(prefix="peta-sample-")
    path = os.path.join(folder, "sample.parquet")
    write_manifest(path, rebase_images(table, info.root, folder), info)
    return read_manifest(path, with_bytes=False)[1]


def _ray_batches(sample: ManifestInfo, args, batch: int) -> Iterable[dict]:
    data = DataConfig(
        image_size=tuple(args.size),
        pad=args.pad,
        decode_concurrency=args.workers,
        decode_cpus=1,
        allow_outside_root=True,
    )
    dataset = build_dataset(sample, "train", data, train=True)
    return dataset.iter_torch_batches(batch_size=batch, prefetch_batches=2)


def _loader(table: pa.Table, info: ManifestInfo, args) -> torch.utils.data.DataLoader:
    indexed = table.append_column("row", pa.array(np.arange(table.num_rows)))
    return torch.utils.data.DataLoader(
        BlockDataset(indexed, info.root, tuple(args.size), args.pad),
        batch_size=None,
        shuffle=True,
        num_workers=args.workers,
        persistent_workers=True,
        prefetch_factor=2,
    )


def _images_per_second(batches: Iterable[dict]) -> tuple[float, int]:
    start, images = time.perf_counter(), 0
    for batch in batches:
        images += int(batch["valid"].sum())
    return images / (time.perf_counter() - start), images


def throughput(table: pa.Table, info: ManifestInfo, args) -> dict[str, Any]:
    """Median images/s of each pipeline over alternating timed passes."""
    loader = _loader(table, info, args)
    sample = _sample_manifest(table, info)
    passes = {
        "ray": lambda: _images_per_second(_ray_batches(sample, args, BLOCK_ROWS)),
        "dataloader": lambda: _images_per_second(loader),
    }
    for run in passes.values():
        run()  # warm-up: worker processes start, imports happen
    rounds: dict[str, list[float]] = {name: [] for name in passes}
    for index in range(args.rounds):
        for name in sorted(passes, reverse=index % 2 == 1):
            rate, images = passes[name]()
            rounds[name].append(round(rate, 1))
            print(f"round {index + 1} {name}: {rate:.1f} images/s ({images} images)", flush=True)
    ray_rate, loader_rate = (statistics.median(rounds[name]) for name in ("ray", "dataloader"))
    return {
        "ray_images_per_s": ray_rate,
        "dataloader_images_per_s": loader_rate,
        "ray_vs_dataloader_ratio": round(ray_rate / loader_rate, 3),
        "rounds": rounds,
    }


def train_utilisation(table: pa.Table, info: ManifestInfo, args) -> dict[str, Any]:
    """Data-wait fraction of ``train_one_epoch`` (ResNet-18 CAM-PAR + fusion) per pipeline."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18"), len(info.attributes))
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=5e-4)
    sources = {
        "ray": lambda: _ray_batches(_sample_manifest(table, info), args, args.batch),
        "dataloader": lambda: _rebatched(_loader(table, info, args), args.batch),
    }
    figures: dict[str, Any] = {}
    for name, batches in sources.items():
        stats = train_one_epoch(
            model, batches(), optimizer, stage1_loss, device=torch.device("cpu"), grad_clip=10.0
        )
        figures[name] = {
            "data_wait_fraction": round(stats.data_wait_fraction, 4),
            "images_per_s": round(stats.images_per_s, 2),
            "steps": stats.steps,
        }
        print(f"train loop with {name}: {figures[name]}", flush=True)
    return figures


def _rebatched(loader: Iterable[dict], size: int) -> Iterable[dict]:
    """Split the DataLoader's blocks into training batches (Ray's iterator does this itself)."""
    for block in loader:
        for start in range(0, len(block["valid"]), size):
            yield {key: value[start : start + size] for key, value in block.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    manifest = args.manifest
    if manifest is None:
        manifest = os.path.join(tempfile.mkdtemp(prefix="peta-"), "manifest.parquet")
        prepare("peta", args.peta_root, manifest)
    table, info = read_manifest(manifest)
    load_before = os.getloadavg()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    try:
        sample = _subset(table, args.images)
        figures = throughput(sample, info, args)
        train = train_utilisation(_subset(table, args.train_images, seed=1), info, args)
    finally:
        ray.shutdown()
    figures.update(
        {
            "data_wait_fraction": train["ray"]["data_wait_fraction"],
            "train_loop": {
                "model": "resnet18 campar + fusion",
                "image_size": list(args.size),
                "batch": args.batch,
                "images": min(args.train_images, table.num_rows),
                "torch_threads": torch.get_num_threads(),
                **train,
            },
            "images": sample.num_rows,
            "workers": args.workers,
            "image_size": list(args.size),
            "dataset": f"PETA ({info.dataset}), random training images",
            "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        }
    )
    path = write_results(__file__, figures)
    print(f"wrote {path}")
    return figures


if __name__ == "__main__":
    main()
