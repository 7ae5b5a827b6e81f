"""Corpus scale: does the Ray Data training pipeline's memory grow with the manifest, and what
do packed shards and object storage cost?

Manifests of 10,000 and 1,000,000 rows are written shard by shard (``ManifestWriter``); rows
reuse the real PETA images, each under its own path (the PETA folder is linked ``--copies``
times, as a manifest names every image once). Each measurement runs in a fresh process with
its own local Ray cluster: it builds the training dataset (``build_dataset``, decode + resize
to 128 x 64 + augment, ``--decode-tasks`` tasks), streams ``--batches`` batches of 64 and
samples, every 0.1 s, the RSS of the driver and the summed RSS of the Ray worker processes.

    paths-small   the 10k-row path manifest, images on local disk
    paths-large   the 1M-row path manifest: its peaks over paths-small give memory_ratio_1m_vs_10k
    packed-small  the 10k rows packed (``campar pack``) into local shards: packed_vs_paths_ratio
    packed-s3     the same shards on a local S3-compatible server (moto): s3_vs_local_ratio

After one untimed run (images into the page cache), each configuration runs ``--rounds``
times in alternating order; throughput is the median, memory the highest peak.

    python -m bench.data_scale                     # 5-10 min on 2 cores (writes ~100 MB)
    python -m bench.data_scale --batches 20 --rows 10000 100000
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from bench.common import write_results

PETA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "peta"
BATCH = 64
CHUNK = 16384
SLOW_START = {"RAY_raylet_start_wait_time_s": "300"}
"""A loaded shared machine can take minutes to start a local Ray (the default waits 60 s)."""


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=add_help)
    parser.add_argument("--peta-root", default=str(PETA_ROOT), help="PETA folder (raw layout)")
    parser.add_argument("--rows", type=int, nargs=2, default=(10_000, 1_000_000))
    parser.add_argument("--batches", type=int, default=40, help="batches of 64 streamed per run")
    parser.add_argument("--decode-tasks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="timed runs per configuration")
    parser.add_argument("--work-dir", default=None, help="where manifests go (default: a temp dir)")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # child process
    return parser


def write_scaled_manifest(
    peta: pa.Table, info: Any, peta_root: Path, rows: int, pool: Path, out: Path
) -> None:
    """``rows`` rows cycling over the PETA images, each named under its own linked copy."""
    from campar_ray.data.manifest import ManifestWriter, labels_matrix

    images = peta.column("image").to_pylist()
    names = [str(Path(image).relative_to(peta_root)) for image in images]
    labels = labels_matrix(peta)
    copies = -(-rows // len(names))
    pool.mkdir(parents=True, exist_ok=True)
    for copy in range(copies):
        link = pool / f"copy{copy:03d}"
        if not link.exists():
            link.symlink_to(peta_root, target_is_directory=True)
    with ManifestWriter(str(out), info) as writer:
        for start in range(0, rows, CHUNK):
            index = np.arange(start, min(start + CHUNK, rows))
            source = index % len(names)
            images = [
                f"{pool}/copy{i // len(names):03d}/{names[s]}"
                for i, s in zip(index, source, strict=True)
            ]
            flat = pa.array(labels[source].reshape(-1), pa.int8())
            offsets = pa.array(np.arange(len(index) + 1, dtype=np.int32) * labels.shape[1])
            writer.write(
                pa.table(
                    {
                        "image": pa.array(images),
                        "labels": pa.ListArray.from_arrays(offsets, flat),
                        "split": pa.array(["train"] * len(index)),
                        "identity": pa.array(images),
                        "source": pa.array(["peta"] * len(index)),
                    }
                )
            )


def measure(manifest: str, batches: int, decode_tasks: int) -> dict[str, Any]:
    """In this (fresh) process: stream ``batches`` training batches, sampling memory."""
    import psutil
    import ray
    from ray.data import DataContext

    from campar_ray.config import DataConfig
    from campar_ray.data.manifest import read_info
    from campar_ray.data.ray_pipeline import build_dataset

    ray.init(num_cpus=decode_tasks, include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    me = psutil.Process()
    peaks = {"driver": 0, "workers": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            workers = 0
            for child in me.children(recursive=True):
                try:
                    if child.name().startswith("ray::") or "default_worker" in " ".join(
                        child.cmdline()
                    ):
                        workers += child.memory_info().rss
                except psutil.Error:
                    continue
            peaks["driver"] = max(peaks["driver"], me.memory_info().rss)
            peaks["workers"] = max(peaks["workers"], workers)
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    info = read_info(manifest)
    data = DataConfig(
        image_size=(128, 64),
        decode_concurrency=decode_tasks,
        decode_cpus=1,
        allow_outside_root=True,  # the scaled manifests name PETA's images where they are
    )
    start = time.perf_counter()
    dataset = build_dataset(info, "train", data, train=True)
    images, first = 0, None
    for count, batch in enumerate(dataset.iter_torch_batches(batch_size=BATCH), start=1):
        if first is None:
            first = time.perf_counter()
            warm = images + int(batch["valid"].sum())
        images += int(batch["valid"].sum())
        if count == batches:
            break
    end = time.perf_counter()
    done.set()
    thread.join()
    ray.shutdown()
    return {
        "driver_peak_mb": round(peaks["driver"] / 2**20, 1),
        "workers_peak_mb": round(peaks["workers"] / 2**20, 1),
        "images": images,
        "images_per_s": round((images - warm) / (end - first), 1),
        "seconds_to_first_batch": round(first - start, 2),
    }


def _run_child(manifest: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.data_scale", "--measure", manifest]
    command += ["--batches", str(args.batches), "--decode-tasks", str(args.decode_tasks)]
    for _ in range(3):  # a local Ray can time out starting on an overloaded machine
        done = subprocess.run(
            command, env={**SLOW_START, **os.environ, **env}, capture_output=True, text=True
        )
        if done.returncode == 0:
            return json.loads(done.stdout.strip().splitlines()[-1])
        if "timed out during startup" not in done.stderr:
            break
    raise RuntimeError(f"measurement of {manifest} failed:\n{done.stderr[-3000:]}")


def _summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Median throughput and highest memory peaks over a configuration's rounds."""
    return {
        "driver_peak_mb": max(r["driver_peak_mb"] for r in results),
        "workers_peak_mb": max(r["workers_peak_mb"] for r in results),
        "images_per_s": statistics.median(r["images_per_s"] for r in results),
    }


