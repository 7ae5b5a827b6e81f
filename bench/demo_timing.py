"""End to end: wall time of ``campar demo`` broken down by step, from a fresh start.

    python -m bench.demo_timing [--out runs/bench-demo]

Runs the demo with ``fresh=True`` in its own folder (so nothing is reused) and records the
seconds of each step and their share of the total in ``bench/results/demo_timing.json``.
"""

from __future__ import annotations

import argparse

from bench.common import write_results
from campar_ray.demo import run_demo
from campar_ray.metrics import SUMMARY_KEYS
from campar_ray.runtime import init_ray


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-demo")
    args = parser.parse_args()
    init_ray()
    result = run_demo("synthetic", args.out, fresh=True)
    total = sum(result.timings.values())
    figures = {
        "total_seconds": total,
        "step_seconds": result.timings,
        "step_share": {step: seconds / total for step, seconds in result.timings.items()},
        "test_metrics": {
            name: {k: source[k] for k in SUMMARY_KEYS}
            for name, source in result.metrics["sources"].items()
        },
    }
    print(result.summary())
    print(f"total {total:.0f}s")
    write_results(__file__, figures)


if __name__ == "__main__":
    main()
