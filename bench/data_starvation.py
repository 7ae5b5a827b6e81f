"""Data starvation: how long stage-1 training waits for data, by input-pipeline setting.

Real ``train_stage1`` runs (one Ray Train worker on the local Ray that ``campar`` starts) on
the same synthetic images (generated at 512 x 256, so decoding includes a large resize,
trained at 128 x 64), with timm's smallest EfficientNet (``test_efficientnet``, no fusion): a
CPU stand-in for a GPU node, where the network outruns a CPU-side decode pipeline. Only the
input knobs differ between runs:

- ``starved``: ``data.decode_concurrency=1``, ``data.prefetch_batches=0``;
- ``previous defaults``: ``decode_concurrency=1``, ``prefetch_batches=2`` (before issue #13);
- ``defaults``: ``decode_concurrency=0`` (auto: one decode task per 2 x ``decode_cpus`` of
  the CPUs the worker leaves), ``prefetch_batches=2``.

The figure per run is the fraction of training-step time spent waiting for the next batch
and the training images/s, averaged over the epochs after the first (which also starts the
decode processes), read from the run's history; ``warned`` counts the epochs for which the
run logged the starvation warning (``data.starvation_threshold``, 20 %).

    python -m bench.data_starvation                 # 600 images, 3 epochs per run
    python -m bench.data_starvation --images 400 --epochs 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

import numpy as np

from bench.common import subset_argument, write_results
from campar_ray.config import Config
from campar_ray.data.synthetic import generate_synthetic
from campar_ray.run.checkpoints import read_meta
from campar_ray.train.monitor import starvation_warning
from campar_ray.train.stage1 import train_stage1

SETTINGS = {
    "starved": {"data.decode_concurrency": 1, "data.prefetch_batches": 0},
    "previous defaults": {"data.decode_concurrency": 1, "data.prefetch_batches": 2},
    "defaults": {},
}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=add_help)
    parser.add_argument("--images", type=int, default=600, help="synthetic images")
    parser.add_argument("--source-size", type=int, nargs=2, default=(512, 256), metavar=("H", "W"))
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (first: warm-up)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--backbone", default="timm:test_efficientnet")
    subset_argument(parser)
    return parser


def config_for(args: argparse.Namespace, manifest: str, run_dir: str, knobs: dict) -> Config:
    """One run: the shared recipe, then this setting's input knobs."""
    return Config().override(
        {
            "model": {"backbone": args.backbone, "weights": "none", "fusion": False},
            "data": {
                "manifest": manifest,
                "image_size": [128, 64],
                "pad": 6,
                "allow_outside_root": True,  # PETA stays where it is
                "subset": args.subset,
            },
            "train": {"epochs": args.epochs, "batch_size": args.batch, "lr": 1e-3},
            "run.dir": run_dir,
            **knobs,
        }
    )


def measure(config: Config) -> dict[str, Any]:
    """Train a fresh run; its data-wait fraction and speed after the first epoch."""
    start = time.perf_counter()
    result = train_stage1(config, progress=False)
    timed = result.history[1:]
    resolved = read_meta(result.checkpoint)["config"]
    figures = {
        "decode_concurrency": resolved["data"]["decode_concurrency"],  # auto made concrete
        "prefetch_batches": config.data.prefetch_batches,
        "data_wait_fraction": round(float(np.mean([m["data_wait_fraction"] for m in timed])), 4),
        "images_per_s": round(float(np.mean([m["images_per_s"] for m in timed])), 1),
        "first_epoch_data_wait_fraction": round(result.history[0]["data_wait_fraction"], 4),
        "warned": sum(starvation_warning(m, config.data) is not None for m in result.history),
        "epochs": len(result.history),
        "run_seconds": round(time.perf_counter() - start, 1),
    }
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    load_before = os.getloadavg()
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="data-starvation-") as folder:
        manifest = generate_synthetic(
            os.path.join(folder, "data"), n=args.images, size=tuple(args.source_size)
        )
        for index, (name, knobs) in enumerate(SETTINGS.items()):
            config = config_for(args, manifest, os.path.join(folder, f"run{index}"), knobs)
            runs[name] = measure(config)
            print(f"{name}: {runs[name]}", flush=True)
    figures: dict[str, Any] = {
        "model": f"{args.backbone} campar head, no fusion, from scratch",
        "image_size": [128, 64],
        "synthetic_images": args.images,
        "source_image_size": list(args.source_size),
        "batch": args.batch,
        "workers": 1,
        "runs": runs,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    path = write_results(__file__, figures)
    print(f"wrote {path}", flush=True)
    return figures


if __name__ == "__main__":
    main()
