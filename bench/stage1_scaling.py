"""Stage-1 training throughput on Ray Train with 1 and with 2 workers (data-parallel scaling).

Each configuration is a real :func:`train_stage1` run on the synthetic data set, with the same
global work: the same images per epoch and the same global batch (per-worker batch =
global batch / workers). Epoch 1 is the warm-up (worker start, first decode, allocator);
the figure is epoch 2's ``images_per_s`` from the run's history (training images of all
workers over the slowest worker's training time, validation excluded). The ratio
(2 workers / 1 worker) is the scaling; on ``--gpu`` the figure is images/s per GPU with
ResNet-50 at 256 x 192 and AMP.

Ray gives each training worker ``OMP_NUM_THREADS`` = its CPUs (1 here), so one worker uses
one core and two workers use two: on an idle 2-core machine the ideal ratio is 2.

    python -m bench.stage1_scaling                        # CPU: ResNet-18 128x64, 1 and 2 workers
    python -m bench.stage1_scaling --images 200 --batch 16
    python -m bench.stage1_scaling --gpu --workers 1      # ResNet-50 256x192 AMP, per GPU
    python -m bench.stage1_scaling --gpu --workers 1 --decode-tasks 12   # a 16-core GPU node
    python -m bench.stage1_scaling --gpu --workers 1 --decode-tasks 0 --step-only \\
        --manifest /tmp/ip/repeated.parquet      # PETA x2 from bench.input_pipeline
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

from bench.common import subset_argument, write_results
from campar_ray.config import Config
from campar_ray.data import read_manifest
from campar_ray.data.synthetic import generate_synthetic
from campar_ray.train.stage1 import train_stage1

NAME = "stage1_scaling"
WARMUP_EPOCHS = 1


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=add_help)
    parser.add_argument("--gpu", action="store_true", help="ResNet-50 256x192 AMP on GPUs")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=None, help="worker counts (default: 1 2)"
    )
    parser.add_argument(
        "--images", type=int, default=None, help="synthetic images (CPU 600, GPU 6000)"
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="global batch size (CPU 32, GPU 128)"
    )
    parser.add_argument("--timed-epochs", type=int, default=1, help="timed epochs after warm-up")
    parser.add_argument(
        "--decode-tasks",
        type=int,
        default=4,
        help="--gpu: decode tasks per training worker (0: all the CPUs the workers leave)",
    )
    parser.add_argument(
        "--manifest",
        default=None,
        help="train on this manifest instead of synthetic images (e.g. the repeated PETA of "
        "bench.input_pipeline --manifest-only)",
    )
    parser.add_argument(
        "--step-only", action="store_true", help="also time the training step alone (no data)"
    )
    subset_argument(parser)
    return parser


def config_for(args: argparse.Namespace, manifest: str, workers: int, run_dir: str) -> Config:
    """One run of the comparison: same data and global batch, ``workers`` Ray Train workers."""
    if args.batch % workers:
        raise ValueError(f"--batch {args.batch} does not split evenly over {workers} workers")
    values: dict[str, Any] = {
        "model.weights": "none",
        "data.manifest": manifest,
        "data.allow_outside_root": True,  # the PETA manifest sits apart from the images
        "data.subset": args.subset,
        "train.epochs": WARMUP_EPOCHS + args.timed_epochs,
        "train.batch_size": args.batch // workers,
        "train.num_workers": workers,
        "train.lr": 1e-3,
        "run.dir": run_dir,
    }
    if args.gpu:
        values.update(
            {
                "model.backbone": "resnet50",
                "data.image_size": [256, 192],
                "data.decode_concurrency": args.decode_tasks * workers,
                "train.use_gpu": True,
                "train.amp": True,
                "train.channels_last": True,
            }
        )
    else:
        values.update({"model.backbone": "resnet18", "data.image_size": [128, 64]})
    return Config().override(values)


def measure(args: argparse.Namespace, manifest: str, workers: int, folder: str) -> dict[str, Any]:
    """Train a fresh run with ``workers`` workers; images/s of the epochs after the warm-up."""
    config = config_for(args, manifest, workers, os.path.join(folder, f"workers{workers}"))
    start = time.perf_counter()
    result = train_stage1(config, progress=False)
    timed = result.history[WARMUP_EPOCHS:]
    rate = sum(epoch["train_images"] for epoch in timed) / sum(
        epoch["epoch_seconds"] for epoch in timed
    )
    figures = {
        "workers": workers,
        "per_worker_batch": config.train.batch_size,
        "images_per_s": round(rate, 2),
        "images_per_s_per_worker": round(rate / workers, 2),
        "warmup_images_per_s": round(result.history[0]["images_per_s"], 2),
        "data_wait_fraction": round(timed[-1]["data_wait_fraction"], 4),
        "train_images_per_epoch": timed[-1]["train_images"],
        "run_seconds": round(time.perf_counter() - start, 1),
    }
    print(f"{workers} worker(s): {figures}", flush=True)
    return figures


def step_only(args: argparse.Namespace, attributes: int, steps: int = 30) -> dict[str, Any]:
    """Images/s of ``train_one_epoch`` on one batch already on the device: the rate the
    input pipeline has to keep up with (same network, batch, AMP and layout as the runs)."""
    import torch

    from campar_ray.model import build_model, stage1_loss
    from campar_ray.train.loop import build_optimizer, make_grad_scaler, train_one_epoch

    config = config_for(args, "", 1, "")
    device = torch.device("cuda" if args.gpu else "cpu")
    torch.manual_seed(0)
    model = build_model(config.model, attributes).to(device)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=5e-4)
    height, width = config.data.image_size
    batch = {
        "image": torch.randint(0, 256, (args.batch, height, width, 3), dtype=torch.uint8),
        "labels": torch.randint(0, 2, (args.batch, attributes), dtype=torch.int8),
        "valid": torch.ones(args.batch, dtype=torch.bool),
    }
    batch = {key: value.to(device) for key, value in batch.items()}
    options = {
        "device": device,
        "amp": config.train.amp,
        "channels_last": config.train.channels_last,
        "scaler": make_grad_scaler(device, config.train.amp),
    }
    train_one_epoch(model, [batch] * 5, optimizer, stage1_loss, **options)  # warm-up
    stats = train_one_epoch(model, [batch] * steps, optimizer, stage1_loss, **options)
    figures = {"images_per_s": round(stats.images_per_s, 1), "steps": steps}
    print(f"step only: {figures}", flush=True)
    del model, optimizer
    if args.gpu:
        torch.cuda.empty_cache()
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    args.workers = args.workers or [1, 2]
    args.images = args.images or (6000 if args.gpu else 600)
    args.batch = args.batch or (128 if args.gpu else 32)
    size = (256, 192) if args.gpu else (128, 64)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="stage1-scaling-") as folder:
        manifest = args.manifest or generate_synthetic(
            os.path.join(folder, "data"), n=args.images, size=size
        )
        attributes = len(read_manifest(manifest, with_bytes=False)[1].attributes)
        alone = step_only(args, attributes) if args.step_only else None
        runs = {workers: measure(args, manifest, workers, folder) for workers in args.workers}
    figures: dict[str, Any] = {
        "mode": "gpu" if args.gpu else "cpu",
        "model": "resnet50 campar + fusion, AMP" if args.gpu else "resnet18 campar + fusion",
        "image_size": list(size),
        "data": args.manifest or f"synthetic, {args.images} images",
        "global_batch": args.batch,
        "decode_tasks_per_worker": args.decode_tasks if args.gpu else None,
        "warmup_epochs": WARMUP_EPOCHS,
        "timed_epochs": args.timed_epochs,
        "runs": list(runs.values()),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    if 1 in runs and 2 in runs:
        figures["ratio_2_vs_1"] = round(runs[2]["images_per_s"] / runs[1]["images_per_s"], 3)
        print(f"2 workers / 1 worker images/s: {figures['ratio_2_vs_1']}", flush=True)
    if alone:
        figures["step_only"] = alone
        figures["pipeline_vs_step_only"] = {
            str(workers): round(run["images_per_s_per_worker"] / alone["images_per_s"], 3)
            for workers, run in runs.items()
        }
        print(f"full pipeline / step only: {figures['pipeline_vs_step_only']}", flush=True)
    if args.gpu:
        figures["images_per_s_per_gpu"] = {
            str(workers): run["images_per_s_per_worker"] for workers, run in runs.items()
        }
    path = write_results(NAME, figures, variant="gpu" if args.gpu else None)
    print(f"wrote {path} (explained in bench/RESULTS.md)", flush=True)
    return figures


if __name__ == "__main__":
    main()