def _moto(port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("moto server did not start")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.batches, args.decode_tasks)), flush=True)
        return {}
    import pyarrow.fs as pafs

    from campar_ray.data.converters import prepare
    from campar_ray.data.images import ImageLimits
    from campar_ray.data.manifest import read_manifest
    from campar_ray.data.pack import pack_manifest

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="data-scale-"))
    peta_manifest = work / "peta.parquet"
    if not peta_manifest.exists():
        prepare("peta", args.peta_root, str(peta_manifest))
    peta, info = read_manifest(str(peta_manifest))
    small, large = args.rows
    manifests = {}
    for rows in (small, large):
        out = work / f"paths-{rows}"
        if not out.exists():
            started = time.perf_counter()
            write_scaled_manifest(
                peta, info, Path(args.peta_root).resolve(), rows, work / "pool", out
            )
            print(f"wrote {rows} rows in {time.perf_counter() - started:.1f} s", flush=True)
        manifests[rows] = str(out)
    packed = work / f"packed-{small}"
    if not packed.exists():
        # The scaled manifests name PETA's images where they are, outside their own folder.
        outside = ImageLimits(allow_outside_root=True)
        pack_manifest(manifests[small], str(packed), shard_mb=64, limits=outside)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    server = _moto(port)
    try:
        s3 = pafs.S3FileSystem(
            endpoint_override=env["AWS_ENDPOINT_URL"],
            access_key="bench",
            secret_key="bench",
            allow_bucket_creation=True,
        )
        s3.create_dir("bench")
        pafs.copy_files(str(packed), "bench/packed", destination_filesystem=s3)
        load_before = os.getloadavg()[0]
        sources = {
            "paths-small": (manifests[small], {}),
            "paths-large": (manifests[large], {}),
            "packed-small": (str(packed), {}),
            "packed-s3": ("s3://bench/packed", env),
        }
        _run_child(manifests[small], args, {})  # untimed: images into the page cache
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in sources}
        for index in range(args.rounds):
            for name in sorted(sources, reverse=index % 2 == 1):
                manifest, env_vars = sources[name]
                rounds[name].append(_run_child(manifest, args, env_vars))
                print(f"round {index + 1} {name}: {rounds[name][-1]}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    runs = {name: _summary(results) for name, results in rounds.items()}
    figures = {
        "memory_ratio_1m_vs_10k": round(
            max(
                runs["paths-large"]["driver_peak_mb"] / runs["paths-small"]["driver_peak_mb"],
                runs["paths-large"]["workers_peak_mb"] / runs["paths-small"]["workers_peak_mb"],
            ),
            3,
        ),
        "driver_memory_ratio_1m_vs_10k": round(
            runs["paths-large"]["driver_peak_mb"] / runs["paths-small"]["driver_peak_mb"], 3
        ),
        "workers_memory_ratio_1m_vs_10k": round(
            runs["paths-large"]["workers_peak_mb"] / runs["paths-small"]["workers_peak_mb"], 3
        ),
        "packed_vs_paths_ratio": round(
            runs["packed-small"]["images_per_s"] / runs["paths-small"]["images_per_s"], 3
        ),
        "s3_vs_local_ratio": round(
            runs["packed-s3"]["images_per_s"] / runs["packed-small"]["images_per_s"], 3
        ),
        "runs": runs,
        "rounds": rounds,
        "rows": {"small": small, "large": large},
        "batches": args.batches,
        "batch_size": BATCH,
        "decode_tasks": args.decode_tasks,
        "image_size": [128, 64],
        "dataset": f"PETA ({peta.num_rows} images) reused under linked copies",
        "packed_shards": len(list(packed.glob("*.parquet"))),
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    path = write_results(__file__, figures)
    print(f"wrote {path}")
    return figures


if __name__ == "__main__":
    main()
