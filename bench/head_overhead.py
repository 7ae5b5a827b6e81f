"""Training-step cost of the CAM-PAR head against the baseline head, on one backbone and batch.

Three variants: ``baseline`` (GAP + linear), ``campar`` (the cheap identity, the default) and
``campar_literal`` (eq. 11-12 as written, B x M x C x H x W).

Full step (forward + backward + Adam step). Time: one long-lived process per variant; the
driver asks them for one step at a time, round-robin with the order rotated every round, and
a variant's time ratio is the median over rounds of its time divided by the baseline's time
*in the same round*, so load from other users of the machine, which drifts over minutes,
cancels out. On CPU time is process CPU time (with ``--threads 1`` no thread waits on a
descheduled peer), since on a shared machine wall time mostly measures the other users; on
GPU it is wall-clock. Memory: each variant then runs alone in a fresh process, so its peak is
its own: on CPU the resident-set high-water mark (``ru_maxrss``), on GPU
``torch.cuda.max_memory_allocated``.

Head only: the heads alone (forward + loss + backward on a fixed feature map of the
backbone's real output shape), timed many times in one process. The step-level ratio cannot
resolve differences far below the machine's noise; the head-only times can, and
``head_share_*`` states the head's extra cost as a share of the baseline step.

    python -m bench.head_overhead                    # ResNet-50, 256 x 192, batch 16
    python -m bench.head_overhead --backbone resnet18 --size 64 32 --batch 4 --steps 3
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import torch

from bench.common import write_results

VARIANTS = ("baseline", "campar", "campar_literal")
HEAD_WARMUP, HEAD_REPEATS = 3, 30
MEMORY_STEPS = 2
MMAP_THRESHOLD_ENV, MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_", 1 << 16


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=add_help)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 192), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--attributes", type=int, default=51, help="M (RAPv1: 51)")
    parser.add_argument("--fusion", action="store_true", help="feature fusion in every variant")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    context = multiprocessing.get_context("spawn")
    pipes: dict[str, Connection] = {}
    processes = []
    for variant in VARIANTS:
        parent, child = context.Pipe()
        process = context.Process(target=_worker, args=(child, variant, vars(args)), daemon=True)
        process.start()
        processes.append(process)
        pipes[variant] = parent
    shapes = [pipe.recv() for pipe in pipes.values()]  # every worker built and ready
    feature_shape = shapes[0]

    times: dict[str, list[tuple[float, float]]] = {variant: [] for variant in VARIANTS}
    for round_ in range(args.warmup + args.steps):
        order = VARIANTS[round_ % len(VARIANTS) :] + VARIANTS[: round_ % len(VARIANTS)]
        for variant in order:
            pipes[variant].send("step")
            wall_and_cpu = pipes[variant].recv()
            if round_ >= args.warmup:
                times[variant].append(wall_and_cpu)
        print(f"round {round_ + 1}/{args.warmup + args.steps} done", file=sys.stderr)
    for pipe, process in zip(pipes.values(), processes, strict=True):
        pipe.send("stop")
        process.join()

    memory = {variant: _measure_memory(context, variant, args) for variant in VARIANTS}
    head_ms = _head_times(feature_shape, args)
    figures = _figures(args, times, memory, head_ms, feature_shape)
    _print(figures)
    on_gpu = args.device.startswith("cuda")
    path = write_results("head_overhead", figures, variant="gpu" if on_gpu else None)
    print(f"wrote {path}")
    return figures


def _setup(variant: str, args: dict[str, Any]) -> tuple[Callable[[], None], torch.nn.Module]:
    """One variant's model, Adam and fixed batch; returns its training step and the model."""
    from campar_ray.config import ModelConfig
    from campar_ray.model import build_model, stage1_loss

    torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    torch.manual_seed(0)
    head = "baseline" if variant == "baseline" else "campar"
    config = ModelConfig(backbone=args["backbone"], head=head, fusion=args["fusion"])
    model = build_model(config, args["attributes"]).to(device).train()
    model.head.literal = variant == "campar_literal"
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(args["batch"], 3, *args["size"], device=device)
    y = (torch.rand(args["batch"], args["attributes"], device=device) < 0.3).float()

    def step() -> None:
        loss = stage1_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)

    return step, model


