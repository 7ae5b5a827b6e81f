"""How much the PETA verdict depends on the threshold protocol: finished runs, re-scored.

The ablation tables (``bench/peta_ablation.py``) score every row at one global threshold chosen
on validation from the grid 0.05..0.95 (METHOD.md: a tuned threshold is chosen on validation
only). Two questions follow. Does the grid clip the optimum (the baseline picks 0.05, the
grid's lowest, on every seed of both inits)? And does the verdict survive the fixed 0.5 that
most PAR papers report? Each run's stored val/test logits, and its CFAR predictor when one is
fitted, are scored three ways; no network runs, so this takes seconds:

- ``val``: the tables' protocol (grid 0.05..0.95, maximising validation mA);
- ``val_wide``: the same on 0.01..0.99 in steps of 0.01;
- ``fixed``: 0.5.

It needs the ablation's run folders (``runs/peta_ablation`` after a CPU run; a GPU run's
folders go with the lent machine), so ``python -m bench`` leaves it out.

    python -m bench.threshold_protocol                  # every finished run in runs/peta_ablation
    python -m bench.threshold_protocol runs/peta_ablation/baseline-seed1 ...
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import write_results
from campar_ray.cfar.fit import load_cfar_if_fitted
from campar_ray.decision import (
    CFAR_SOURCE,
    SOURCE_LABELS,
    eval_columns,
    final_source,
    source_probabilities,
)
from campar_ray.evaluate.metrics_table import run_config
from campar_ray.metrics import choose_threshold, par_metrics, summary
from campar_ray.run.layout import RunDir
from campar_ray.run.logits import read_split_logits

WIDE_GRID = np.round(np.linspace(0.01, 0.99, 99), 2)
FIXED = 0.5
PROTOCOLS = ("val", "val_wide", "fixed")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=add_help)
    parser.add_argument(
        "runs", nargs="*", help="run folders (default: every run in --root with test logits)"
    )
    parser.add_argument("--root", default="runs/peta_ablation", help="where to look for runs")
    return parser


def protocol_metrics(
    val_labels: np.ndarray, val_probs: np.ndarray, test_labels: np.ndarray, test_probs: np.ndarray
) -> dict[str, dict[str, float]]:
    """Test summary metrics (and the threshold used) under each protocol."""
    thresholds = {
        "val": float(choose_threshold(val_labels, val_probs)),
        "val_wide": float(choose_threshold(val_labels, val_probs, candidates=WIDE_GRID)),
        "fixed": FIXED,
    }
    return {
        name: {**summary(par_metrics(test_labels, test_probs, threshold)), "threshold": threshold}
        for name, threshold in thresholds.items()
    }


def score_run(run_dir: str) -> dict[str, dict[str, dict[str, float]]]:
    """Per prediction source of the run (its stage-1 prediction, and CFAR when fitted)."""
    predict_from = run_config(run_dir).model.predict_from
    cfar = load_cfar_if_fitted(run_dir)
    val, test = (read_split_logits(RunDir(run_dir).logits(split)) for split in ("val", "test"))
    columns = eval_columns(val)
    val_probs = source_probabilities(val, predict_from, cfar)
    test_probs = source_probabilities(test, predict_from, cfar)
    stage1 = final_source(val, predict_from, None)
    return {
        source: protocol_metrics(
            val.labels[:, columns],
            val_probs[source][:, columns],
            test.labels[:, columns],
            test_probs[source][:, columns],
        )
        for source in (stage1, CFAR_SOURCE)
        if source in val_probs
    }


def finished_runs(root: str) -> list[str]:
    return sorted(str(path.parents[1]) for path in Path(root).glob("*/logits/test.parquet"))


def report(scores: dict[str, dict[str, Any]]) -> str:
    header = "| run | source | " + " | ".join(
        f"{protocol}: threshold, mA, F1" for protocol in PROTOCOLS
    )
    lines = [header + " |", "|---|---|" + "---|" * len(PROTOCOLS)]
    for run, sources in scores.items():
        for source, by_protocol in sources.items():
            cells = [
                f"{m['threshold']:.2f}, {100 * m['mA']:.2f}, {100 * m['f1']:.2f}"
                for m in (by_protocol[protocol] for protocol in PROTOCOLS)
            ]
            lines.append(
                f"| {Path(run).name} | {SOURCE_LABELS[source]} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    runs = args.runs or finished_runs(args.root)
    if not runs:
        raise SystemExit(f"no finished runs (logits/test.parquet) under {args.root}")
    scores = {run: score_run(run) for run in runs}
    print(report(scores))
    path = write_results(__file__, {"protocols": list(PROTOCOLS), "runs": scores})
    print(f"wrote {path}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
