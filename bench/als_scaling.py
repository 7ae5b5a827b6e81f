"""CFAR's ALS at N = 10k, 100k, 1M images (M = 51, D = 32): Ray actors against ``implicit``.

For each size one synthetic stage-1 logits file is written in chunks (float32, row groups
as the training code writes them), so generating 1M x 51 never holds more than one chunk.
On it, from the same starting factors and for the same number of iterations:

- the Ray solver with 1 and 2 actors, one CPU and one BLAS thread each, every actor loading
  its own rows from the file;
- ``implicit`` (``use_cg=False``, float32, its default) in a fresh process with as many
  OpenMP threads as the Ray solver has actors and BLAS pinned to one thread: the same cores.
  Up to ``--float64-up-to`` rows also once with float64 factors, which separates the two
  solvers' agreement from float32 rounding in implicit's sums over N images.

Reported per run: median wall seconds per iteration, CPU seconds per iteration (summed over
actors; for implicit its process, which includes the objective this wrapper evaluates each
iteration for monitoring, about 1/D of an iteration's work), peak resident memory (largest
actor; implicit's whole process), set-up time and the final objective. On a machine shared
with other users wall time also measures them; the CPU seconds do not.

    python -m bench.als_scaling                          # 10k, 100k, 1M; 3 iterations each
    python -m bench.als_scaling --sizes 10000 --iterations 2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import write_results
from campar_ray.cfar.als import check_probabilities, initial_attribute_factors
from campar_ray.cfar.implicit_als import fit_implicit
from campar_ray.config import AlsSettings
from campar_ray.decision import cfar_logits, probabilities
from campar_ray.run.logits import ROW_GROUP_SIZE, count_rows, read_split_logits

PARAMS = dict(alpha=10.0, lam=0.1, threshold=0.5)
CHUNK = 65_536


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=add_help)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--attributes", type=int, default=51, help="M (RAPv1: 51)")
    parser.add_argument("--factors", type=int, default=32, help="D")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--float64-up-to",
        type=int,
        default=100_000,
        help="also run implicit with float64 factors (1 thread) up to this many rows",
    )
    parser.add_argument("--data-dir", default=None, help="where the logits files go (temp dir)")
    return parser


def write_logits(path: Path, rows: int, attributes: int, seed: int) -> None:
    """Correlated synthetic logits (rank-8 structure + noise) in the stage-1 logits format."""
    rng = np.random.default_rng(seed)
    loadings = rng.normal(size=(8, attributes)) / np.sqrt(8)
    names = [f"attr{j}" for j in range(attributes)]
    meta = {"campar": json.dumps({"attributes": names, "eval_attributes": names})}
    writer = None
    for start in range(0, rows, CHUNK):
        n = min(CHUNK, rows - start)
        structure = rng.normal(size=(n, 8)) @ loadings
        specific = (2.0 * structure + rng.normal(size=(n, attributes))).astype(np.float32)
        shared = (specific + 0.3 * rng.normal(size=(n, attributes))).astype(np.float32)
        table = pa.table(
            {
                "image": pa.array([f"img{i:08d}.jpg" for i in range(start, start + n)]),
                "labels": _matrix((structure > 0).astype(np.int8), pa.int8(), attributes),
                "l_shared": _matrix(shared, pa.float32(), attributes),
                "l_specific": _matrix(specific, pa.float32(), attributes),
            }
        ).replace_schema_metadata(meta)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=ROW_GROUP_SIZE)
    writer.close()


def _matrix(values: np.ndarray, kind: pa.DataType, width: int) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), kind), width)


def run_ray(path: str, actors: int, Y0: np.ndarray, settings: AlsSettings) -> dict[str, Any]:
    from campar_ray.cfar.ray_als import ShardedAls

    start = time.perf_counter()
    with ShardedAls(path, settings, actors=actors, cpus_per_actor=1.0) as solver:
        solver.pids()  # returns once every actor has loaded its shard
        setup = time.perf_counter() - start
        before = solver.usage()
        stamps: list[float] = []
        result = solver.fit(Y0, lambda *values: stamps.append(values[3]))
        after = solver.usage()
    cpu = sum(a["cpu_seconds"] - b["cpu_seconds"] for a, b in zip(after, before, strict=True))
    return {
        "solver": f"ray x{actors}",
        "cores": actors,
        "setup_s": setup,
        "iteration_s": _median_step(stamps),
        "cpu_s_per_iteration": cpu / settings.iterations,
        "peak_rss_mb": max(a["peak_rss"] for a in after) / 2**20,
        "objective": result.objectives[-1],
    }


def run_implicit(
    path: str, threads: int, Y0: np.ndarray, settings: AlsSettings, dtype: str = "float32"
) -> dict[str, Any]:
    """implicit in a fresh process, so that its peak memory is its own."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_implicit_worker, path, threads, Y0, settings, dtype).result()