def _worker(pipe: Connection, variant: str, args: dict[str, Any]) -> None:
    """Timing process: sends the feature shape, then one step's (wall, CPU) seconds per request."""
    step, model = _setup(variant, args)
    with torch.no_grad():
        shape = list(model.features(torch.zeros(1, 3, *args["size"], device=args["device"])).shape)
    pipe.send([args["batch"], *shape[1:]])
    while pipe.recv() == "step":
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        pipe.send((time.perf_counter() - wall, time.process_time() - cpu))


def _memory_worker(queue: multiprocessing.Queue, variant: str, args: dict[str, Any]) -> None:
    """Memory process: peak memory over the first steps (Adam's state appears in the first)."""
    step, _ = _setup(variant, args)
    device = torch.device(args["device"])
    before = _memory_mb(device, peak=False)
    for _ in range(MEMORY_STEPS):
        step()
    queue.put({"before_steps_mb": before, "peak_mb": _memory_mb(device, peak=True)})


def _measure_memory(context: Any, variant: str, args: argparse.Namespace) -> dict[str, float]:
    """Run :func:`_memory_worker` in a fresh process, alone on the machine's memory.

    glibc's malloc raises its mmap threshold as big blocks are freed and then keeps freed
    memory in its heap, which moved the resident-set peak by +-5 % between identical runs.
    A fixed threshold (read by glibc at process start, ignored elsewhere) returns every large
    tensor to the OS when freed, so the peak follows the live tensors. It slows allocation,
    which is why the timing processes do not use it.
    """
    queue = context.Queue()
    previous = os.environ.get(MMAP_THRESHOLD_ENV)
    os.environ[MMAP_THRESHOLD_ENV] = str(MMAP_THRESHOLD)
    try:
        process = context.Process(target=_memory_worker, args=(queue, variant, vars(args)))
        process.start()
    finally:
        if previous is None:
            del os.environ[MMAP_THRESHOLD_ENV]
        else:
            os.environ[MMAP_THRESHOLD_ENV] = previous
    result = queue.get()
    process.join()
    print(f"memory of {variant} measured", file=sys.stderr)
    return result


def _memory_mb(device: torch.device, peak: bool) -> float:
    """CPU: resident-set high-water mark so far; GPU: allocated (peak or current) memory."""
    if device.type == "cuda":
        used = torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated()
        return used / 2**20
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 2**10  # bytes vs KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _head_times(feature_shape: list[int], args: argparse.Namespace) -> dict[str, float]:
    """Median milliseconds of each head's forward + loss + backward on a fixed feature map."""
    from campar_ray.model import BaselineHead, CamParHead, stage1_loss

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    channels = feature_shape[1]
    heads = {
        "baseline": BaselineHead(channels, args.attributes),
        "campar": CamParHead(channels, args.attributes),
        "campar_literal": CamParHead(channels, args.attributes, literal=True),
    }
    f = torch.randn(feature_shape, device=device, requires_grad=True)
    y = (torch.rand(feature_shape[0], args.attributes, device=device) < 0.3).float()
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    samples: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for round_ in range(HEAD_WARMUP + HEAD_REPEATS):
        for variant in VARIANTS[round_ % 3 :] + VARIANTS[: round_ % 3]:
            head = heads[variant].to(device)
            _sync(device)
            start = clock()
            stage1_loss(head(f), y).backward()
            _sync(device)
            if round_ >= HEAD_WARMUP:
                samples[variant].append((clock() - start) * 1e3)
            f.grad = None
            head.zero_grad(set_to_none=True)
    return {variant: statistics.median(values) for variant, values in samples.items()}


