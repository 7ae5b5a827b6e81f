"""``python -m bench`` (or ``make bench``): every benchmark, one after another.

``bench.peta_ablation`` (the paper's Table 2 on PETA, hours on a CPU) is left out: run it
alone, in the background; it saves each finished row and continues where it stopped.
``bench.threshold_protocol`` re-scores that run's folders, and ``bench.fc2_heldout`` studies
fc2 on the logits it kept, so they are left out too. ``bench.input_pipeline`` needs the PETA
images, and is left out for that reason.
Each script also runs alone (``python -m bench.<name>``); each writes
``bench/results/<name>.json`` and prints its ratios. ``python -m bench NAME ...`` runs a subset.
"""

from __future__ import annotations

import runpy
import sys

SCRIPTS = (
    "head_overhead",
    "data_throughput",
    "data_scale",
    "data_starvation",
    "als_scaling",
    "stage1_scaling",
    "demo_timing",
)


def main(names: list[str]) -> None:
    unknown = [name for name in names if name not in SCRIPTS]
    if unknown:
        raise SystemExit(f"unknown benchmark {unknown[0]!r}; valid: {', '.join(SCRIPTS)}")
    for name in names or SCRIPTS:
        print(f"=== bench.{name}", flush=True)
        sys.argv = [f"bench/{name}.py"]
        runpy.run_module(f"bench.{name}", run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