def _implicit_worker(
    path: str, threads: int, Y0: np.ndarray, settings: AlsSettings, dtype: str
) -> dict[str, Any]:
    start = time.perf_counter()
    r = check_probabilities(probabilities(cfar_logits(read_split_logits(path))))
    load = time.perf_counter() - start
    stamps: list[float] = []
    cpu_start = time.process_time()
    result = fit_implicit(
        r,
        Y0,
        settings,
        threads,
        lambda *values: stamps.append(values[3]),
        dtype=np.dtype(dtype).type,
    )
    return {
        "solver": f"implicit x{threads}" + ("" if dtype == "float32" else f" {dtype}"),
        "cores": threads,
        "setup_s": load,
        "iteration_s": _median_step(stamps),
        "cpu_s_per_iteration": (time.process_time() - cpu_start) / settings.iterations,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "objective": result.objectives[-1],
    }


def _median_step(cumulative: list[float]) -> float:
    return float(statistics.median(np.diff([0.0, *cumulative])))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    settings = AlsSettings(factors=args.factors, iterations=args.iterations, tol=0.0, **PARAMS)
    import ray

    ray.init(num_cpus=max(args.actors), include_dashboard=False, log_to_driver=False)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=args.data_dir) as folder:
        for rows in args.sizes:
            path = Path(folder) / f"logits_{rows}.parquet"
            write_logits(path, rows, args.attributes, args.seed)
            if count_rows(str(path)) != rows:
                raise RuntimeError(f"{path} holds {count_rows(str(path))} rows, not {rows}")
            Y0 = initial_attribute_factors(args.attributes, args.factors, args.seed)
            jobs = [(run, actors, {}) for actors in args.actors for run in (run_ray, run_implicit)]
            if rows <= args.float64_up_to:
                jobs.append((run_implicit, 1, {"dtype": "float64"}))
            for run, actors, options in jobs:
                record = run(str(path), actors, Y0, settings, **options)
                record.update(rows=rows, load_average=os.getloadavg()[0])
                print({k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()})
                runs.append(record)
            path.unlink()
    ray.shutdown()
    figures = summarise(runs, args)
    write_results(__file__, figures)
    return figures


def summarise(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    def find(rows: int, solver: str) -> dict[str, Any]:
        return next(r for r in runs if r["rows"] == rows and r["solver"] == solver)

    def rel_diff(rows: int, solver: str, reference: str) -> float:
        expected = find(rows, reference)["objective"]
        return abs(find(rows, solver)["objective"] - expected) / expected

    diffs = [rel_diff(n, f"ray x{a}", f"implicit x{a}") for n in args.sizes for a in args.actors]
    exact = [
        rel_diff(n, f"ray x{a}", "implicit x1 float64")
        for n in args.sizes
        if n <= args.float64_up_to
        for a in args.actors
    ]
    largest, most = max(args.sizes), max(args.actors)
    ray_run, reference = find(largest, f"ray x{most}"), find(largest, f"implicit x{most}")
    return {
        "attributes": args.attributes,
        "factors": args.factors,
        "iterations": args.iterations,
        "params": PARAMS,
        "runs": runs,
        "objective_rel_diff": max(diffs),
        "objective_rel_diff_float64_implicit": max(exact, default=None),
        f"time_ratio_vs_implicit_{_size(largest)}_{most}actors": ray_run["iteration_s"]
        / reference["iteration_s"],
        f"cpu_ratio_vs_implicit_{_size(largest)}_{most}actors": ray_run["cpu_s_per_iteration"]
        / reference["cpu_s_per_iteration"],
    }


def _size(rows: int) -> str:
    return f"{rows // 1_000_000}m" if rows >= 1_000_000 else f"{rows // 1000}k"


if __name__ == "__main__":
    main()