def _figures(
    args: argparse.Namespace,
    times: dict[str, list[tuple[float, float]]],
    memory: dict[str, dict[str, float]],
    head_ms: dict[str, float],
    feature_shape: list[int],
) -> dict[str, Any]:
    on_gpu = args.device.startswith("cuda")
    figures: dict[str, Any] = {
        "setup": {
            "backbone": args.backbone,
            "size": list(args.size),
            "batch": args.batch,
            "attributes": args.attributes,
            "fusion": args.fusion,
            "feature_shape": feature_shape,
            "steps": args.steps,
            "warmup": args.warmup,
            "threads": args.threads,
            "device": args.device,
            "time_measure": "wall-clock" if on_gpu else "process CPU time",
            "time_ratio": "median over rounds of (variant / baseline in the same round)",
            "memory_measure": "cuda max_memory_allocated"
            if on_gpu
            else "ru_maxrss of a fresh process per variant, glibc mmap threshold fixed at 64 KiB",
            "memory_steps": MEMORY_STEPS,
        }
    }
    for variant in VARIANTS:
        wall = [w for w, _ in times[variant]]
        cpu = [c for _, c in times[variant]]
        peak, before = memory[variant]["peak_mb"], memory[variant]["before_steps_mb"]
        figures[variant] = {
            "median_step_s": statistics.median(wall if on_gpu else cpu),
            "median_wall_s": statistics.median(wall),
            "median_cpu_s": statistics.median(cpu),
            "wall_s": wall,
            "cpu_s": cpu,
            "peak_memory_mb": peak,
            "memory_before_steps_mb": before,
            "step_memory_mb": peak - before,
            "head_ms": head_ms[variant],
        }
    base = figures["baseline"]
    for variant, key in (("campar", "campar"), ("campar_literal", "literal")):
        row = figures[variant]
        measured = row["wall_s"] if on_gpu else row["cpu_s"]
        reference = base["wall_s"] if on_gpu else base["cpu_s"]
        figures[f"time_ratio_{key}_vs_baseline"] = _paired_ratio(measured, reference)
        figures[f"wall_time_ratio_{key}_vs_baseline"] = _paired_ratio(row["wall_s"], base["wall_s"])
        figures[f"memory_ratio_{key}_vs_baseline"] = row["peak_memory_mb"] / base["peak_memory_mb"]
        figures[f"step_memory_ratio_{key}_vs_baseline"] = (
            row["step_memory_mb"] / base["step_memory_mb"]
        )
        figures[f"head_share_{key}_of_baseline_step"] = (row["head_ms"] - base["head_ms"]) / (
            1e3 * base["median_step_s"]
        )
    return figures


def _paired_ratio(times: list[float], reference: list[float]) -> float:
    return statistics.median(t / r for t, r in zip(times, reference, strict=True))


def _print(figures: dict[str, Any]) -> None:
    print(f"{'variant':<16}{'wall s':>8}{'cpu s':>8}{'peak MiB':>10}{'step MiB':>10}{'head ms':>9}")
    for variant in VARIANTS:
        row = figures[variant]
        print(
            f"{variant:<16}{row['median_wall_s']:>8.3f}{row['median_cpu_s']:>8.3f}"
            f"{row['peak_memory_mb']:>10.0f}{row['step_memory_mb']:>10.0f}{row['head_ms']:>9.2f}"
        )
    for key in ("campar", "literal"):
        print(
            f"{key} vs baseline ({figures['setup']['time_measure']}): "
            f"time x{figures[f'time_ratio_{key}_vs_baseline']:.3f}, "
            f"wall x{figures[f'wall_time_ratio_{key}_vs_baseline']:.3f}, "
            f"peak memory x{figures[f'memory_ratio_{key}_vs_baseline']:.3f}, "
            f"step memory x{figures[f'step_memory_ratio_{key}_vs_baseline']:.3f}, "
            f"extra head time {100 * figures[f'head_share_{key}_of_baseline_step']:.2f}% of a step"
        )


if __name__ == "__main__":
    main()
